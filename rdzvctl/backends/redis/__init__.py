"""The ``redis`` backend: one Redis hash per run, fenced by a Lua script.

Modules: :mod:`.settings` (endpoint and options, on redis-py's ``parse_url``),
:mod:`.layout` (key names, the Lua scripts, the hash fields), :mod:`.errors`
(the one redis-py -> :mod:`rdzvctl.errors` mapping), :mod:`.watch`
(keyspace notifications or polling), :mod:`.history` (the kept semantic versions) and :mod:`.backend` (:class:`RedisBackend`).

Layout (see ``docs/redis-layout.md`` for a redis-cli walk-through):

* State key ``torch.rendezvous.<run_id>`` (prefix set by ``key_prefix``), a
  HASH with two fields:

  - ``state``: padded standard base64 of ``pickle.dumps(_RendezvousState)``,
    exactly the value torch's c10d and etcd-v2 backends store, so
    ``redis-cli HGET <key> state | base64 -d`` gives the pickle;
  - ``version``: the token, a decimal integer.

* Counter key ``{torch.rendezvous.<run_id>}:version``, a STRING holding the
  last version handed out for the run.  The hash tag puts it in the same
  cluster slot as the state key, and ``clear`` keeps it, so a token from
  before a clear never becomes valid again.

* History key ``{torch.rendezvous.<run_id>}:history``, a LIST of the last N
  semantic versions of the state (``--rdzv-conf history=N``, default 100; see
  :mod:`.history`), appended by the write script when the digest of the
  state's semantic part (hash field ``digest``) changes; same TTL.

* Store keys of the torchrun plugin's store: STRING keys under
  ``torch.rendezvous.<run_id>.store/`` (:attr:`RedisBackend.store_prefix`);
  torch's handler puts its per-round keys under
  ``torch.rendezvous.<run_id>.<round>/`` inside it.

* Every write runs one Lua script (EVALSHA, EVAL on NOSCRIPT): it compares
  the token with ``version``, and on success stores the new state with
  ``version = max(last version + 1, server time in ms)``.  Versions thus
  increase strictly, also across a clear, and even after the counter
  expired (unless the server clock goes back).  Both keys get the TTL
  (``ttl``, default 7200 s, 0 = never expire) again on every write.

Endpoints: ``host[:port]``, ``redis://[user:password@]host[:port][/db]``,
``rediss://...`` (TLS), ``unix:///path/to/redis.sock[?db=N]``; with
``sentinel_master=<name>`` a list of sentinels ``h1:26379,h2:26379``; with
``cluster=true`` one or more cluster nodes.  Options (``--rdzv-conf``):
``key_prefix``, ``ttl``, ``history``, ``username``, ``password`` (else the URL's, else
``$REDIS_PASSWORD``), ``db``, ``ssl``, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_password``, ``ssl_cert_reqs`` (none/optional/required),
``ssl_check_hostname``, ``sentinel_master``, ``sentinel_username``,
``sentinel_password``, ``cluster``.  Other options are ignored: they belong
to torch's rendezvous handler.

``watch`` is pushed through keyspace notifications when the server has them
on (``notify-keyspace-events`` with ``K`` and ``A`` or ``g`` + ``h``), and
polls with backoff otherwise.  redis-py is imported only when a server is
first contacted or a URL endpoint is parsed, never by importing this package.
"""

from rdzvctl.backends.redis.backend import RedisBackend
from rdzvctl.backends.redis.errors import translate_error
from rdzvctl.backends.redis.layout import DEFAULT_KEY_PREFIX, DEFAULT_TTL, counter_key

__all__ = ["RedisBackend", "DEFAULT_KEY_PREFIX", "DEFAULT_TTL", "counter_key", "translate_error"]
