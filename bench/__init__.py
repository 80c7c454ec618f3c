"""rdzvctl's benchmark suite: ``python -m bench [--quick] [--only P1,P3]``.

Each benchmark (P1-P7, P10, P11; see ``docs/performance.md``) measures rdzvctl side by
side with a baseline in the same run and reports medians, the ratio and a
verdict against its target.  The servers it needs (redis-server, etcd, a
torch TCPStore, a FileStore) are started on free loopback ports and stopped
at the end.

This package's ``__init__`` stays empty of imports: the baseline scripts
(:mod:`bench.baseline`) are run as ``python -c "from bench.baseline import
main"`` and must not pay for anything else.
"""
