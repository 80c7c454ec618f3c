"""torch ``Store`` implementations on Redis and etcd v3, the way torch's ``EtcdStore`` is built.

The rendezvous handler hands this store to torchrun, which uses it to share
``MASTER_ADDR``/``MASTER_PORT``, assign worker ranks and run its exit barrier;
a process group can also be built on it (gloo).  Semantics are TCPStore's:

* ``get``/``wait``/``multi_get`` block until every key exists, for at most the
  store timeout (or the explicit one) and then raise ``DistStoreError``
  ("wait timeout after ...ms, keys: ..."); a zero timeout does not wait.
* ``compare_set`` answers the value current after the call: ``desired`` on
  success; on a missing key an empty ``expected`` creates it and a non-empty
  one creates nothing and answers ``expected`` (exactly as TCPStore does, so
  torch's ``C10dRendezvousBackend`` works on these stores too).
* ``add`` keeps the counter as ASCII decimal.

Every key lives under a per-run prefix with the backend's TTL, so an abandoned
run leaves nothing behind.  Server failures raise ``DistNetworkError``.  Both
classes are also reachable from C++ (``PrefixStore``, gloo): torch's Python
store trampoline looks up ``deleteKey``/``getNumKeys`` under their C++ names,
hence the aliases.

Modules: :mod:`.common` (blocking reads, errors, key prefixes),
:mod:`.redis_store` (:class:`RedisStore`), :mod:`.etcd_store` (:class:`EtcdV3Store`).
"""

from rdzvctl.torchrun.stores.common import DEFAULT_TTL, etcd_store_prefix, redis_store_prefix
from rdzvctl.torchrun.stores.etcd_store import EtcdV3Store
from rdzvctl.torchrun.stores.redis_store import RedisStore

__all__ = [
    "DEFAULT_TTL",
    "RedisStore",
    "EtcdV3Store",
    "redis_store_prefix",
    "etcd_store_prefix",
]
