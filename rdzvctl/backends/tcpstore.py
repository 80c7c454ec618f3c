"""A pure-Python client for torch's c10d ``TCPStore`` wire protocol (torch 2.13).

Keys are *wire* keys: torch's own client prefixes every user key with ``/``
(``store.set("k")`` travels as ``/k``), so pass ``b"/k"`` to reach what torch
calls ``k``.  Every reply is read under one deadline per request, so nothing
waits past ``timeout``.  Reading never writes, and :meth:`TcpStoreClient.get`
checks a key exists before fetching it: a raw GET on a missing key makes the
legacy server drop the connection and the libuv one answer empty bytes.

The protocol (opcodes, framing, the handshake) is torch's, from
``torch/csrc/distributed/c10d/TCPStore.cpp`` and ``TCPStoreLibUvBackend.cpp``;
both the libuv server and the legacy one (``use_libuv=False``) are supported.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
from typing import Iterable, List, Optional, Sequence, Union

from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
    UnsupportedOperationError,
)

__all__ = ["TcpStoreClient", "DEFAULT_PORT", "MAGIC"]

DEFAULT_PORT = 29400
MAGIC = 0x3C85F7CE

# Opcodes since VALIDATE became 0 (pytorch PR #107607); identical in 2.13 and 2.14.
VALIDATE = 0
SET = 1
COMPARE_SET = 2
GET = 3
CHECK = 5
DELETE_KEY = 8
MULTI_GET = 10
PING = 13
QUEUE_LEN = 16  # libuv server only
LIST_KEYS = 17

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_CHECK_ONE = struct.Struct("<BQQ")  # CHECK, n=1, key length
_KEY_OP = struct.Struct("<BQ")  # opcode, key length
_RECV_SIZE = 1 << 16
# An expired SO_RCVTIMEO/SO_SNDTIMEO surfaces as EAGAIN (BlockingIOError).
_TIMEOUTS = (socket.timeout, BlockingIOError)

Key = Union[bytes, str]


def _b(value: Key) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _timeval(seconds: float) -> bytes:
    """``SO_RCVTIMEO``/``SO_SNDTIMEO`` option value for ``seconds`` (never 0: that means forever)."""
    if sys.platform == "win32":  # pragma: no cover - a DWORD of milliseconds
        return struct.pack("I", max(1, int(seconds * 1000)))
    micros = max(1000, int(seconds * 1e6))
    return struct.pack("ll", micros // 1_000_000, micros % 1_000_000)


class TcpStoreClient:
    """One connection to a TCPStore server; thread-safe, strict request/reply FIFO.

    ``timeout`` bounds connecting and every request (seconds).  Errors are
    :class:`~rdzvctl.errors.BackendUnavailableError` (refused, reset, wrong
    protocol) and :class:`~rdzvctl.errors.BackendTimeoutError` (no answer in
    time); after one of them the connection is dropped and the next request
    reconnects.
    """

    def __init__(self, host: str, port: int = DEFAULT_PORT, timeout: float = 10.0) -> None:
        if not 0 < port < 65536:
            raise BackendConfigError(f"TCPStore port out of range: {port}")
        if timeout <= 0:
            raise BackendConfigError(f"TCPStore timeout must be positive, got {timeout}")
        self.host = host
        self.port = port
        self.timeout = float(timeout)
        self._sock: Optional[socket.socket] = None
        self._buf = b""
        self._lock = threading.Lock()

    # -- connection -------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def connect(self) -> "TcpStoreClient":
        """Connect and handshake now (otherwise the first request does it)."""
        with self._lock:
            self._ensure()
        return self

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> "TcpStoreClient":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop(self) -> None:
        sock, self._sock, self._buf = self._sock, None, b""
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _ensure(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        deadline = time.monotonic() + self.timeout
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except socket.gaierror as exc:
            raise BackendUnavailableError(
                f"cannot resolve the TCPStore host {self.host!r}: {exc.strerror}"
            ) from exc
        except socket.timeout as exc:
            raise BackendTimeoutError(
                f"connecting to the TCPStore at {self.endpoint} timed out after {self.timeout:g} s"
            ) from exc
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise BackendUnavailableError(
                f"cannot connect to the TCPStore at {self.endpoint}: {reason}"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buf = sock, b""
        nonce = os.getpid() & 0xFFFFFFFF
        try:
            sock.sendall(struct.pack("<BIBI", VALIDATE, MAGIC, PING, nonce))
            echo = self._read(4, deadline)
        except BackendTimeoutError as exc:
            self._drop()
            raise BackendTimeoutError(
                f"{self.endpoint} did not answer the TCPStore handshake within "
                f"{self.timeout:g} s: it is not a TCPStore server, runs an older torch, or is stuck"
            ) from exc
        except BackendUnavailableError as exc:
            self._drop()
            raise BackendUnavailableError(
                f"{self.endpoint} closed the connection during the TCPStore handshake: "
                "it is not a TCPStore server or is too old for this client"
            ) from exc
        if echo != struct.pack("<I", nonce):
            self._drop()
            raise BackendUnavailableError(
                f"{self.endpoint} answered the TCPStore handshake with {echo!r}: "
                "it is not a TCPStore server or is too old for this client"
            )
        # From now on a blocking socket with kernel timeouts: Python's own
        # timeout mode costs a poll() before every send and recv.
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.timeout))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.timeout))
        return sock

    # -- low-level I/O (caller holds the lock) ---------------------------------
    def _fail(self, exc: BaseException, what: str) -> BackendUnavailableError:
        self._drop()
        if isinstance(exc, _TIMEOUTS):
            return BackendTimeoutError(
                f"the TCPStore at {self.endpoint} did not {what} within {self.timeout:g} s"
            )
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return BackendUnavailableError(
            f"the connection to the TCPStore at {self.endpoint} failed ({reason})"
        )

    def _fill(self, sock: socket.socket, deadline: float, want: int) -> None:
        """Receive until at least ``want`` bytes are buffered or the deadline passes."""
        chunks = [self._buf] if self._buf else []
        have = len(self._buf)
        shortened = False
        try:
            while have < want:
                if chunks:
                    # Later chunks share the request's deadline (the first recv
                    # runs under the socket's own timeout: no extra syscall).
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout("timed out")
                    self._set_recv_timeout(sock, left)
                    shortened = True
                chunk = sock.recv(max(_RECV_SIZE, want - have))
                if not chunk:
                    raise ConnectionResetError(0, "the server closed the connection")
                chunks.append(chunk)
                have += len(chunk)
        finally:
            if shortened and self._sock is sock:
                self._set_recv_timeout(sock, self.timeout)
        self._buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    def _set_recv_timeout(sock: socket.socket, seconds: float) -> None:
        if sock.gettimeout() is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        else:  # still in the handshake
            sock.settimeout(seconds)

    def _read(self, n: int, deadline: float) -> bytes:
        sock = self._sock
        assert sock is not None
        if len(self._buf) < n:
            try:
                self._fill(sock, deadline, n)
            except OSError as exc:
                raise self._fail(exc, "reply") from exc
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _read_u64(self, deadline: float) -> int:
        return _U64.unpack(self._read(8, deadline))[0]

    def _read_bytes(self, deadline: float) -> bytes:
        return self._read(self._read_u64(deadline), deadline)

    def _send(self, payload: bytes) -> float:
        """Send one request (reconnecting first if needed); returns its deadline."""
        sock = self._ensure()
        deadline = time.monotonic() + self.timeout
        try:
            sock.sendall(payload)
        except OSError as exc:
            raise self._fail(exc, "accept the request") from exc
        return deadline

    @staticmethod
    def _keys(keys: Sequence[bytes]) -> bytes:
        parts = [_U64.pack(len(keys))]
        for key in keys:
            parts.append(_U64.pack(len(key)))
            parts.append(key)
        return b"".join(parts)

    def _check(self, keys: Sequence[bytes]) -> bool:
        if len(keys) == 1:
            key = keys[0]
            deadline = self._send(_CHECK_ONE.pack(CHECK, 1, len(key)) + key)
        else:
            deadline = self._send(bytes((CHECK,)) + self._keys(keys))
        return self._check_reply(deadline)

    def _check_reply(self, deadline: float) -> bool:
        reply = self._read(1, deadline)
        if reply not in (b"\x00", b"\x01"):
            self._drop()
            raise BackendUnavailableError(
                f"the TCPStore at {self.endpoint} answered CHECK with {reply!r}: not a TCPStore reply"
            )
        return reply == b"\x00"

    # -- operations ---------------------------------------------------------------
    def ping(self) -> float:
        """Round-trip one PING; returns the latency in seconds."""
        with self._lock:
            start = time.perf_counter()
            nonce = struct.pack("<I", 0x5A5A5A5A)
            deadline = self._send(bytes((PING,)) + nonce)
            if self._read(4, deadline) != nonce:
                self._drop()
                raise BackendUnavailableError(f"the TCPStore at {self.endpoint} answered PING wrongly")
            return time.perf_counter() - start

    def check(self, keys: Iterable[Key]) -> bool:
        """True when every key exists (torch's ``check``)."""
        with self._lock:
            return self._check([_b(k) for k in keys])

    def get(self, key: Key) -> Optional[bytes]:
        """The value of ``key``, or ``None`` when it does not exist (CHECK, then GET)."""
        key = _b(key)
        size = len(key)
        check = _CHECK_ONE.pack(CHECK, 1, size) + key
        get = _KEY_OP.pack(GET, size) + key
        with self._lock:
            sock = self._sock
            if sock is None or self._buf:
                return self._get_slow(check, get)
            # Fast path: each reply usually arrives in one segment.
            deadline = time.monotonic() + self.timeout
            try:
                sock.sendall(check)
                reply = sock.recv(_RECV_SIZE)
                if reply != b"\x00":
                    if reply == b"\x01":
                        return None
                    self._buf = reply
                    return self._get_slow(None, get, deadline)
                sock.sendall(get)
                reply = sock.recv(_RECV_SIZE)
            except OSError as exc:
                raise self._fail(exc, "reply") from exc
            if len(reply) >= 8 and len(reply) == 8 + _U64.unpack_from(reply)[0]:
                return reply[8:]
            self._buf = reply
            return self._read_bytes(deadline)

    def _get_slow(self, check: Optional[bytes], get: bytes, deadline: float = 0.0) -> Optional[bytes]:
        if check is not None:
            deadline = self._send(check)
        if not self._check_reply(deadline):
            return None
        deadline = self._send(get)
        return self._read_bytes(deadline)

    def multi_get(self, keys: Sequence[Key]) -> List[Optional[bytes]]:
        """Values of ``keys`` in order, ``None`` for missing ones (one CHECK + one MULTI_GET
        when all exist, per-key CHECKs otherwise)."""
        wire = [_b(k) for k in keys]
        if not wire:
            return []
        with self._lock:
            present = wire if self._check(wire) else [k for k in wire if self._check((k,))]
            if not present:
                return [None] * len(wire)
            deadline = self._send(bytes((MULTI_GET,)) + self._keys(present))
            values = [self._read_bytes(deadline) for _ in present]
        if len(present) == len(wire):
            return list(values)
        found = dict(zip(present, values))
        return [found.get(k) for k in wire]

    def compare_set(self, key: Key, expected: Key, desired: Key) -> bytes:
        """torch's ``compare_set``: the value current after the call.

        The reply does not say whether the write happened: compare it with
        ``desired``.  On a missing key with a non-empty ``expected`` the server
        creates nothing and replies ``expected``.
        """
        key, expected, desired = _b(key), _b(expected), _b(desired)
        payload = b"".join((
            _KEY_OP.pack(COMPARE_SET, len(key)), key,
            _U64.pack(len(expected)), expected,
            _U64.pack(len(desired)), desired,
        ))
        with self._lock:
            deadline = self._send(payload)
            return self._read_bytes(deadline)

    def set(self, key: Key, value: Key) -> None:
        """Unconditional write (no reply; a PING confirms it reached the server)."""
        key, value = _b(key), _b(value)
        payload = b"".join((_KEY_OP.pack(SET, len(key)), key, _U64.pack(len(value)), value))
        nonce = struct.pack("<I", 0x5E75E7)
        with self._lock:
            deadline = self._send(payload + bytes((PING,)) + nonce)
            if self._read(4, deadline) != nonce:
                self._drop()
                raise BackendUnavailableError(f"the TCPStore at {self.endpoint} answered SET wrongly")

    def delete_key(self, key: Key) -> bool:
        """Delete ``key``; True if it existed."""
        key = _b(key)
        with self._lock:
            deadline = self._send(_KEY_OP.pack(DELETE_KEY, len(key)) + key)
            return _I64.unpack(self._read(8, deadline))[0] > 0

    def queue_len(self, key: Key) -> int:
        """QUEUE_LEN of ``key`` (read-only; creates nothing).  Only torch's libuv server has it:
        the legacy one drops the connection (:class:`~rdzvctl.errors.BackendUnavailableError`)."""
        key = _b(key)
        with self._lock:
            deadline = self._send(_KEY_OP.pack(QUEUE_LEN, len(key)) + key)
            return int(_I64.unpack(self._read(8, deadline))[0])

    def list_keys(self) -> List[bytes]:
        """Every wire key on the server (LIST_KEYS); servers without it raise
        :class:`~rdzvctl.errors.UnsupportedOperationError`."""
        with self._lock:
            deadline = self._send(bytes((LIST_KEYS,)))
            try:
                count = _I64.unpack(self._read(8, deadline))[0]
            except BackendTimeoutError:
                raise
            except BackendUnavailableError as exc:
                raise UnsupportedOperationError(
                    f"the TCPStore at {self.endpoint} cannot list keys: its torch predates LIST_KEYS"
                ) from exc
            return [self._read_bytes(deadline) for _ in range(count)]

    def __repr__(self) -> str:
        return f"<TcpStoreClient {self.endpoint}>"
