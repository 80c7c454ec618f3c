"""The Redis layout of a run: key names, the fencing Lua scripts, and the hash fields.

See :mod:`rdzvctl.backends.redis` for the layout in prose and
``docs/redis-layout.md`` for a redis-cli walk-through.  Nothing here talks
to a server: :mod:`rdzvctl.backends.redis.backend` runs the scripts.
"""

from __future__ import annotations

import re
from typing import Optional

from rdzvctl.backends.base import StateAndToken, Token
from rdzvctl.errors import StateCorruptError
from rdzvctl.state.codec import decode_base64

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_TTL",
    "LIST_BATCH",
    "SET_SCRIPT",
    "CLEAR_SCRIPT",
    "counter_key",
    "glob_escape",
    "decode_hash",
    "token_argument",
]

DEFAULT_KEY_PREFIX = "torch.rendezvous."
DEFAULT_TTL = 7200
#: Keys per SCAN step and per pipelined batch of reads.
LIST_BATCH = 1000

# KEYS[1] state hash, KEYS[2] version counter, KEYS[3] history list (.history);
# ARGV[1] new state (base64), ARGV[2] token ("" = none), ARGV[3] ttl seconds (0 = none),
# ARGV[4] digest of the new state's semantic part, ARGV[5] history entries to keep (0 = none).
# Returns {1, version} when written, {0, state, version} when refused, {0} when
# refused and no state exists.  The new state is appended to the history only
# when its digest differs from the stored one (a heartbeat-only write does not
# change it); a history key of another type is left alone.
SET_SCRIPT = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'version', 'digest')
local ok
if cur[1] then
  ok = ARGV[2] ~= '' and ARGV[2] == cur[2]
else
  ok = ARGV[2] == ''
end
if not ok then
  if cur[1] then return {0, cur[1], cur[2] or ''} end
  return {0}
end
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
local last = math.max(tonumber(redis.call('GET', KEYS[2])) or 0, tonumber(cur[2]) or 0)
local version = string.format('%d', math.max(last + 1,
  tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)))
if not cur[1] then redis.call('DEL', KEYS[1]) end
local keep = tonumber(ARGV[5]) or 0
if keep > 0 then
  local kind = redis.call('TYPE', KEYS[3])['ok']
  if kind ~= 'list' and kind ~= 'none' then keep = 0 end
end
if keep > 0 then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'version', version, 'digest', ARGV[4])
  if ARGV[4] ~= cur[3] then
    local prev = redis.call('LINDEX', KEYS[3], -1)
    local seq = 1
    if prev then seq = (tonumber(string.match(prev, '^(%d+) ')) or 0) + 1 end
    redis.call('RPUSH', KEYS[3], string.format('%d %s %d.%06d %s', seq, version,
      tonumber(now[1]), tonumber(now[2]), ARGV[1]))
    redis.call('LTRIM', KEYS[3], -keep, -1)
  end
else
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'version', version)
  if cur[3] then redis.call('HDEL', KEYS[1], 'digest') end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('SET', KEYS[2], version, 'EX', ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
else
  redis.call('SET', KEYS[2], version)
  redis.call('PERSIST', KEYS[3])
end
return {1, version}
"""

# Same KEYS; ARGV[1] token, ARGV[2] ttl, ARGV[3] history entries to keep.  Deletes
# the hash if the token is current and keeps the counter (with a fresh TTL); a
# removal entry goes to the history.  Returns 1 if removed.
CLEAR_SCRIPT = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'version')
if not cur[1] or not cur[2] or ARGV[1] == '' or ARGV[1] ~= cur[2] then return 0 end
if redis.replicate_commands then redis.replicate_commands() end
redis.call('DEL', KEYS[1])
local last = math.max(tonumber(redis.call('GET', KEYS[2])) or 0, tonumber(cur[2]) or 0)
local ttl = tonumber(ARGV[2])
local keep = tonumber(ARGV[3]) or 0
if keep > 0 and redis.call('TYPE', KEYS[3])['ok'] == 'list' then
  local now = redis.call('TIME')
  local prev = redis.call('LINDEX', KEYS[3], -1)
  local seq = (tonumber(string.match(prev or '', '^(%d+) ')) or 0) + 1
  redis.call('RPUSH', KEYS[3], string.format('%d %d %d.%06d -', seq, last, tonumber(now[1]), tonumber(now[2])))
  redis.call('LTRIM', KEYS[3], -keep, -1)
end
if ttl > 0 then
  redis.call('SET', KEYS[2], string.format('%d', last), 'EX', ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
else
  redis.call('SET', KEYS[2], string.format('%d', last))
end
return 1
"""


def _hash_tag(key: str) -> Optional[str]:
    """The part of ``key`` Redis Cluster hashes, if the key has a non-empty ``{tag}``."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return None


def counter_key(key: str) -> Optional[str]:
    """The version counter key for state key ``key``, in the same cluster slot.

    ``None`` when no such name exists (a key with a ``}`` but no valid tag).
    """
    if _hash_tag(key) is not None:
        return key + ":version"
    if "}" in key:
        return None
    return "{" + key + "}:version"


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN ``MATCH`` pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def decode_hash(key: str, state: Optional[bytes], version: Optional[bytes]) -> Optional[StateAndToken]:
    """Turn the hash fields into ``(state bytes, token)``; ``None`` when there is no state."""
    if state is None:
        return None
    if not version:
        raise StateCorruptError(f"the Redis hash {key!r} has a state but no version field")
    try:
        token = int(version)
    except ValueError:
        raise StateCorruptError(f"the Redis hash {key!r} has a non-integer version {version[:40]!r}") from None
    try:
        return decode_base64(state), token
    except StateCorruptError as exc:
        raise StateCorruptError(f"the state in the Redis hash {key!r} is not valid base64: {exc.__cause__ or exc}") from exc


def token_argument(token: Token) -> str:
    """The token as the script compares it: "" for none, a value no version equals if invalid."""
    if token is None:
        return ""
    if type(token) is int:  # bool is an int subclass: True must not pass for version 1
        return str(token)
    return "-"
