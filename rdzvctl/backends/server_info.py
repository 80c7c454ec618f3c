"""What each built-in backend's server says about itself (``RendezvousBackend.server_info``).

One function per server kind, each read-only and bounded by the backend's
timeout.  Every result is a JSON-able dict with ``kind``, ``endpoints``
(``[{"host", "port"}]``, known without any I/O so they can always be probed)
and the facts that matter for a rendezvous; when the server cannot be asked,
``error`` holds the one-line reason instead of an exception.  Judging the
facts is :mod:`rdzvctl.doctor`'s job, not this module's.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from rdzvctl.errors import BackendTimeoutError, RdzvctlError, UnsupportedOperationError

__all__ = ["tcpstore_info", "filestore_info", "etcd_info", "redis_info", "mount_of"]

#: A key no torch job uses, for the read-only QUEUE_LEN probe of the server flavour.
_PROBE_KEY = b"/rdzvctl.doctor.probe"


def _endpoints(pairs: Sequence[Tuple[str, int]]) -> List[Dict[str, Any]]:
    return [{"host": host, "port": port} for host, port in pairs]


def _guarded(info: Dict[str, Any], ask: Callable[[], None]) -> Dict[str, Any]:
    """Run ``ask`` (which fills ``info``); an rdzvctl error becomes ``info["error"]``."""
    try:
        ask()
    except RdzvctlError as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


# -- c10d TCPStore ----------------------------------------------------------------------
def tcpstore_info(client: Any) -> Dict[str, Any]:
    """Handshake and PING (the protocol), LIST_KEYS support, and the server flavour.

    The flavour comes from QUEUE_LEN on a fresh connection: torch's libuv
    server answers it, the legacy one (``use_libuv=False``) drops the
    connection on an opcode it does not know (facts: c10d-stores.md).
    """
    from rdzvctl.backends.tcpstore import TcpStoreClient

    info: Dict[str, Any] = {"kind": "tcpstore", "endpoints": _endpoints([(client.host, client.port)])}

    def ask() -> None:
        info["ping_seconds"] = client.ping()
        try:
            client.list_keys()
            info["list_keys"] = True
        except UnsupportedOperationError:
            info["list_keys"] = False
        probe = TcpStoreClient(client.host, client.port, timeout=client.timeout)
        try:
            probe.queue_len(_PROBE_KEY)
            info["flavour"] = "libuv"
        except RdzvctlError as exc:
            info["flavour"] = "unknown" if isinstance(exc, BackendTimeoutError) else "legacy"
        finally:
            probe.close()

    return _guarded(info, ask)


# -- c10d FileStore ---------------------------------------------------------------------
def mount_of(path: str, mounts_file: str = "/proc/mounts") -> Optional[Tuple[str, str]]:
    """``(mount point, filesystem type)`` holding ``path``: the longest matching mount point."""
    real = os.path.realpath(path)
    best: Optional[Tuple[str, str]] = None
    try:
        with open(mounts_file, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best


def filestore_info(path: str) -> Dict[str, Any]:
    """The file: existence, size (torch never compacts it), mode, owner, access, filesystem."""
    info: Dict[str, Any] = {"kind": "filestore", "endpoints": [], "path": path}
    try:
        st = os.stat(path)
    except FileNotFoundError:
        info["exists"] = False
        parent = os.path.dirname(os.path.abspath(path))
        info["parent_exists"] = os.path.isdir(parent)
        target = parent if info["parent_exists"] else path
    except OSError as exc:
        info["exists"] = None
        info["error"] = f"cannot stat {path}: {exc.strerror}"
        return info
    else:
        info.update(
            exists=True,
            regular=stat.S_ISREG(st.st_mode),
            size=st.st_size,
            mode=f"{stat.S_IMODE(st.st_mode):04o}",
            owner_uid=st.st_uid,
            readable=os.access(path, os.R_OK),
            writable=os.access(path, os.W_OK),
        )
        target = path
    found = mount_of(target)
    info["mount"], info["fstype"] = found if found else (None, None)
    return info


# -- etcd (v2 and v3 share the server) ------------------------------------------------------
def etcd_info(http: Any, gateway: Any = None) -> Dict[str, Any]:
    """Version, health, members and leader (v3 gateway), and whether the v2 API is served."""
    info: Dict[str, Any] = {"kind": "etcd", "endpoints": _endpoints([(e.host, e.port) for e in http.endpoints])}

    def get(path: str) -> Tuple[int, Any, bytes]:
        answer = http.request("GET", path)
        return answer.status, answer.headers, answer.body

    def ask() -> None:
        status, _, body = get("/version")
        try:
            version = json.loads(body)
        except ValueError:
            version = None
        if status != 200 or not isinstance(version, dict) or "etcdserver" not in version:
            info["error"] = f"the endpoint answered /version with HTTP {status}, not like etcd"
            return
        info["version"] = str(version.get("etcdserver"))
        info["cluster_version"] = str(version.get("etcdcluster"))
        status, _, body = get("/health")
        try:
            health = json.loads(body)
        except ValueError:
            health = {}
        info["health"] = str(health.get("health", "")).lower() == "true" if isinstance(health, dict) else None
        status, headers, _ = get("/v2/keys/")
        info["v2_enabled"] = status == 200 and "json" in headers.get("content-type", "")
        call = gateway.call if gateway is not None else _plain_v3(http)
        try:
            members = call("cluster/member/list", {}).get("members") or []
            status_doc = call("maintenance/status", {})
        except RdzvctlError as exc:
            info["v3_error"] = str(exc)
            return
        info["members"] = [
            {"id": str(m.get("ID", "")), "name": str(m.get("name", "")),
             "client_urls": [str(u) for u in m.get("clientURLs") or []]}
            for m in members if isinstance(m, dict)
        ]
        leader = str(status_doc.get("leader", "")) or None
        info["leader"] = leader
        info["leader_name"] = next((m["name"] for m in info["members"] if m["id"] == leader), None)
        info["db_size"] = int(status_doc.get("dbSize", 0) or 0)

    return _guarded(info, ask)


def _plain_v3(http: Any) -> Callable[[str, Dict[str, Any]], Dict[str, Any]]:
    """A v3 gateway POST without auth (the etcd-v2 backend has no v3 client of its own)."""
    from rdzvctl.backends.etcd_gateway import EtcdGateway

    return EtcdGateway(http).call


# -- Redis ----------------------------------------------------------------------------------
def redis_info(backend: Any) -> Dict[str, Any]:
    """INFO (version, role, cluster, persistence) and the CONFIG values that matter.

    A server that forbids CONFIG (managed services) leaves those values None.
    """
    settings = backend.settings
    nodes = [] if "unix_socket_path" in settings.connection else settings.nodes
    info: Dict[str, Any] = {"kind": "redis", "endpoints": _endpoints(nodes), "mode": settings.mode}

    def ask() -> None:
        from redis import exceptions as rx

        node = backend.node_client()
        with backend.errors():
            server = node.info("server")
            replication = node.info("replication")
            persistence = node.info("persistence")
            cluster = node.info("cluster")
            info["version"] = str(server.get("redis_version", ""))
            info["role"] = str(replication.get("role", ""))
            info["cluster_enabled"] = bool(int(cluster.get("cluster_enabled", 0) or 0))
            if info["cluster_enabled"]:
                try:
                    cluster_info = node.execute_command("CLUSTER INFO")
                    if isinstance(cluster_info, (bytes, str)):
                        text = cluster_info.decode() if isinstance(cluster_info, bytes) else cluster_info
                        cluster_info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                    info["cluster_state"] = str(cluster_info.get("cluster_state", "")) or None
                except rx.ResponseError:
                    info["cluster_state"] = None
            info["aof_enabled"] = bool(int(persistence.get("aof_enabled", 0) or 0))
            for name in ("notify-keyspace-events", "maxmemory-policy", "maxmemory", "save"):
                try:
                    reply = node.config_get(name)
                except rx.ResponseError:
                    value = None
                else:
                    raw = reply.get(name.encode(), reply.get(name))
                    value = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                info[name.replace("-", "_")] = value

    return _guarded(info, ask)
