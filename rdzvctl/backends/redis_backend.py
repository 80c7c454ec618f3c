"""The former home of the Redis backend, now the package :mod:`rdzvctl.backends.redis`.

Kept so ``rdzvctl.backends.redis_backend:RedisBackend`` (an entry point written
by an older install, or code importing it) still resolves.
"""

from rdzvctl.backends.redis import DEFAULT_KEY_PREFIX, DEFAULT_TTL, RedisBackend, counter_key, translate_error

__all__ = ["RedisBackend", "DEFAULT_KEY_PREFIX", "DEFAULT_TTL", "counter_key", "translate_error"]
