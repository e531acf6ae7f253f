"""The daemon as a user runs it: ``talkbridge run`` with two Matterbridge api accounts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from bridge.keys import account_key, outbound_key
from tests.helpers import Daemon, RedisServer, api_pair_config, wait_for


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {token}"}

    def post(self, **message) -> httpx.Response:
        return httpx.post(f"{self.base}/api/message", json=message, headers=self.headers, timeout=5)

    def messages(self) -> list[dict]:
        resp = httpx.get(f"{self.base}/api/messages", headers=self.headers, timeout=5)
        resp.raise_for_status()
        return resp.json()

    def wait_messages(self, count: int) -> list[dict]:
        got: list[dict] = []

        def enough() -> bool:
            try:
                got.extend(self.messages())
            except httpx.ConnectError:  # the account restarting (after a Redis outage): its port reopens
                return False
            return len(got) >= count

        wait_for(enough, what=f"{count} messages at {self.base}")
        return got


@contextlib.contextmanager
def running_bridge(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Api, Api, Daemon, sync_redis.Redis]]:
    """Two api accounts through a daemon process, on a flushed Redis."""
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    path, (pa, pb, http) = api_pair_config(tmp_path, redis_server.url)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        yield Api(pa, "token-a"), Api(pb, "token-b"), daemon, client
    finally:
        daemon.stop()
        client.close()


@pytest.fixture
def bridge(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Api, Api, Daemon, sync_redis.Redis]]:
    with running_bridge(tmp_path, redis_server) as running:
        yield running


def test_message_crosses_with_the_formatted_nick(bridge) -> None:
    a, b, _daemon, _ = bridge
    resp = a.post(text="hello", username="alice", userid="u1", gateway="g")
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["account"] == "api.a" and answer["channel"] == "api" and answer["id"]
    [got] = b.wait_messages(1)
    assert got["text"] == "hello"
    assert got["username"] == "[api/a] <alice> "
    assert got["userid"] == "u1" and got["gateway"] == "g" and got["account"] == "api.a" and got["protocol"] == "api"
    assert a.messages() == []  # never echoed back to the sender
    assert b.messages() == []  # /api/messages drained the buffer


def test_stream_delivers_line_by_line(bridge) -> None:
    a, b, _daemon, _ = bridge
    with httpx.stream("GET", f"{b.base}/api/stream", headers=b.headers, timeout=10) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert json.loads(next(lines))["event"] == "api_connected"
        for i in range(3):
            assert a.post(text=f"m{i}", username="alice", gateway="g").status_code == 200
        got = [json.loads(next(lines)) for _ in range(3)]
    assert [m["text"] for m in got] == ["m0", "m1", "m2"]
    assert {m["username"] for m in got} == {"[api/a] <alice> "}


def test_replies_edits_deletes_and_reactions_cross(bridge) -> None:
    a, b, _daemon, _ = bridge
    original = a.post(text="question", username="alice", gateway="g").json()
    [copy] = b.wait_messages(1)
    # b answers the copy; a sees the reply threaded on its own message id
    assert b.post(text="answer", username="bob", parent_id=copy["id"], gateway="g").status_code == 200
    [reply] = a.wait_messages(1)
    assert reply["parent_id"] == original["id"]
    # a edits and deletes its message; b sees both on the copy's id
    assert a.post(text="question, edited", username="alice", id=original["id"], gateway="g").status_code == 200
    assert a.post(event="msg_delete", id=original["id"], username="alice", gateway="g").status_code == 200
    edit, delete = b.wait_messages(2)
    assert (edit["event"], edit["id"], edit["text"]) == ("", copy["id"], "question, edited")
    assert (delete["event"], delete["id"]) == ("msg_delete", copy["id"])
    # b reacts to the reply's copy... the reply came from b, so react on a's side instead
    assert (
        a.post(event="reaction_add", text="👍", parent_id=reply["id"], username="alice", gateway="g").status_code == 200
    )
    [reaction] = b.wait_messages(1)
    assert reaction["event"] == "reaction_add" and reaction["text"] == "👍"


def test_every_route_needs_the_token(bridge) -> None:
    a, _b, _daemon, _ = bridge
    for path in ("/api/health", "/api/messages", "/api/stream"):
        assert httpx.get(a.base + path).status_code == 400
        assert httpx.get(a.base + path, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(a.base + "/api/health", headers=a.headers).text == "OK"


def test_buffer_survives_a_restart(bridge) -> None:
    a, b, daemon, client = bridge
    for i in range(5):
        assert a.post(text=f"kept{i}", username="alice", gateway="g").status_code == 200
    wait_for(lambda: client.xlen(account_key("tb", "api.b", "apibuf")) == 5, what="buffered messages")
    daemon.stop()
    daemon.start()
    assert [m["text"] for m in b.messages()] == [f"kept{i}" for i in range(5)]


def test_health_ready_and_metrics(bridge) -> None:
    a, b, daemon, _ = bridge
    base = f"http://127.0.0.1:{daemon.http_port}"
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(base + "/readyz").json()
    assert ready["ready"] is True and ready["accounts"] == {"api.a": "connected", "api.b": "connected"}
    a.post(text="count me", username="alice", gateway="g")
    b.wait_messages(1)
    # bumped after the delivery's ack round trip, which may end after the message is readable
    expected = [
        'talkbridge_events_in_total{account="api.a"} 1.0',
        'talkbridge_events_out_total{account="api.b"} 1.0',
        'talkbridge_delivery_latency_seconds_count{account="api.b"} 1.0',
        f'talkbridge_stream_pending{{stream="{outbound_key("tb", "api.b")}"}} 0.0',
        "talkbridge_dead_letter_length 0.0",
    ]
    wait_for(lambda: all(line in httpx.get(base + "/metrics").text for line in expected), what="the metrics")


def test_redis_down_answers_503_not_200(tmp_path: Path) -> None:
    from tests.helpers import start_redis_server

    server = start_redis_server(tmp_path)
    path, (pa, pb, http) = api_pair_config(tmp_path, server.url)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        a = Api(pa, "token-a")
        assert a.post(text="while up", username="alice", gateway="g").status_code == 200
        server.stop()
        resp = a.post(text="while down", username="alice", gateway="g")
        assert resp.status_code == 503  # never a 200 for a message that is not stored
        assert "retry later" in resp.json()["message"]
        ready = httpx.get(f"http://127.0.0.1:{http}/readyz")
        assert ready.status_code == 503 and ready.json()["redis"].startswith("unreachable")
        # Redis back (empty: a new server): the same daemon carries on by itself.
        server = start_redis_server(tmp_path, server.port)
        wait_for(lambda: a.post(text="after", username="alice", gateway="g").status_code == 200, what="recovery")
        b = Api(pb, "token-b")
        assert [m["text"] for m in b.wait_messages(1)][-1] == "after"
    finally:
        daemon.stop()
        server.stop()


def test_stopping_the_daemon_under_a_stream_reader_logs_no_traceback(tmp_path: Path) -> None:
    """SIGTERM with a client on /api/stream (the embedded Redis stops with the
    daemon): a clean exit, and no traceback from the reader's handler."""
    path, (_pa, pb, http) = api_pair_config(tmp_path, None)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    b = Api(pb, "token-b")
    try:
        with httpx.stream("GET", f"{b.base}/api/stream", headers=b.headers, timeout=30) as resp:
            lines = resp.iter_lines()
            assert json.loads(next(lines))["event"] == "api_connected"
            assert daemon.stop() == 0
    except httpx.RemoteProtocolError:
        pass  # the connection was cut as the listener closed: expected
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log() and " ERROR " not in daemon.log(), daemon.log()
