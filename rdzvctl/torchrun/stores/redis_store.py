"""torch's ``Store`` on Redis: STRING keys under the run's store prefix, written with the backend's TTL."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

from rdzvctl.backends.redis.layout import glob_escape
from rdzvctl.torchrun.stores.common import (
    DEFAULT_TTL,
    POLL_FIRST,
    POLL_MAX,
    Data,
    ServerStore,
    Translator,
    redis_store_prefix,
    to_bytes,
)

__all__ = ["RedisStore"]

# Keys are plain strings with a TTL; the scripts keep every read-modify-write atomic.

_COMPARE_SET = """
local current = redis.call('GET', KEYS[1])
if current == false then
  if ARGV[1] ~= '' then return ARGV[1] end
elseif current ~= ARGV[1] then
  return current
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return ARGV[2]
"""

_ADD = """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return total
"""

_APPEND = """
local size = redis.call('APPEND', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return size
"""


class RedisStore(ServerStore):
    """A torch ``Store`` on Redis: keys ``torch.rendezvous.<run_id>.store/<key>`` with a TTL.

    ``client`` is a redis-py client (plain, Sentinel master or Cluster); blocking
    reads poll with a short backoff, which works on every deployment.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        ttl: int = DEFAULT_TTL,
        timeout: Optional[timedelta] = None,
        endpoint: str = "redis",
        prefix: Optional[str] = None,
        translate: Optional[Translator] = None,
    ) -> None:
        super().__init__(redis_store_prefix(run_id) if prefix is None else prefix, timeout, endpoint, translate)
        self.client = client
        self.run_id = run_id
        self.ttl = int(ttl)
        self._scripts: Dict[str, Any] = {}

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    def _read(self, keys: Sequence[bytes]) -> "tuple[List[Optional[bytes]], Any]":
        if len(keys) == 1:
            return [self.client.get(keys[0])], None
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return list(pipe.execute()), None

    def _block(self, key: bytes, marker: Any, deadline: float, attempt: int) -> None:
        pause = min(POLL_MAX, POLL_FIRST * (2 ** min(attempt, 10)))
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))

    def set(self, key: str, value: Data) -> None:
        with self._errors():
            self.client.set(self._key(key), to_bytes(value), ex=self.ttl or None)

    def multi_set(self, keys: List[str], values: List[Data]) -> None:
        if len(keys) != len(values):
            raise ValueError("multi_set needs as many values as keys")
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            for key, value in zip(keys, values):
                pipe.set(self._key(key), to_bytes(value), ex=self.ttl or None)
            pipe.execute()

    def compare_set(self, key: str, expected_value: Data, desired_value: Data) -> bytes:
        with self._errors():
            answer = self._script(_COMPARE_SET)(
                keys=[self._key(key)], args=[to_bytes(expected_value), to_bytes(desired_value), self.ttl]
            )
        return to_bytes(answer)

    def add(self, key: str, value: int) -> int:
        with self._errors():
            return int(self._script(_ADD)(keys=[self._key(key)], args=[int(value), self.ttl]))

    def append(self, key: str, value: Data) -> None:
        with self._errors():
            self._script(_APPEND)(keys=[self._key(key)], args=[to_bytes(value), self.ttl])

    def delete_key(self, key: str) -> bool:
        with self._errors():
            return int(self.client.delete(self._key(key))) > 0

    def num_keys(self) -> int:
        """How many keys the run's store holds (a SCAN of its prefix)."""
        with self._errors():
            return sum(1 for _ in self.client.scan_iter(match=glob_escape(self.prefix) + "*", count=1000))

    def clone(self) -> "RedisStore":
        return RedisStore(self.client, self.run_id, self.ttl, self.timeout, self.endpoint, self.prefix, self.translate)
