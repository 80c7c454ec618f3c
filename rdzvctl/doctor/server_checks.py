"""``doctor``'s checks of the endpoint and the server (TCPStore, FileStore, etcd, Redis):
pure functions from probe results and ``server_info()`` to :class:`~rdzvctl.doctor.verdicts.Check` lines."""

from __future__ import annotations

from typing import Any, List, Mapping, Sequence, Tuple

from rdzvctl.doctor.probes import Connection, Resolution
from rdzvctl.doctor.verdicts import Check
from rdzvctl.doctor.verdicts import ms as _ms
from rdzvctl.doctor.verdicts import show as _show

__all__ = ["endpoint_checks", "server_checks", "NETWORK_FILESYSTEMS", "LOG_SIZE_WARN"]

#: Filesystems on which ``flock(2)`` is emulated or not coherent between hosts.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "glusterfs",
                                 "fuse.glusterfs", "ceph", "fuse.ceph", "lustre", "gpfs", "beegfs", "afs"})
#: A FileStore log above this size slows every reader (torch never compacts it).
LOG_SIZE_WARN = 64 << 20


# -- the endpoint ---------------------------------------------------------------------------
def endpoint_checks(endpoints: Sequence[Tuple[str, int]], resolved: Mapping[str, Resolution],
                    connected: Mapping[Tuple[str, int], Connection]) -> List[Check]:
    """Each endpoint resolves and accepts a TCP connection (with the time it took)."""
    out: List[Check] = []
    for host, port in endpoints:
        where = f"{host}:{port}"
        res = resolved.get(host)
        if res is not None and not res.ok:
            out.append(Check("endpoint.resolve", "fail", f"{host} does not resolve: {res.error}",
                             "check the host name in --rdzv-endpoint and DNS (/etc/hosts, resolv.conf)"))
            continue
        if res is not None:
            out.append(Check("endpoint.resolve", "ok", f"{host} -> {_show(list(res.addresses))} ({_ms(res.seconds)})"))
        conn = connected.get((host, port))
        if conn is None:
            continue
        if conn.ok:
            out.append(Check("endpoint.connect", "ok", f"{where} accepts connections ({_ms(conn.seconds)})",
                             data={"seconds": conn.seconds}))
        else:
            out.append(Check("endpoint.connect", "fail", f"cannot connect to {where}: {conn.error}",
                             "is the server running and listening on that address? check firewalls and the port"))
    return out


def server_checks(info: Mapping[str, Any], backend: str) -> List[Check]:
    """The server's identity and the settings that matter, by ``info["kind"]``."""
    kind = info.get("kind")
    if info.get("error"):
        return [Check("endpoint.protocol", "fail", f"the server did not answer like {kind or backend}: {info['error']}",
                      "check --rdzv-backend and --rdzv-endpoint point at the job's store")]
    checker = {"tcpstore": _tcpstore, "filestore": _filestore, "etcd": _etcd, "redis": _redis}.get(str(kind))
    return checker(info, backend) if checker else []


def _tcpstore(info: Mapping[str, Any], backend: str) -> List[Check]:
    out = [Check("endpoint.protocol", "ok", f"speaks torch's TCPStore protocol (PING {_ms(info.get('ping_seconds'))})")]
    flavour = info.get("flavour")
    if flavour == "libuv":
        out.append(Check("tcpstore.flavour", "ok", "libuv server (torch's default since 2.4)"))
    elif flavour == "legacy":
        out.append(Check("tcpstore.flavour", "warn",
                         "legacy (non-libuv) server: slower with many clients, and it does not wake waiters "
                         "when compare_set creates a key",
                         "start the store with torch's default (drop USE_LIBUV=0 / use_libuv=False)"))
    else:
        out.append(Check("tcpstore.flavour", "warn", "the server flavour could not be told (no answer in time)",
                         "retry with a longer --timeout"))
    if info.get("list_keys") is False:
        out.append(Check("tcpstore.list-keys", "warn",
                         "the server cannot list keys (torch predates LIST_KEYS): list and store-key checks are blind",
                         "upgrade torch on the store host"))
    return out


def _filestore(info: Mapping[str, Any], backend: str) -> List[Check]:
    path = str(info.get("path"))
    out: List[Check] = []
    if not info.get("exists"):
        where = "its directory exists" if info.get("parent_exists") else "its directory does not exist either"
        out.append(Check("filestore.path", "fail", f"the FileStore file {path} does not exist ({where})",
                         "the job's store was removed or not created yet; check --rdzv-endpoint"))
    elif not info.get("regular"):
        out.append(Check("filestore.path", "fail", f"{path} is not a regular file", "point --rdzv-endpoint at the store file"))
    else:
        out.append(Check("filestore.path", "ok", f"{path} exists (mode {info.get('mode')}, uid {info.get('owner_uid')})"))
        if not info.get("readable"):
            out.append(Check("filestore.permissions", "fail", f"{path} is not readable by this user",
                             "run as the job's user or fix the file's permissions"))
        elif not info.get("writable"):
            out.append(Check("filestore.permissions", "warn", f"{path} is read-only for this user: repairs will fail",
                             "run repairs as the job's user"))
        elif int(str(info.get("mode") or "0"), 8) & 0o002:
            out.append(Check("filestore.permissions", "warn", f"{path} is writable by every user",
                             f"chmod o-w {path}"))
        else:
            out.append(Check("filestore.permissions", "ok", "readable and writable by this user"))
        size = int(info.get("size") or 0)
        if size > LOG_SIZE_WARN:
            out.append(Check("filestore.size", "warn",
                             f"the log is {size / (1 << 20):.0f} MiB: torch never compacts it and every reader replays it",
                             "start the next job on a fresh FileStore path"))
        else:
            out.append(Check("filestore.size", "ok", f"the log is {size} bytes"))
    fstype = info.get("fstype")
    if fstype is None:
        out.append(Check("filestore.filesystem", "warn", "the filesystem type could not be read (/proc/mounts)"))
    elif str(fstype) in NETWORK_FILESYSTEMS or str(fstype).startswith("fuse."):
        out.append(Check("filestore.filesystem", "warn",
                         f"{path} is on {fstype} ({info.get('mount')}): flock there may not exclude writers on other "
                         "hosts, so concurrent writes can interleave",
                         "keep the FileStore on a local filesystem, or use the TCPStore (store_type=tcp)"))
    else:
        out.append(Check("filestore.filesystem", "ok", f"{fstype} ({info.get('mount')})"))
    return out


def _etcd(info: Mapping[str, Any], backend: str) -> List[Check]:
    out = [Check("endpoint.protocol", "ok", f"etcd {info.get('version')} (cluster version {info.get('cluster_version')})")]
    if info.get("health") is False:
        out.append(Check("etcd.health", "fail", "the cluster reports itself unhealthy (/health)",
                         "etcdctl endpoint health --cluster; check quorum"))
    elif info.get("health"):
        out.append(Check("etcd.health", "ok", "healthy"))
    if info.get("v3_error"):
        out.append(Check("etcd.members", "warn", f"members and leader unknown: {info['v3_error']}"))
    elif "members" in info:
        members = [str(m.get("name") or m.get("id")) for m in info.get("members") or []]
        if not info.get("leader"):
            out.append(Check("etcd.members", "fail", f"{len(members)} member(s) ({_show(members)}) and no leader",
                             "etcdctl endpoint status --cluster; a cluster without quorum cannot write"))
        else:
            leader = info.get("leader_name") or info.get("leader")
            out.append(Check("etcd.members", "ok", f"{len(members)} member(s) ({_show(members)}), leader {leader}"))
    v2 = info.get("v2_enabled")
    if backend in ("etcd-v2", "etcd"):  # etcd: torch's legacy handler, also on the v2 keys API
        if v2:
            out.append(Check("etcd.v2", "ok", f"the v2 API is on (torch's {backend} backend needs it)"))
        else:
            out.append(Check("etcd.v2", "fail", f"the v2 API is off: torch's {backend} backend cannot work",
                             "start etcd (< 3.6) with --enable-v2=true, or move the job to --rdzv-backend etcd-v3"))
    else:
        out.append(Check("etcd.v2", "ok", f"the v2 API is {'on' if v2 else 'off'} (not needed by {backend})"))
    return out


def _redis(info: Mapping[str, Any], backend: str) -> List[Check]:
    out = [Check("endpoint.protocol", "ok", f"Redis {info.get('version')} ({info.get('mode')}), role {info.get('role')}")]
    role = str(info.get("role") or "")
    if role in ("slave", "replica"):
        out.append(Check("redis.role", "fail", "the endpoint is a read-only replica: every write fails",
                         "point --rdzv-endpoint at the primary (or use sentinel_master)"))
    if info.get("cluster_enabled"):
        state = info.get("cluster_state")
        if state == "ok":
            out.append(Check("redis.cluster", "ok", "cluster state ok"))
        else:
            out.append(Check("redis.cluster", "fail", f"cluster state is {state or 'unknown'}",
                             "redis-cli cluster info; fix the failed slots/nodes"))
    flags = info.get("notify_keyspace_events")
    if flags is None:
        out.append(Check("redis.keyspace-events", "warn", "notify-keyspace-events unknown (CONFIG not allowed): "
                         "watch may have to poll", "allow CONFIG GET, or accept polling"))
    elif "K" in flags and ("A" in flags or ("g" in flags and "h" in flags)):
        out.append(Check("redis.keyspace-events", "ok", f"notify-keyspace-events {flags!r}: native watch works"))
    else:
        out.append(Check("redis.keyspace-events", "warn",
                         f"notify-keyspace-events is {flags!r}: no keyspace notifications, so watch polls",
                         "redis-cli CONFIG SET notify-keyspace-events KA (or add Kgh to the existing flags)"))
    policy = info.get("maxmemory_policy")
    limit = info.get("maxmemory")
    if policy is None:
        out.append(Check("redis.maxmemory-policy", "warn", "maxmemory-policy unknown (CONFIG not allowed)",
                         "make sure the server uses noeviction"))
    elif policy != "noeviction":
        bound = "no limit set yet" if str(limit) in ("0", "None") else f"maxmemory {limit} bytes"
        out.append(Check("redis.maxmemory-policy", "fail",
                         f"maxmemory-policy is {policy} ({bound}): under memory pressure Redis may evict the "
                         "rendezvous state (its keys have a TTL) and the job restarts from round 0",
                         "redis-cli CONFIG SET maxmemory-policy noeviction (and in redis.conf)"))
    else:
        out.append(Check("redis.maxmemory-policy", "ok", "noeviction: the state is never evicted"))
    save = info.get("save")
    aof = info.get("aof_enabled")
    persisted = bool(save) or bool(aof)
    out.append(Check("redis.persistence", "ok",
                     f"RDB save {save!r}, AOF {'on' if aof else 'off'}: " + (
                         "a restarted server reloads the last saved (possibly stale) state" if persisted
                         else "a restarted server comes back empty (the agents start over at round 0)")))
    return out
