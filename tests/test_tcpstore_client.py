"""The pure-Python TCPStore client against torch 2.13 servers (libuv and legacy)."""

from __future__ import annotations

import socket
import struct
import time
import uuid

import pytest

from rdzvctl.backends.tcpstore import TcpStoreClient
from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
    UnsupportedOperationError,
)
from tests.support.torch_peer import (
    blackhole_server,
    refused_port,
    scripted_server,
    torch_set,
    torch_tcpstore,
)

pytestmark = pytest.mark.torch
TIMEOUT = 5.0


def new_key() -> str:
    return f"k-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def torch_client(tcpstore_server):
    return torch_tcpstore(tcpstore_server)


@pytest.fixture()
def client(tcpstore_server):
    with TcpStoreClient(tcpstore_server.host, tcpstore_server.port, timeout=TIMEOUT) as c:
        yield c


# -- operations -------------------------------------------------------------------
def test_handshake_and_ping(client):
    assert client.ping() < TIMEOUT


def test_get_reads_what_torch_set(client, torch_client):
    key = new_key()
    torch_set(torch_client, key, b"\x00value\xff")
    assert client.get("/" + key) == b"\x00value\xff"


def test_get_missing_key_is_none_and_creates_nothing(client, torch_client):
    key = new_key()
    assert client.get("/" + key) is None
    assert torch_client.check([key]) is False
    # The connection survives (the legacy server would drop it after a raw GET).
    torch_set(torch_client, key, b"later")
    assert client.get("/" + key) == b"later"


def test_get_of_empty_value(client, torch_client):
    key = new_key()
    torch_set(torch_client, key, b"")
    assert client.get("/" + key) == b""


def test_set_is_seen_by_torch(client, torch_client):
    key = new_key()
    client.set("/" + key, bytes(range(256)))
    assert torch_client.get(key) == bytes(range(256))


def test_large_value_round_trips(client, torch_client):
    key = new_key()
    big = bytes(range(256)) * (3 << 12)  # 3 MiB
    client.set("/" + key, big)
    assert client.get("/" + key) == big
    assert torch_client.get(key) == big


def test_check(client, torch_client):
    a, b = new_key(), new_key()
    torch_set(torch_client, a, b"1")
    assert client.check(["/" + a]) is True
    assert client.check(["/" + a, "/" + b]) is False
    assert client.check(["/" + b]) is False


def test_compare_set_semantics(client, torch_client):
    key = "/" + new_key()
    # Missing key, non-empty expected: creates nothing and echoes expected.
    assert client.compare_set(key, b"x", b"y") == b"x"
    assert client.check([key]) is False
    # Missing key, empty expected: creates it.
    assert client.compare_set(key, b"", b"y") == b"y"
    # Existing key, empty expected: fails, replies the current value.
    assert client.compare_set(key, b"", b"z") == b"y"
    # Existing key, matching expected: replaces.
    assert client.compare_set(key, b"y", b"z") == b"z"
    # Existing key, wrong expected: replies the current value.
    assert client.compare_set(key, b"y", b"w") == b"z"
    assert torch_client.get(key[1:]) == b"z"


def test_delete_key(client, torch_client):
    key = new_key()
    torch_set(torch_client, key, b"1")
    assert client.delete_key("/" + key) is True
    assert client.delete_key("/" + key) is False
    assert torch_client.check([key]) is False


def test_multi_get_with_missing_keys(client, torch_client):
    a, b, c = new_key(), new_key(), new_key()
    torch_set(torch_client, a, b"A")
    torch_set(torch_client, c, b"C")
    assert client.multi_get(["/" + a, "/" + c]) == [b"A", b"C"]
    assert client.multi_get(["/" + a, "/" + b, "/" + c]) == [b"A", None, b"C"]
    assert client.multi_get([]) == []


def test_list_keys_returns_wire_keys(client, torch_client):
    key = new_key()
    torch_set(torch_client, key, b"1")
    assert ("/" + key).encode() in client.list_keys()


def test_many_requests_on_one_connection(client, torch_client):
    key = new_key()
    torch_set(torch_client, key, b"v" * 1500)
    for _ in range(500):
        assert client.get("/" + key) == b"v" * 1500


# -- errors -----------------------------------------------------------------------------
def test_refused_port_is_unavailable_at_once():
    port = refused_port()
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}") as info:
        TcpStoreClient("127.0.0.1", port, timeout=TIMEOUT).connect()
    assert not isinstance(info.value, BackendTimeoutError)
    assert time.monotonic() - start < 2


def test_black_hole_times_out_within_the_timeout():
    with blackhole_server() as port:
        start = time.monotonic()
        with pytest.raises(BackendTimeoutError, match="handshake") as info:
            TcpStoreClient("127.0.0.1", port, timeout=0.5).connect()
        elapsed = time.monotonic() - start
    assert 0.4 < elapsed < 1.5
    assert f"127.0.0.1:{port}" in str(info.value)


def test_http_server_is_a_wrong_protocol():
    def http(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with scripted_server(http) as port:
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="not a TCPStore"):
            TcpStoreClient("127.0.0.1", port, timeout=TIMEOUT).connect()
        assert time.monotonic() - start < 2


def test_server_hanging_up_is_unavailable():
    with scripted_server(lambda conn: None) as port:
        with pytest.raises(BackendUnavailableError, match="closed the connection"):
            TcpStoreClient("127.0.0.1", port, timeout=TIMEOUT).connect()


def _handshake_then(after):
    def respond(conn: socket.socket) -> None:
        data = b""
        while len(data) < 10:
            data += conn.recv(64)
        conn.sendall(data[6:10])  # echo the PING nonce
        after(conn)

    return respond


def test_server_without_list_keys_is_unsupported():
    # An older server drops the connection on an opcode it does not know.
    def drop_on_request(conn: socket.socket) -> None:
        conn.recv(64)

    with scripted_server(_handshake_then(drop_on_request)) as port:
        with TcpStoreClient("127.0.0.1", port, timeout=TIMEOUT) as client:
            with pytest.raises(UnsupportedOperationError, match="cannot list keys"):
                client.list_keys()


def test_a_silent_reply_times_out_and_the_next_request_reconnects():
    def silent(conn: socket.socket) -> None:
        conn.recv(64)
        time.sleep(1.0)

    with scripted_server(_handshake_then(silent)) as port:
        client = TcpStoreClient("127.0.0.1", port, timeout=0.3)
        start = time.monotonic()
        with pytest.raises(BackendTimeoutError, match="did not reply within 0.3 s"):
            client.get("/k")
        assert time.monotonic() - start < 1.0
        with pytest.raises(BackendTimeoutError):
            client.get("/k")  # a fresh connection and handshake, timed out again
        client.close()


def test_a_trickling_reply_still_honours_the_deadline():
    def trickle(conn: socket.socket) -> None:
        conn.recv(64)  # CHECK
        conn.sendall(b"\x00")
        conn.recv(64)  # GET
        conn.sendall(struct.pack("<Q", 100))
        for _ in range(20):
            conn.sendall(b"x")
            time.sleep(0.1)

    with scripted_server(_handshake_then(trickle)) as port:
        client = TcpStoreClient("127.0.0.1", port, timeout=0.5)
        start = time.monotonic()
        with pytest.raises(BackendTimeoutError):
            client.get("/k")
        assert time.monotonic() - start < 1.0
        client.close()


def test_unresolvable_host_is_unavailable():
    with pytest.raises(BackendUnavailableError, match="cannot resolve"):
        TcpStoreClient("no-such-host.invalid", 29400, timeout=TIMEOUT).connect()


@pytest.mark.parametrize("port", [0, 70000])
def test_bad_port_is_a_config_error(port):
    with pytest.raises(BackendConfigError):
        TcpStoreClient("127.0.0.1", port)
