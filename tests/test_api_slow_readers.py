"""Readers of an ``api`` account cannot hold it: one that stops reading is cut
off and loses nothing; one token holder cannot take every connection
(``talkbridge run`` as a real process, real sockets over loopback).

A *stalled* reader here is a real TCP client with a small receive buffer that
sends its request and never reads: once the kernels' buffers are full, the
server's writes to it cannot complete. Messages are large (200 kB) so that
happens after a few of them.

Three accounts in one gateway: ``a`` sends; ``b`` gives a stalled client a
minute (``WriteTimeoutSeconds = 60``), so anything its live reader receives
meanwhile cannot be explained by the stalled one being cut off; ``c`` gives
one second. ``b`` allows 3 streams per client address, ``a`` the default.
"""

from __future__ import annotations

import asyncio
import io
import json
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from hypothesis import given
from hypothesis import strategies as st

from adapters.api.adapter import MAX_STREAMS_PER_CLIENT
from bridge.addresses import client_key, is_loopback
from bridge.cli import main
from bridge.keys import account_key
from tests.helpers import ConfigToml, Daemon, RedisServer, free_port, wait_for, wait_quiet

BIG = 200_000  # characters of text per large message
SMALL_RCVBUF = 4096
OTHER_CLIENT = "127.0.0.2"  # another loopback address: another client
UPGRADE = (
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


class Account:
    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer token-{name}"}
        self.buffer = account_key("tb", f"api.{name}", "apibuf")

    def request(self, path: str, extra: str = "") -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer token-{self.name}\r\n{extra}\r\n"
        ).encode()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[tuple]:
    tmp_path = tmp_path_factory.mktemp("slow-readers")
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    pa, pb, pc, http = free_port(), free_port(), free_port(), free_port()
    config = ConfigToml().api("a", pa, "token-a").api("b", pb, "token-b", WriteTimeoutSeconds=60, MaxStreamsPerClient=3)
    config.api("c", pc, "token-c", WriteTimeoutSeconds=1)
    config.gateway("g", ins=[("api.a", "api")], outs=[("api.b", "api"), ("api.c", "api")])
    path = config.daemon(redis_server.url, http, LeaseSeconds=3).write(tmp_path / "talkbridge.toml")
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        yield Account("a", pa), Account("b", pb), Account("c", pc), daemon, client
    finally:
        daemon.stop()
        client.close()


@pytest.fixture
def accounts(bridge) -> Iterator[tuple]:
    """The module's daemon with b's and c's buffers empty at the start of a test."""
    _a, b, c, daemon, _client = bridge
    for account in (b, c):
        httpx.get(f"{account.base}/api/messages", headers=account.headers, timeout=10).raise_for_status()
    yield bridge
    assert "Traceback" not in daemon.log()


def post(a: Account, text: str) -> None:
    resp = httpx.post(f"{a.base}/api/message", json={"text": text, "username": "u", "gateway": "g"},
                      headers=a.headers, timeout=10)  # fmt: skip
    assert resp.status_code == 200, resp.text


def stalled(account: Account, path: str, extra: str = "", source: str = "127.0.0.1") -> socket.socket:
    """A client that sends its request and never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", account.port))
    sock.sendall(account.request(path, extra))
    return sock


def last_id(client: sync_redis.Redis, stream: str) -> bytes:
    try:
        return client.xinfo_stream(stream)["last-generated-id"]
    except sync_redis.ResponseError:  # no such stream yet
        return b"0-0"


def stall(a: Account, account: Account, client: sync_redis.Redis) -> list[str]:
    """Post large messages, each once it reached the buffer, until the stalled
    reader of ``account`` stops taking them: two rows or more wait there (the
    page it cannot write and one more) and nothing changes for a second.
    Returns the texts then in the buffer, oldest first."""
    for n in range(200):
        since = last_id(client, account.buffer)
        post(a, f"big {n} " + "x" * BIG)
        wait_for(lambda since=since: last_id(client, account.buffer) != since, what="the message delivered")
        if client.xlen(account.buffer) >= 2:
            # a stall is a standstill: only a window shows it (a sentinel would stall in the buffer too)
            rows = wait_quiet(lambda: client.xrange(account.buffer), what=f"{account.name}'s buffer")
            if len(rows) >= 2:
                return [json.loads(fields[b"d"])["text"] for _id, fields in rows]
    raise AssertionError(f"the reader of {account.name} took 200 large messages: it never stalled")


async def next_line(stream: httpx.Response, lines) -> dict:
    return json.loads(await asyncio.wait_for(anext(lines), 15))  # the deadline bounds a failure only


def closed(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    sock.close()


@pytest.mark.parametrize("path", ["/api/stream", "/api/websocket"])
async def test_a_stalled_reader_does_not_stall_a_live_one(accounts, path: str) -> None:
    a, b, _c, _daemon, client = accounts
    extra = UPGRADE if path == "/api/websocket" else ""
    sock = stalled(b, path, extra)
    try:
        buffered = stall(a, b, client)
        async with (
            httpx.AsyncClient(timeout=15) as http,
            http.stream("GET", f"{b.base}/api/stream", headers=b.headers) as live,
        ):
            lines = live.aiter_lines()
            assert (await next_line(live, lines))["event"] == "api_connected"
            # a new message reaches the live reader while the stalled one still
            # holds its page (b gives it a minute), after what it does not hold
            post(a, "while one reader is stalled")
            got: list[str] = []
            while not got or got[-1] != "while one reader is stalled":
                got.append((await next_line(live, lines))["text"])
            assert client.xlen(b.buffer) >= 1  # the stalled reader's page: still kept
            # the stalled reader goes away: its page goes to the live reader, once
            closed(sock)
            while len(got) < len(buffered) + 1:
                got.append((await next_line(live, lines))["text"])
        expected = [*buffered, "while one reader is stalled"]
        assert sorted(got) == sorted(expected), ([t[:8] for t in got], [t[:8] for t in buffered])  # none lost or twice
    finally:
        sock.close()


@pytest.mark.parametrize("path", ["/api/stream", "/api/websocket"])
async def test_a_stalled_reader_is_cut_off_and_its_page_goes_to_the_next(accounts, path: str) -> None:
    a, _b, c, daemon, client = accounts
    extra = UPGRADE if path == "/api/websocket" else ""
    cut_off = "took nothing for 1 s: disconnected"
    earlier = daemon.log().count(cut_off)
    sock = stalled(c, path, extra)
    try:
        buffered = stall(a, c, client)
        # c gives a stalled client a second: it is cut off, its page stays
        wait_for(lambda: daemon.log().count(cut_off) > earlier, what="the stalled reader cut off")
        async with (
            httpx.AsyncClient(timeout=15) as http,
            http.stream("GET", f"{c.base}/api/stream", headers=c.headers) as live,
        ):
            lines = live.aiter_lines()
            assert (await next_line(live, lines))["event"] == "api_connected"
            got = [(await next_line(live, lines))["text"] for _ in buffered]
        assert got == buffered  # in the buffer's order, nothing lost, nothing twice
    finally:
        sock.close()


def test_an_abandoned_messages_request_loses_nothing(accounts) -> None:
    a, b, _c, _daemon, client = accounts
    for i in range(40):  # 8 MB of answer: more than the kernels' buffers take
        post(a, f"kept {i} " + "x" * BIG)
    wait_for(lambda: client.xlen(b.buffer) == 40, what="40 messages in b's buffer")
    before = [json.loads(fields[b"d"])["text"] for _id, fields in client.xrange(b.buffer)]
    sock = stalled(b, "/api/messages")
    try:
        # the answer has begun: its first bytes are here, the rest cannot follow
        assert sock.recv(16).startswith(b"HTTP/1.1 200")
    finally:
        closed(sock)  # the client gives up mid-answer
    got: list[dict] = []

    def answered() -> bool:
        got.extend(httpx.get(f"{b.base}/api/messages", headers=b.headers, timeout=30).json())
        return bool(got)

    wait_for(answered, what="the kept messages")
    assert [m["text"] for m in got] == before  # the first answer was not written: all kept, in order
    assert client.xlen(b.buffer) == 0  # written this time: taken


def test_polling_an_empty_buffer_answers_an_empty_list_and_nothing_else(accounts) -> None:
    """Many clients poll /api/messages every second (Matterbridge issue #1983):
    an empty answer deletes nothing, and so cannot fail and log doing it."""
    _a, b, _c, daemon, client = accounts
    assert client.xlen(b.buffer) == 0
    for _ in range(3):
        resp = httpx.get(f"{b.base}/api/messages", headers=b.headers, timeout=10)
        assert resp.status_code == 200 and resp.json() == []
    assert "cannot delete" not in daemon.log()


def test_an_unauthorized_client_holds_no_stream_slot(accounts) -> None:
    _a, b, _c, _daemon, _client = accounts
    for _ in range(5):  # more than b's 3: refused before a slot is counted
        resp = httpx.get(f"{b.base}/api/stream", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert resp.status_code == 401


def open_stream(account: Account, path: str, source: str = "127.0.0.1") -> tuple[bytes, socket.socket]:
    """A stream or socket opened from ``source``: the answer's head, and the connection."""
    sock = socket.create_connection(("127.0.0.1", account.port), timeout=15, source_address=(source, 0))
    sock.sendall(account.request(path, UPGRADE if path == "/api/websocket" else ""))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    return head, sock


def test_one_client_holds_at_most_max_streams_per_client(accounts) -> None:
    _a, b, _c, _daemon, _client = accounts
    held: list[socket.socket] = []

    def opened(path: str, source: str = "127.0.0.1") -> bytes:
        head, sock = open_stream(b, path, source)
        held.append(sock)
        return head

    try:
        for path in ("/api/stream", "/api/websocket", "/api/stream"):
            head = opened(path)
            assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 101")), head
        for path in ("/api/stream", "/api/websocket"):  # a fourth of either kind: refused, with the reason
            head = opened(path)
            assert head.startswith(b"HTTP/1.1 429 ") and b"MaxStreamsPerClient" in head, head
        # meanwhile: health, another client's stream, and a drain of the buffer from this one
        health = httpx.get(f"{b.base}/api/health", headers=b.headers, timeout=5)
        assert (health.status_code, health.text) == (200, "OK")
        assert opened("/api/stream", source=OTHER_CLIENT).startswith(b"HTTP/1.1 200")
        assert httpx.get(f"{b.base}/api/messages", headers=b.headers, timeout=5).json() == []
        # one of the three closes: its slot comes free (the server notices within a second)
        held[0].close()
        wait_for(lambda: opened("/api/stream").startswith(b"HTTP/1.1 200"), what="the closed stream's slot")
    finally:
        for sock in held:
            sock.close()


async def test_a_thousand_websockets_from_one_token_holder_leave_the_listener_open(accounts) -> None:
    """The issue's case: 1,000 WebSockets with a valid token filled the
    listener, and the 1,001st connection, /api/health included, was refused."""
    a, _b, _c, _daemon, _client = accounts
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1200
    assert hard == resource.RLIM_INFINITY or hard >= need, f"hard file limit {hard} < {need}: raise it to run this"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    gate = asyncio.Semaphore(100)
    held: list[asyncio.StreamWriter] = []

    async def one() -> bytes:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            held.append(writer)
            writer.write(a.request("/api/websocket", UPGRADE))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        return head.split(b" ", 2)[1]

    try:
        statuses = await asyncio.gather(*(one() for _ in range(1000)))
        assert statuses.count(b"101") == MAX_STREAMS_PER_CLIENT
        assert statuses.count(b"429") == 1000 - MAX_STREAMS_PER_CLIENT
        async with httpx.AsyncClient(timeout=10) as http:
            health = await http.get(f"{a.base}/api/health", headers=a.headers)
            assert (health.status_code, health.text) == (200, "OK")
        head, sock = await asyncio.to_thread(open_stream, a, "/api/websocket", OTHER_CLIENT)
        sock.close()
        assert head.startswith(b"HTTP/1.1 101"), head
    finally:
        for writer in held:
            writer.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# check-config ------------------------------------------------------------------------------

OPEN_ACCOUNT = """
[api.x]
BindAddress = "{bind}"
Token = "{token}"
[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "api.x"
channel = "api"
"""


@pytest.mark.parametrize(
    ("bind", "token", "warned"),
    [
        ("0.0.0.0:4242", "", True),
        (":4242", "", True),
        ("[::]:4242", "", True),
        ("192.0.2.7:4242", "", True),
        ("bridge.example:4242", "", True),
        ("127.0.0.1:4242", "", False),
        ("127.0.0.53:4242", "", False),
        ("[::1]:4242", "", False),
        ("localhost:4242", "", False),
        ("0.0.0.0:4242", "a-token", False),
    ],
)
def test_check_config_warns_of_an_api_account_open_to_all(tmp_path: Path, bind: str, token: str, warned: bool) -> None:
    path = tmp_path / "talkbridge.toml"
    path.write_text(OPEN_ACCOUNT.format(bind=bind, token=token))
    out = io.StringIO()
    assert main(["check-config", str(path)], out=out) == 0
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning: api.x.Token:")]
    assert bool(warnings) == warned, out.getvalue()
    if warned:
        assert f'"{bind}"' in warnings[0] and "set a Token" in warnings[0]


@given(st.ip_addresses())
def test_client_key_is_an_address_or_its_ipv6_slash_64(address) -> None:
    key = client_key(str(address))
    if address.version == 4 or address.ipv4_mapped is not None:
        assert key == str(address if address.version == 4 else address.ipv4_mapped)
    else:
        assert key.endswith("/64")
        assert key == client_key(str(address.__class__(int(address) ^ 0xFFFF)))  # same /64, same client
        assert key != client_key(str(address.__class__(int(address) ^ (1 << 64))))  # another /64, another


@given(st.ip_addresses())
def test_is_loopback_is_the_address_s_own_answer(address) -> None:
    mapped = getattr(address, "ipv4_mapped", None)
    assert is_loopback(str(address)) == (mapped or address).is_loopback


@given(st.text(max_size=60))
def test_client_key_and_is_loopback_take_any_text(text: str) -> None:
    assert isinstance(client_key(text), str)
    assert is_loopback(text) in (True, False)
