"""The floor rdzvctl is compared with: the least a hand-written script must do.

``get BACKEND ENDPOINT RUN_ID``: import click (the CLI framework is a given),
read the run's raw value with the client library rdzvctl's backend uses
(redis-py for redis, ``http.client`` for etcd, a raw socket for a TCPStore,
plain file reads for a FileStore), base64-decode it, unpickle it with a tiny
allow-list unpickler and print the state as JSON.

``list BACKEND ENDPOINT``: the same for every run on the backend, read in
batches (SCAN + pipelined HMGET, one range request, one recursive GET,
LIST_KEYS + MULTI_GET, one file read), printing a JSON summary.

Run as ``python -c "from bench.baseline import main; ..."`` so that this
module is byte-compiled like rdzvctl's own.  No validation beyond what
decoding needs: that is rdzvctl's job, and its cost is what is measured.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import pickle
import sys

import click

STATE_PREFIX = "torch.rendezvous."  # c10d and redis keys
ETCD_PREFIX = "/torch/elastic/rendezvous/"
SENTINEL = b"Y2FuaW1hZGFt"
TORCH = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"


class Shell:
    """Stand-in for torch's ``_RendezvousState`` and ``_NodeDesc`` (NEWOBJ + BUILD fills __dict__)."""


ALLOWED = {
    (TORCH, "_RendezvousState"): Shell,
    (TORCH, "_NodeDesc"): Shell,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "timezone"): datetime.timezone,
    ("datetime", "timedelta"): datetime.timedelta,
}


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} refused") from None


def node_id(node):
    d = node.__dict__
    return f"{d['addr']}_{d['pid']}_{d['local_id']}"


def iso(value):
    return None if value is None else value.isoformat()


def to_json(raw):
    """base64 text -> pickle -> the state as a JSON-ready dict."""
    fields = Unpickler(io.BytesIO(base64.b64decode(raw))).load().__dict__
    return {
        "round": fields["round"],
        "complete": fields["complete"],
        "deadline": iso(fields["deadline"]),
        "closed": fields["closed"],
        "participants": {node_id(n): rank for n, rank in fields["participants"].items()},
        "wait_list": sorted(node_id(n) for n in fields["wait_list"]),
        "redundancy_list": sorted(node_id(n) for n in fields.get("redundancy_list", ())),
        "last_heartbeats": {node_id(n): iso(t) for n, t in fields["last_heartbeats"].items()},
    }


# -- raw reads: each returns the stored base64 text (None if absent) ---------------------
def _host_port(endpoint):
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def _tcpstore(endpoint):
    import socket
    import struct

    sock = socket.create_connection(_host_port(endpoint), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(struct.pack("<BIBI", 0, 0x3C85F7CE, 13, 1))  # VALIDATE, PING
    buf = bytearray()

    def read(n):  # linear in n (appending to a bytearray, one copy out)
        while len(buf) < n:
            chunk = sock.recv(max(65536, n - len(buf)))
            if not chunk:
                raise ConnectionError("closed")
            buf.extend(chunk)
        data = bytes(buf[:n])
        del buf[:n]
        return data

    read(4)

    def keys(ks):
        return struct.pack("<Q", len(ks)) + b"".join(struct.pack("<Q", len(k)) + k for k in ks)

    def get(key):
        sock.sendall(b"\x05" + keys([key]))  # CHECK
        if read(1) != b"\x00":
            return None
        sock.sendall(b"\x03" + struct.pack("<Q", len(key)) + key)  # GET
        return read(struct.unpack("<Q", read(8))[0])

    def list_all():
        sock.sendall(b"\x11")  # LIST_KEYS
        found = [read(struct.unpack("<Q", read(8))[0]) for _ in range(struct.unpack("<q", read(8))[0])]
        found = [k for k in found if k.startswith(b"/" + STATE_PREFIX.encode())]
        out = {}
        for i in range(0, len(found), 1000):
            batch = found[i:i + 1000]
            sock.sendall(b"\x0a" + keys(batch))  # MULTI_GET
            for k in batch:
                out[k[len(STATE_PREFIX) + 1:].decode()] = read(struct.unpack("<Q", read(8))[0])
        return out

    return get, list_all


def _filestore(path):
    import struct

    with open(path, "rb") as f:
        data = f.read()
    values, pos = {}, 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        key = data[pos + 4:pos + 4 + n]
        pos += 4 + n
        (m,) = struct.unpack_from("<I", data, pos)
        values[key] = data[pos + 4:pos + 4 + m]
        pos += 4 + m
    prefix = b"/" + STATE_PREFIX.encode()
    return {k[len(prefix):].decode(): v for k, v in values.items() if k.startswith(prefix)}


def read_one(backend, endpoint, run_id):
    if backend == "c10d-tcp":
        get, _ = _tcpstore(endpoint)
        return get(f"/{STATE_PREFIX}{run_id}".encode())
    if backend == "c10d-file":
        return _filestore(endpoint).get(run_id)
    if backend == "redis":
        import redis

        host, port = _host_port(endpoint)
        return redis.Redis(host=host, port=port).hmget(STATE_PREFIX + run_id, ["state", "version"])[0]
    if backend == "etcd-v2":
        import http.client

        conn = http.client.HTTPConnection(*_host_port(endpoint), timeout=10)
        conn.request("GET", f"/v2/keys{ETCD_PREFIX}{run_id}?quorum=true")
        node = json.loads(conn.getresponse().read()).get("node")
        return None if node is None else node["value"]
    if backend == "etcd-v3":
        import http.client

        conn = http.client.HTTPConnection(*_host_port(endpoint), timeout=10)
        body = json.dumps({"key": base64.b64encode((ETCD_PREFIX + run_id).encode()).decode()})
        conn.request("POST", "/v3/kv/range", body, {"Content-Type": "application/json"})
        kvs = json.loads(conn.getresponse().read()).get("kvs")
        return base64.b64decode(kvs[0]["value"]) if kvs else None
    raise SystemExit(f"unknown backend {backend}")


def read_all(backend, endpoint):
    """Every run's stored value by run id."""
    if backend == "c10d-tcp":
        _, list_all = _tcpstore(endpoint)
        return list_all()
    if backend == "c10d-file":
        return _filestore(endpoint)
    if backend == "redis":
        import redis

        host, port = _host_port(endpoint)
        client = redis.Redis(host=host, port=port)
        keys = list(client.scan_iter(match=STATE_PREFIX + "*", count=1000, _type="hash"))
        out = {}
        for i in range(0, len(keys), 1000):
            pipe = client.pipeline(transaction=False)
            for key in keys[i:i + 1000]:
                pipe.hget(key, "state")
            for key, value in zip(keys[i:i + 1000], pipe.execute()):
                out[key[len(STATE_PREFIX):].decode()] = value
        return out
    if backend == "etcd-v2":
        import http.client

        conn = http.client.HTTPConnection(*_host_port(endpoint), timeout=60)
        conn.request("GET", f"/v2/keys{ETCD_PREFIX[:-1]}?recursive=true&quorum=true")
        nodes = json.loads(conn.getresponse().read())["node"].get("nodes", [])
        return {n["key"][len(ETCD_PREFIX):]: n["value"] for n in nodes}
    if backend == "etcd-v3":
        import http.client

        conn = http.client.HTTPConnection(*_host_port(endpoint), timeout=60)
        prefix = ETCD_PREFIX.encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        body = json.dumps({"key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode()})
        conn.request("POST", "/v3/kv/range", body, {"Content-Type": "application/json"})
        kvs = json.loads(conn.getresponse().read()).get("kvs", [])
        return {base64.b64decode(kv["key"])[len(prefix):].decode(): base64.b64decode(kv["value"]) for kv in kvs}
    raise SystemExit(f"unknown backend {backend}")


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if args[0] == "get":
        raw = read_one(args[1], args[2], args[3])
        if raw is None or raw == SENTINEL:
            click.echo("no state", err=True)
            return 5
        click.echo(json.dumps({"run_id": args[3], "state": to_json(raw)}, indent=2))
        return 0
    if args[0] == "list":
        counts = {"runs": 0, "decoded": 0, "corrupt": 0}
        for raw in read_all(args[1], args[2]).values():
            if raw is None or raw == SENTINEL:
                continue
            counts["runs"] += 1
            try:
                to_json(raw)
                counts["decoded"] += 1
            except Exception:  # noqa: BLE001 - counted, like rdzvctl reports it
                counts["corrupt"] += 1
        click.echo(json.dumps(counts))
        return 0
    raise SystemExit("usage: get BACKEND ENDPOINT RUN_ID | list BACKEND ENDPOINT")
