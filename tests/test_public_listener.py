"""The daemon's public listener (issue 17): refused requests counted and
logged in summary, ``/metrics`` and ``/readyz``'s detail for trusted clients
only, and no version in any ``Server`` header.

In-process where a clock must be moved (the summary line is due after a
minute), a real ``talkbridge run`` otherwise; every request is real HTTP.
"Not local" is a client connecting from 127.0.0.2 to a daemon whose
``MetricsFrom`` is 127.0.0.1 alone: the server sees that address as the peer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest
import redis as sync_redis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from adapters.nctalk_bot import TalkBot
from bridge.bus import Bus, BusSettings
from bridge.config import ConfigError
from bridge.daemon import adapter_context
from bridge.http import Refusal, StatusAccess, build_app
from bridge.idmap import IdMap
from bridge.keys import log_key
from bridge.listener import Listener, ListenerLimits
from bridge.metrics import Metrics
from bridge.rejections import RejectionLog
from tests.helpers import ConfigToml, Daemon, RedisServer, TomlValue, free_port, metric, wait_for, wait_quiet
from tests.ingress_props import PROPS, exchange, header_names, header_values
from tests.talkbot_rig import bot_section, write_config

BOT = "nctalkbot.cloud"
METRICS_TOKEN = "metrics-token-" + "m" * 20
FORGED = 500  # forged webhooks in a burst


def forged_headers(i: int) -> dict[str, str]:
    """Well-formed headers whose signature is not the secret's."""
    return {"X-Nextcloud-Talk-Random": f"{i:064x}", "X-Nextcloud-Talk-Signature": "0" * 64}


def rejected(metrics_text: str, account: str, reason: str) -> float:
    prefix = f'talkbridge_ingress_rejected_total{{account="{account}",reason="{reason}"}} '
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


class Records(logging.Handler):
    """WARNING and above, from every logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# in-process: the Talk bot's webhook on the daemon's app, with a clock of our own ----------------------
@dataclass
class Served:
    listener: Listener
    metrics: Metrics
    rejections: RejectionLog
    clock: Clock

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.port}/webhook/nextcloud/cloud"


@pytest.fixture
async def served(tmp_path: Path, redis: Redis) -> AsyncIterator[Served]:
    config = write_config(tmp_path / "talkbridge.toml", bot_section("cloud", "http://127.0.0.1:9"))
    bus = Bus(redis, BusSettings())
    metrics = Metrics()
    clock = Clock()
    rejections = RejectionLog(logging.getLogger("talkbridge.rejections"), clock=clock)
    ctx = adapter_context(
        config, BOT, redis, bus.publish, metrics, bus.prefix, IdMap(redis, bus.prefix, 3600), rejections=rejections
    )
    adapter = TalkBot(ctx)

    async def ready() -> tuple[bool, dict]:
        return True, {}

    async def refresh() -> None:
        return None

    app = build_app(metrics, ready, refresh, adapter.ingress_routes(), 1 << 20, rejections=rejections)
    listener = Listener(app, "test", ListenerLimits())
    await listener.start("127.0.0.1", 0)
    try:
        yield Served(listener, metrics, rejections, clock)
    finally:
        await listener.cleanup()


async def forge(url: str, count: int, start: int = 0, **extra: str) -> list[int]:
    async with aiohttp.ClientSession() as session:
        statuses = []
        for i in range(start, start + count):
            async with session.post(url, data=b'{"type":"Create"}', headers={**forged_headers(i), **extra}) as resp:
                await resp.read()
                statuses.append(resp.status)
        return statuses


def rejected_in(metrics: Metrics, account: str, reason: str) -> float:
    return metric(metrics, "talkbridge_ingress_rejected_total", account=account, reason=reason)


async def test_a_burst_of_forged_webhooks_is_counted_each_and_logged_in_two_lines(
    served: Served, records: Records
) -> None:
    assert set(await forge(served.url, FORGED)) == {401}
    assert rejected_in(served.metrics, BOT, "bad_signature") == FORGED  # the metric counts every one
    [first] = records.lines()  # the first at once: a wrong BotSecret shows within the second
    assert first.startswith(f"{BOT}: webhook refused (bad_signature) from 127.0.0.1: 401: signature does not match")
    assert records.records[0].account == BOT  # type: ignore[attr-defined]  # filed under the account in the log stream

    served.clock.now += 59.0
    served.rejections.flush()
    assert len(records.records) == 1  # not due yet
    served.clock.now += 1.0
    served.rejections.flush()
    assert records.lines()[1:] == [
        f"{BOT}: {FORGED - 1:,} webhooks refused (bad_signature) in the last 60 s; "
        "last from 127.0.0.1: 401: signature does not match (check BotSecret)"
    ]
    served.rejections.flush()  # said once
    assert len(records.records) == 2

    # another cause is its own kind: its first line at once
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(served.url, data=b"{}") as resp:
                assert resp.status == 401
    assert records.lines()[-1].startswith(f"{BOT}: webhook refused (missing_signature) from 127.0.0.1")
    assert rejected_in(served.metrics, BOT, "missing_signature") == 3

    # a kind quiet for a whole period starts over: its next refusal is said at once
    served.clock.now += 60.0
    served.rejections.flush()  # the 2 missing_signature ones after the first
    assert "2 webhooks refused (missing_signature)" in records.lines()[-1]
    served.clock.now += 60.0
    served.rejections.flush()
    before = len(records.records)
    await forge(served.url, 1, start=FORGED)
    assert len(records.records) == before + 1
    assert records.lines()[-1].startswith(f"{BOT}: webhook refused (bad_signature) from 127.0.0.1")


def test_a_rejection_log_is_bounded_by_kinds_not_by_requests() -> None:
    """Fifty thousand refusals of three kinds over ten minutes: at most two lines per kind per minute."""
    clock = Clock()
    log = logging.getLogger("test.rejections")
    handler = Records()
    log.addHandler(handler)
    try:
        rejections = RejectionLog(log, clock=clock)
        for i in range(50_000):
            clock.now += 600 / 50_000
            rejections.note(f"nctalkbot.b{i % 3}", "webhook", "bad_signature", "x" * 10_000, "10.0.0.5\n")
            if i % 1000 == 0:
                rejections.flush()
        rejections.flush(force=True)
    finally:
        log.removeHandler(handler)
    assert rejections.pending() == 0
    lines = handler.lines()
    assert 3 * 10 <= len(lines) <= 3 * (1 + 11)
    summaries = [line.split(": ", 1)[1] for line in lines if " in the last " in line]
    counted = sum(int(summary.split(" ", 1)[0].replace(",", "")) for summary in summaries)
    assert counted + 3 == 50_000  # every refusal is in a line: 3 firsts, the rest summed
    assert all(len(line) < 500 and "\n" not in line for line in lines)  # details and peers cut to one short line


# a real daemon ---------------------------------------------------------------------------------
@dataclass
class Running:
    daemon: Daemon
    http: int
    api: int
    admin: int
    redis: sync_redis.Redis

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"


def daemon_config(
    tmp_path: Path, redis_url: str, http: int, api: int, admin: int, extra_http: dict[str, TomlValue] | None = None
) -> Path:
    config = ConfigToml().raw(bot_section("cloud", "http://127.0.0.1:9")).api("a", api, "api-token")
    config.gateway("g", (BOT, "*"), ("api.a", "api"))
    config.daemon(redis_url, http, http=extra_http, LeaseSeconds=2)
    config.section("admin", BindAddress=f"127.0.0.1:{admin}", User="ops", Password="a-long-enough-password")
    return config.write(tmp_path / "talkbridge.toml")


@pytest.fixture
def running(tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[Running]:
    extra = getattr(request, "param", None)
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    http, api, admin = free_port(), free_port(), free_port()
    config = daemon_config(tmp_path, redis_server.url, http, api, admin, extra)
    daemon = Daemon(config, http, tmp_path / "daemon.log").start()
    try:
        yield Running(daemon, http, api, admin, client)
    finally:
        daemon.stop()
        client.close()


def log_entries(client: sync_redis.Redis) -> list[str]:
    return [fields[b"message"].decode() for _id, fields in client.xrange(log_key("tb"))]


def test_a_flood_of_forged_webhooks_leaves_the_fleet_log_stream_alone(running: Running) -> None:
    """3,000 forged webhooks once pushed every real warning out of the Logs view."""
    url = running.url("/webhook/nextcloud/cloud")
    with httpx.Client(timeout=10) as client:
        for i in range(FORGED):
            assert client.post(url, content=b"{}", headers=forged_headers(i)).status_code == 401

    def counted() -> float:
        return rejected(httpx.get(running.url("/metrics"), timeout=5).text, BOT, "bad_signature")

    wait_for(lambda: counted() == FORGED, what="every forged webhook counted")
    # a window: no message a test can send is logged in order after the refusals' lines
    entries = wait_quiet(lambda: log_entries(running.redis), what="the log stream settles")
    about = [e for e in entries if "webhook" in e]  # type: ignore[union-attr]
    assert len(about) == 1 and about[0].startswith(f"{BOT}: webhook refused (bad_signature) from 127.0.0.1")

    assert running.daemon.stop() == 0  # what was counted and not yet said is said at shutdown
    about = [e for e in log_entries(running.redis) if "webhook" in e]
    assert len(about) == 2
    assert about[1].startswith(f"{BOT}: {FORGED - 1:,} webhooks refused (bad_signature) in the last ")


class FromAddress(httpx.HTTPTransport):
    """Connections from a chosen local address (127.0.0.2: not 127.0.0.1 to the server)."""

    def __init__(self, address: str) -> None:
        super().__init__(local_address=address)


def get(url: str, source: str = "127.0.0.1", **headers: str) -> httpx.Response:
    with httpx.Client(transport=FromAddress(source), timeout=5) as client:
        return client.get(url, headers=headers)


def assert_tells_nothing(resp: httpx.Response) -> None:
    for word in ("cloud", "api.a", "talkbridge_", "tb:", "connected", "owned", "redis", "Python", "aiohttp"):
        assert word not in resp.text, (word, resp.text)


@pytest.mark.parametrize("running", [{"MetricsFrom": ["127.0.0.1"], "MetricsToken": METRICS_TOKEN}], indirect=True)
def test_metrics_and_readiness_detail_are_for_trusted_clients_only(running: Running) -> None:
    metrics, readyz = running.url("/metrics"), running.url("/readyz")
    bearer = f"Bearer {METRICS_TOKEN}"
    # from an address MetricsFrom trusts
    assert get(metrics).status_code == 200 and "talkbridge_events_in" in get(metrics).text
    assert set(get(readyz).json()["accounts"]) == {BOT, "api.a"}

    # from elsewhere: /metrics refused with the reason, /readyz one bit
    refused = get(metrics, "127.0.0.2")
    assert refused.status_code == 403 and refused.json()["error"].startswith("/metrics: served to clients in")
    assert_tells_nothing(refused)
    ready = get(readyz, "127.0.0.2")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    assert_tells_nothing(ready)

    # elsewhere with the token: everything; a wrong token: 401
    assert get(metrics, "127.0.0.2", Authorization=bearer).status_code == 200
    assert set(get(readyz, "127.0.0.2", Authorization=bearer).json()["accounts"]) == {BOT, "api.a"}
    wrong = get(metrics, "127.0.0.2", Authorization="Bearer " + "x" * 34)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert_tells_nothing(wrong)
    assert get(readyz, "127.0.0.2", Authorization="Bearer nope").json() == {"ready": True}

    # a trusted address, but relayed by a proxy for someone unknown: not trusted without the token
    proxied = get(metrics, **{"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 403 and "forwarded" in proxied.json()["error"]
    assert get(readyz, **{"X-Real-IP": "203.0.113.9"}).json() == {"ready": True}
    assert get(metrics, **{"X-Forwarded-For": "203.0.113.9", "Authorization": bearer}).status_code == 200

    text = get(metrics).text
    assert rejected(text, "http", "not_allowed") == 1
    assert rejected(text, "http", "bad_token") == 1
    assert rejected(text, "http", "forwarded") == 1


def test_by_default_a_proxied_client_gets_neither_metrics_nor_detail(running: Running) -> None:
    """The default (loopback, no token) keeps Prometheus on 127.0.0.1 and the health checks working."""
    assert get(running.url("/metrics")).status_code == 200
    for header in ("Forwarded", "X-Forwarded-For", "X-Real-IP"):
        refused = get(running.url("/metrics"), **{header: "for=198.51.100.7"})
        assert refused.status_code == 403
        assert_tells_nothing(refused)
        ready = get(running.url("/readyz"), **{header: "198.51.100.7"})
        assert ready.status_code == 200 and ready.json() == {"ready": True}
    bearer = get(running.url("/metrics"), Authorization="Bearer anything-at-all-here")
    assert bearer.status_code == 401  # no MetricsToken: no bearer is right


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str]]:
    resp = exchange(port, data)
    return resp.status, resp.headers


def stream_head(port: int, path: str, headers: str) -> dict[str, str]:
    """The head of an endless answer (/api/stream)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            assert chunk, buf
            buf += chunk
    lines = buf.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    assert " 200 " in lines[0] + " ", lines[0]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}


WEBHOOK_WITHOUT_SIGNATURE = (
    b"POST /webhook/nextcloud/cloud HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
)


def test_no_server_header_names_python_or_aiohttp(running: Running) -> None:
    """Every listener the daemon opens: the shared one, an api account's, the management page's."""
    auth = "Authorization: Bearer api-token\r\n"
    exchanges = {
        "healthz": (running.http, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "metrics": (running.http, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "metrics refused": (running.http, b"GET /metrics HTTP/1.1\r\nX-Real-IP: 1.2.3.4\r\nConnection: close\r\n\r\n"),
        "unknown": (running.http, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "webhook refused": (running.http, WEBHOOK_WITHOUT_SIGNATURE),
        "malformed": (running.http, b"GET /healthz HTTP/1.1\r\nBad Name: v\r\nConnection: close\r\n\r\n"),
        "api health": (running.api, f"GET /api/health HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode()),
        "api refused": (running.api, b"GET /api/health HTTP/1.1\r\nConnection: close\r\n\r\n"),
        "api malformed": (running.api, b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
        "admin login": (running.admin, b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "admin page": (running.admin, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    }
    seen = {}
    for name, (port, data) in exchanges.items():
        status, headers = raw_exchange(port, data)
        seen[name] = (status, headers.get("server"))
    seen["api stream"] = (200, stream_head(running.api, "/api/stream", auth).get("server"))
    assert {name: server for name, (_status, server) in seen.items()} == dict.fromkeys(seen, "talkbridge"), seen
    assert seen["malformed"][0] == 400 and seen["api malformed"][0] == 400 and seen["unknown"][0] == 404


# Hypothesis: any Authorization, any forwarding header, on both routes ---------------------------------
ACCOUNT_SECRETS = ("nctalkbot.hidden-name", "host-7-pid-4242", "Error 111 connecting")


@pytest.fixture(scope="module")
def status_listener() -> Iterator[int]:
    """build_app with MetricsToken set, on a real port, on its own loop in a thread."""
    loop = asyncio.new_event_loop()
    started: asyncio.Future[Listener] = loop.create_future()
    stop = asyncio.Event()

    async def readiness() -> tuple[bool, dict]:
        return False, {"redis": ACCOUNT_SECRETS[2], "accounts": {ACCOUNT_SECRETS[0]: f"owned by {ACCOUNT_SECRETS[1]}"}}

    async def refresh() -> None:
        return None

    async def serve() -> None:
        metrics = Metrics()
        metrics.events_in.labels(ACCOUNT_SECRETS[0]).inc()
        access = StatusAccess(token=METRICS_TOKEN)
        app = build_app(metrics, readiness, refresh, [], 1 << 20, access=access)
        listener = Listener(app, "props", ListenerLimits())
        await listener.start("127.0.0.1", 0)
        started.set_result(listener)
        await stop.wait()
        await listener.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    port = wait_for(lambda: started.done() and started.result().port, what="the listener")
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


AUTHORIZATIONS = st.one_of(
    st.none(),
    st.just(f"Bearer {METRICS_TOKEN}".encode()),
    st.just(f"bearer {METRICS_TOKEN}".encode()),
    st.just(f"Bearer  {METRICS_TOKEN} ".encode()),
    st.just(f"Bearer {METRICS_TOKEN}x".encode()),
    st.just(f"Bearer {METRICS_TOKEN[:-1]}".encode()),
    st.just(f"Basic {METRICS_TOKEN}".encode()),
    header_values().map(lambda v: b"Bearer " + v),
    header_values(),
)
FORWARDING = st.lists(
    st.tuples(st.sampled_from([b"Forwarded", b"X-Forwarded-For", b"X-Real-IP", b"x-real-ip"]), header_values()),
    max_size=2,
)
OTHERS = st.lists(
    st.tuples(header_names(), header_values()).filter(
        lambda h: h[0].lower() not in (b"authorization", b"forwarded", b"x-forwarded-for", b"x-real-ip", b"expect")
    ),
    max_size=3,
)


def trusted(authorization: bytes | None, forwarding: list[tuple[bytes, bytes]]) -> bool:
    """The rule, as docs/operations.md states it (the client is 127.0.0.1, in the default MetricsFrom)."""
    if authorization is not None:
        value = authorization.strip(b" \t")
        if value[:7].lower() == b"bearer ":
            return value[7:].strip(b" \t") == METRICS_TOKEN.encode()
    return not forwarding


@PROPS
@given(path=st.sampled_from(["/metrics", "/readyz"]), authorization=AUTHORIZATIONS, forwarding=FORWARDING,
       others=OTHERS)  # fmt: skip
def test_status_routes_serve_their_detail_to_trusted_clients_only(
    status_listener: int,
    path: str,
    authorization: bytes | None,
    forwarding: list[tuple[bytes, bytes]],
    others: list[tuple[bytes, bytes]],
) -> None:
    headers = list(others) + list(forwarding)
    if authorization is not None:
        headers.append((b"Authorization", authorization))
    head = b"\r\n".join([f"GET {path} HTTP/1.1".encode(), b"Host: x", *(n + b": " + v for n, v in headers)])
    resp = exchange(status_listener, head + b"\r\nConnection: close\r\n\r\n")
    assert resp.headers.get("server") == "talkbridge"
    if resp.status == 400:  # aiohttp's parser refused a header: refused before any route, with a reason
        assert b"malformed request" in resp.body
        return
    ok = trusted(authorization, forwarding)
    if path == "/readyz":
        assert resp.status == 503  # the status for everyone
        body = json.loads(resp.body)
        assert (set(body) == {"ready", "redis", "accounts"}) if ok else (body == {"ready": False})
    elif ok:
        assert resp.status == 200 and b"talkbridge_events_in_total" in resp.body
    else:
        assert resp.status in (401, 403) and json.loads(resp.body)["error"].startswith("/metrics: ")
    if not ok:
        assert not any(secret.encode() in resp.body for secret in ACCOUNT_SECRETS)


# configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "http, problem",
    [
        ('MetricsFrom = ["10.0.0.0/8", "localhost"]', 'http.MetricsFrom: "localhost" is not an IP address or network'),
        ("MetricsFrom = [10]", "http.MetricsFrom: must be a list of strings"),
        ('MetricsFrom = "127.0.0.1"', "http.MetricsFrom: must be a list"),
        ('MetricsToken = "short-secret"', "http.MetricsToken: must be 16 or more printable ASCII characters"),
        ('MetricsToken = "sixteen chars and spaces"', "http.MetricsToken: must be 16 or more printable ASCII"),
    ],
)
def test_bad_status_access_settings_name_the_key_and_never_the_token(tmp_path: Path, http: str, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        write_config(tmp_path / "talkbridge.toml", bot_section("cloud", "http://127.0.0.1:9") + f"[http]\n{http}\n")
    [line] = refused.value.problems
    assert line.startswith(problem), line
    assert "short-secret" not in line and "sixteen chars" not in line


def test_status_access_is_read_from_the_config(tmp_path: Path) -> None:
    http = f'MetricsFrom = ["10.1.2.3", "fd00::/8"]\nMetricsToken = "{METRICS_TOKEN}"\n'
    config = write_config(tmp_path / "talkbridge.toml", bot_section("cloud", "http://127.0.0.1:9") + f"[http]\n{http}")
    access = StatusAccess.from_section(config.http)
    assert [str(n) for n in access.networks] == ["10.1.2.3/32", "fd00::/8"] and access.token == METRICS_TOKEN
    default = write_config(tmp_path / "default.toml", bot_section("cloud", "http://127.0.0.1:9"))
    assert StatusAccess.from_section(default.http) == StatusAccess()  # loopback, no token
    assert StatusAccess().refusal("::ffff:127.0.0.1", {}) is None  # a dual-stack listener's IPv4 loopback client
    assert StatusAccess().refusal("192.0.2.7", {}) == Refusal(
        403, "not_allowed", "served to clients in [http] MetricsFrom"
    )
