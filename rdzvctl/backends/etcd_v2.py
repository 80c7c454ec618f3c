"""The ``etcd-v2`` backend: torch's ``EtcdRendezvousBackend`` layout over the etcd v2 keys API.

Layout (torch's, byte for byte): key ``/torch/elastic/rendezvous/<run_id>``
(``key_prefix`` in ``--rdzv-conf`` changes the directory), value = the
base64 of the pickled state, token = the key's ``modifiedIndex``.  Every
write sets ``ttl`` (default 7200 s) like torch, so an abandoned run expires
two hours after its last write; the first write uses ``prevExist=false`` and
later ones ``prevIndex=<token>``.  Reads use ``quorum=true`` so that any member
answers with the latest write.  torch's options ``protocol``, ``ssl_cert``,
``ssl_cert_key``, ``ca_cert`` and ``read_timeout`` are honoured, and the
endpoint may list several members (``host1:2379,host2:2379``).

The v2 API needs etcd started with ``--enable-v2=true``; etcd 3.6 removed it.
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Any, Dict, FrozenSet, Generator, Iterator, Optional
from urllib.parse import quote, urlencode

from rdzvctl.backends.base import (
    Address,
    HistoryWindow,
    RendezvousBackend,
    RunEntry,
    SetResult,
    StateAndToken,
    Token,
    is_counter_token,
    round_of_store_key,
)
from rdzvctl.errors import BackendConfigError, BackendUnavailableError, StateCorruptError
from rdzvctl.state.codec import decode_base64, encode_base64

__all__ = ["EtcdV2Backend", "DEFAULT_KEY_PREFIX", "DEFAULT_TTL", "STORE_DIRECTORY"]

DEFAULT_KEY_PREFIX = "/torch/elastic/rendezvous"
DEFAULT_TTL = 7200  # torch's EtcdRendezvousBackend._DEFAULT_TTL
#: torch's ``EtcdStore`` directory for every run (``etcd_rendezvous_backend.create_backend``).
STORE_DIRECTORY = "/torch/elastic/store"

# etcd v2 error codes (https://etcd.io/docs/v2.3/errorcode/).
_KEY_NOT_FOUND = 100
_COMPARE_FAILED = 101
_NOT_A_FILE = 102
_NODE_EXIST = 105
_INDEX_CLEARED = 401

_API = "the etcd v2 API"


class EtcdV2Backend(RendezvousBackend):
    """torch's ``etcd-v2`` rendezvous backend, read and written without torch or python-etcd."""

    name = "etcd-v2"
    summary = "etcd v2 keys API (torch's etcd-v2 layout; etcd <= 3.5 with --enable-v2)"
    requires = ()
    install_hint = ""
    capabilities = frozenset({"clear", "list_runs", "native_watch", "store_keys", "history"})
    conf_keys = frozenset({"protocol", "ca_cert", "ssl_cert", "ssl_cert_key", "ttl", "key_prefix"})
    strict_fencing = True

    def __init__(self, address: Address) -> None:
        super().__init__(address)
        from rdzvctl.backends.etcd_http import EtcdHttp
        from rdzvctl.backends.etcd_members import choose_protocol, make_ssl_context, parse_endpoints

        endpoints, scheme = parse_endpoints(address.endpoint)
        protocol = choose_protocol(address.get("protocol"), scheme, "http")
        read_timeout = address.get_float("read_timeout")
        if read_timeout is not None and read_timeout <= 0:
            raise BackendConfigError("--rdzv-conf read_timeout: must be positive")
        timeout = min(address.timeout, read_timeout) if read_timeout else address.timeout
        ttl = address.get_int("ttl")
        self.ttl = ttl if ttl and ttl > 0 else DEFAULT_TTL
        prefix = address.get("key_prefix", DEFAULT_KEY_PREFIX) or ""
        self.key_prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        context = None
        if protocol == "https":
            context = make_ssl_context(address.get("ca_cert"), address.get("ssl_cert"), address.get("ssl_cert_key"))
        self._http = EtcdHttp(endpoints, timeout, context, api="etcd")

    # -- paths ----------------------------------------------------------------------
    @property
    def key(self) -> str:
        """The etcd key of this run's state."""
        return f"{self.key_prefix}/{self.run_id}"

    def _path(self, key: str, **query: Any) -> str:
        path = "/v2/keys" + quote(key, safe="/")
        return path + ("?" + urlencode(query) if query else "")

    def _call(self, method: str, key: str, form: Optional[Dict[str, Any]] = None,
              **query: Any) -> "tuple[int, Dict[str, Any], Dict[str, str]]":
        body = urlencode(form).encode() if form is not None else None
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
        answer = self._http.request(method, self._path(key, **query), body, headers)
        if answer.status == 404 and "json" not in answer.headers.get("content-type", ""):
            raise BackendUnavailableError(
                f"etcd at {answer.endpoint} does not serve {_API} (start etcd with --enable-v2=true; "
                "etcd 3.6 removed it)"
            )
        doc = answer.json(_API)
        if not isinstance(doc, dict) or not ("node" in doc or "errorCode" in doc):
            raise BackendUnavailableError(f"{answer.endpoint} did not answer like {_API}")
        if answer.status >= 500 or (answer.status >= 400 and doc.get("errorCode") in (None, 300, 301)):
            message = doc.get("message") or f"HTTP {answer.status}"
            raise BackendUnavailableError(f"etcd at {answer.endpoint} failed the request: {message}")
        return answer.status, doc, dict(answer.headers)

    # -- decoding -------------------------------------------------------------------
    def _decode_node(self, node: Dict[str, Any]) -> StateAndToken:
        if node.get("dir"):
            raise StateCorruptError(f"etcd key {node.get('key', self.key)} is a directory, not rendezvous state")
        try:
            state = decode_base64(node.get("value", ""))
        except StateCorruptError as exc:
            raise StateCorruptError(
                f"the value of etcd key {node.get('key', self.key)} is not base64 (not rendezvous state)"
            ) from exc
        return state, int(node["modifiedIndex"])

    # -- torch's contract -------------------------------------------------------------
    def get_state(self) -> Optional[StateAndToken]:
        status, doc, _ = self._call("GET", self.key, quorum="true")
        if doc.get("errorCode") == _KEY_NOT_FOUND:
            return None
        self._raise_unexpected(status, doc)
        return self._decode_node(doc["node"])

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        if token is not None and not is_counter_token(token):
            return self._current_refused()
        return self._fenced_put({"value": encode_base64(state).decode("ascii"), "ttl": self.ttl}, token)

    def _fenced_put(self, form: Dict[str, Any], token: Optional[Token]) -> Optional[SetResult]:
        """PUT ``form`` on the state key, fenced: ``prevExist=false`` without a token, else ``prevIndex``."""
        if token is None:
            form["prevExist"] = "false"
        else:
            form["prevIndex"] = token
        status, doc, _ = self._call("PUT", self.key, form)
        if doc.get("errorCode") in (_KEY_NOT_FOUND, _COMPARE_FAILED, _NODE_EXIST, _NOT_A_FILE):
            return self._current_refused()
        self._raise_unexpected(status, doc)
        return (*self._decode_node(doc["node"]), True)

    def _current_refused(self) -> Optional[SetResult]:
        current = self.get_state()
        return None if current is None else (*current, False)

    def _raise_unexpected(self, status: int, doc: Dict[str, Any]) -> None:
        if "errorCode" in doc or "node" not in doc:
            message = doc.get("message") or f"HTTP {status}"
            raise BackendUnavailableError(f"etcd at {self.describe()} refused the request on {self.key}: {message}")

    # -- capabilities ----------------------------------------------------------------
    def clear(self, token: Token) -> bool:
        """Compare-and-delete on ``prevIndex``: removes the state only if ``token`` is current."""
        return self._fenced_delete(token)

    def discard_cleared_run(self) -> None:
        """Delete the directories the run's key created under the key prefix, each only while empty."""
        directory = self.key.rsplit("/", 1)[0]
        while directory:
            status, _, _ = self._call("DELETE", directory, dir="true")
            if status >= 300:  # not empty (someone else's runs live there) or already gone
                return
            directory = directory.rsplit("/", 1)[0]

    def _fenced_delete(self, token: Token) -> bool:
        """DELETE the state key on ``prevIndex``; False when ``token`` is not current."""
        if not is_counter_token(token):
            return False
        status, doc, _ = self._call("DELETE", self.key, prevIndex=token)
        if doc.get("errorCode") in (_KEY_NOT_FOUND, _COMPARE_FAILED, _NOT_A_FILE):
            return False
        self._raise_unexpected(status, doc)
        return True

    def history(self) -> HistoryWindow:
        """The key's events still in the server's event window (:mod:`rdzvctl.backends.etcd_v2_history`)."""
        from rdzvctl.backends.etcd_v2_history import read_history

        return read_history(self)

    def list_runs(self) -> Iterator[RunEntry]:
        """Every run under the key prefix, sorted by run id, from one recursive GET.

        A run whose value is not base64 is listed with its ``error`` set.
        """
        directory = self.key_prefix or "/"
        status, doc, _ = self._call("GET", directory, recursive="true", sorted="true", quorum="true")
        if doc.get("errorCode") == _KEY_NOT_FOUND:
            return
        self._raise_unexpected(status, doc)
        cut = len(self.key_prefix) + 1
        stack = list(reversed(doc["node"].get("nodes", [])))
        entries = []
        while stack:
            node = stack.pop()
            if node.get("dir"):
                stack.extend(reversed(node.get("nodes", [])))
                continue
            run_id = node["key"][cut:]
            try:
                entries.append(RunEntry(run_id, self._decode_node(node)))
            except StateCorruptError as exc:
                entries.append(RunEntry(run_id, None, exc))
        entries.sort(key=lambda entry: entry.run_id)
        yield from entries

    def _store_nodes(self) -> Iterator["tuple[bytes, Dict[str, Any]]"]:
        """Every key of torch's ``EtcdStore`` (all runs share it) as (decoded name, node).

        ``EtcdStore`` names a key ``/torch/elastic/store/<base64 of the name>``
        (``_encode``), so a ``/`` of the base64 alphabet nests directories:
        the name is the whole path below the directory.  Names that are not
        base64 are not torch's and are skipped.
        """
        status, doc, _ = self._call("GET", STORE_DIRECTORY, recursive="true", quorum="true")
        if doc.get("errorCode") == _KEY_NOT_FOUND:
            return
        self._raise_unexpected(status, doc)
        cut = len(STORE_DIRECTORY) + 1
        stack = list(doc["node"].get("nodes", []))
        while stack:
            node = stack.pop()
            if node.get("dir"):
                stack.extend(node.get("nodes", []))
                continue
            try:
                name = base64.b64decode(node["key"][cut:], validate=True)
            except (binascii.Error, ValueError, TypeError):
                continue
            yield name, node

    def store_keys(self) -> Dict[str, bytes]:
        """The run's per-round keys in torch's ``EtcdStore`` as ``"<round>/<name>"``.

        torch's etcd-v2 handler shares one store directory between runs and
        sets no TTL on it: the keys outlive the state (whose TTL is 7200 s).
        One recursive GET of the directory, filtered by the run's round prefix.
        """
        prefix = f"torch.rendezvous.{self.run_id}.".encode()
        found = []
        for name, node in self._store_nodes():
            parsed = round_of_store_key(name, prefix)
            if parsed is None:
                continue
            try:
                value = base64.b64decode(node.get("value", ""), validate=True)
            except (binascii.Error, ValueError, TypeError):
                value = str(node.get("value", "")).encode()
            found.append((parsed[0], parsed[1].decode("utf-8", "replace"), value))
        return {f"{r}/{n}": v for r, n, v in sorted(found)}

    def store_rounds(self) -> FrozenSet[int]:
        prefix = f"torch.rendezvous.{self.run_id}.".encode()
        return frozenset(parsed[0] for parsed in (round_of_store_key(name, prefix) for name, _ in self._store_nodes())
                         if parsed is not None)

    # -- watch (driven by rdzvctl.backends.watching) -------------------------------------
    def watch_read(self) -> "tuple[Optional[StateAndToken], int]":
        """The state and the etcd index to wait from (the one after the store index of the read)."""
        status, doc, headers = self._call("GET", self.key, quorum="true")
        if doc.get("errorCode") == _KEY_NOT_FOUND:
            current: Optional[StateAndToken] = None
        else:
            self._raise_unexpected(status, doc)
            current = self._decode_node(doc["node"])
        return current, int(headers.get("x-etcd-index", doc.get("index", 0))) + 1

    def watch_wait(self, cursor: Any, stop: threading.Event, interval: float) -> Generator[Any, None, None]:
        """etcd's own watch (``wait=true&waitIndex=``): no polling, one request per change.

        An idle, interrupted or broken long-poll ends the generator (the driver
        waits again from the same index); an index etcd no longer keeps (401)
        or an error event asks the driver to re-read.
        """
        from rdzvctl.backends.watching import RESYNC

        event = self._wait(cursor, stop)
        if event is None:
            return
        if event.get("errorCode") == _INDEX_CLEARED:
            yield RESYNC
            return
        if "errorCode" in event or "node" not in event:
            stop.wait(min(interval, 1.0))
            yield RESYNC
            return
        node = event["node"]
        if event.get("action") in ("delete", "compareAndDelete", "expire") or "value" not in node:
            current = None
        else:
            current = self._decode_node(node)
        yield current, int(node["modifiedIndex"]) + 1

    def _wait(self, index: int, stop: threading.Event, idle: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """One long-poll for the next change at or after ``index``; None if none came (within ``idle`` s)."""
        import json

        from rdzvctl.backends.etcd_errors import TRANSPORT_ERRORS
        from rdzvctl.backends.etcd_http import WATCH_IDLE_SECONDS

        path = self._path(self.key, wait="true", waitIndex=index)
        try:
            with self._http.stream("GET", path, None, {}, stop, WATCH_IDLE_SECONDS if idle is None else idle) as stream:
                response = stream.response()
                body = response.read()
        except TRANSPORT_ERRORS:
            return None
        except BackendUnavailableError:
            if stop.is_set():
                return None
            raise
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    # -- presentation ----------------------------------------------------------------
    def server_info(self) -> Dict[str, Any]:
        """Version, health, members, leader and whether v2 is on (see ``server_info``)."""
        from rdzvctl.backends.server_info import etcd_info

        return etcd_info(self._http)

    def describe(self) -> str:
        return self._http.describe()

    def close(self) -> None:
        self._http.close()
