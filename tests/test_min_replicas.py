"""``[redis] MinReplicas`` (issue 20): an acknowledged write is on that many
replicas when the acknowledgement leaves, or the writer gets 503.

A real master and a real replica (``--replicaof``) on loopback; "the replica
is away" is the replica process stopped (SIGSTOP): connected, answering
nothing, as a replica behind a partition or a stalled disk looks to WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from adapters import AdapterRegistry
from bridge.adapter import Adapter, AdapterTraits
from bridge.bus import Bus, BusSettings, Write
from bridge.cli import protocol_specs
from bridge.config import ConfigError, load_config
from bridge.delivery import DeliveryLoop, RetryPolicy
from bridge.events import Delivery, Event, EventKind, event_from_wire
from bridge.groupcommit import GroupCommit, NotReplicated
from bridge.idmap import IdMap
from bridge.keys import account_key, inbound_key
from bridge.metrics import Metrics
from tests.helpers import ConfigToml, Daemon, RedisServer, free_port, metric, start_redis_server, wait_for
from tests.talkbot_rig import SECRET, bot_section, start_rig, until, write_config
from tests.talkserver import TalkServer, php_json_encode
from tests.talkserver.webhooks import signature, talk_random

LOG = logging.getLogger("test.min_replicas")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master and its replica, linked."""
    master = start_redis_server(tmp_path_factory.mktemp("master"))
    replica = start_redis_server(tmp_path_factory.mktemp("replica"), None, "--replicaof", "127.0.0.1", str(master.port))
    try:
        with sync_redis.Redis(port=master.port) as m, sync_redis.Redis(port=replica.port) as r:
            wait_for(lambda: r.info("replication")["master_link_status"] == "up", what="the replica's link")
            wait_for(lambda: m.info("replication")["connected_slaves"] == 1, what="the master's replica")
        yield master, replica
    finally:
        replica.stop()
        master.stop()


@pytest.fixture
async def master(pair: tuple[RedisServer, RedisServer]) -> AsyncIterator[Redis]:
    client = Redis(port=pair[0].port)
    await client.flushall()
    await client.wait(1, 5000)  # the flush on the replica too
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def replica(pair: tuple[RedisServer, RedisServer]) -> Iterator[sync_redis.Redis]:
    with sync_redis.Redis(port=pair[1].port) as client:
        yield client


@contextlib.contextmanager
def replica_away(pair: tuple[RedisServer, RedisServer]) -> Iterator[None]:
    """The replica stopped (SIGSTOP) until the block ends."""
    proc = pair[1].proc
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


# GroupCommit ------------------------------------------------------------------------------------------------
async def test_a_write_is_on_the_replica_when_it_returns(master: Redis, replica: sync_redis.Redis) -> None:
    commits = GroupCommit(master, min_replicas=1, wait_seconds=5)
    results = await asyncio.gather(*(commits.run([("xadd", ("s", {"n": i}), {})]) for i in range(20)))
    assert len(results) == 20
    assert replica.xlen("s") == 20  # read from the replica right after the answers


async def test_a_short_wait_fails_every_caller_of_its_batch_and_no_other(
    master: Redis, replica: sync_redis.Redis, pair: tuple[RedisServer, RedisServer]
) -> None:
    commits = GroupCommit(master, min_replicas=1, wait_seconds=3)  # the replica's time to catch up, after
    with replica_away(pair):
        first = asyncio.create_task(commits.run([("set", ("first", "1"), {})]))
        await until(lambda: commits._busy, what="the first caller's round trip")
        second = [asyncio.create_task(commits.run([("set", (f"second-{i}", "1"), {})])) for i in range(5)]
        with pytest.raises(NotReplicated) as short:
            await first  # alone in its pipeline: its WAIT came back with 0
        assert "0 of the 1 replicas" in str(short.value)
    # the replica is back before the next pipeline (the five queued) goes out
    assert await asyncio.gather(*second) == [[True]] * 5
    assert [replica.get(f"second-{i}") for i in range(5)] == [b"1"] * 5
    assert await master.get("first") == b"1"  # on the master all along: "short" is not "undone"


async def test_queued_callers_short_together(master: Redis, pair: tuple[RedisServer, RedisServer]) -> None:
    commits = GroupCommit(master, min_replicas=1, wait_seconds=0.5)
    with replica_away(pair):
        outcomes = await asyncio.gather(
            *(commits.run([("incr", ("n",), {})]) for _ in range(10)), return_exceptions=True
        )
    assert all(isinstance(o, NotReplicated) for o in outcomes), outcomes
    assert int(await master.get("n")) == 10


async def test_a_callers_own_error_comes_first(master: Redis, pair: tuple[RedisServer, RedisServer]) -> None:
    await master.set("a-string", "x")
    commits = GroupCommit(master, min_replicas=1, wait_seconds=0.5)
    with replica_away(pair):
        with pytest.raises(Exception) as err:
            await commits.run([("lpush", ("a-string", "y"), {})])
    assert "WRONGTYPE" in str(err.value)


async def test_the_barrier_covers_writes_made_on_other_connections(
    master: Redis, replica: sync_redis.Redis, pair: tuple[RedisServer, RedisServer]
) -> None:
    commits = GroupCommit(Redis(port=pair[0].port), min_replicas=1, wait_seconds=0.5, barrier_key="b")
    with replica_away(pair):
        await master.set("elsewhere", "1")  # another client, another connection
        with pytest.raises(NotReplicated):
            await commits.barrier()
    await commits.redis.aclose()
    patient = GroupCommit(Redis(port=pair[0].port), min_replicas=1, wait_seconds=10, barrier_key="b")
    await master.set("elsewhere", "2")
    await patient.barrier()  # the replica back: time to catch up
    assert replica.get("elsewhere") == b"2"
    await patient.redis.aclose()


async def test_an_inbound_commit_short_of_replicas_is_not_taken_for_done(
    master: Redis, pair: tuple[RedisServer, RedisServer]
) -> None:
    """A receive loop's events and cursor (Bus.commit_inbound): a short WAIT
    raises, so the loop retries from its old cursor (the commit is all or
    nothing on the master, and done again by the retry)."""
    bus = Bus(master, BusSettings(min_replicas=1, replica_wait_seconds=0.5))
    event = Event(kind=EventKind.MESSAGE, account="x.y", channel="room", sender_name="bob", text="hi")
    cursor = Write.set(account_key("tb", "x.y", "cursor"), 7)
    with replica_away(pair):
        with pytest.raises(NotReplicated):
            await bus.commit_inbound("x.y", [event], [cursor])
    assert await bus.commit_inbound("x.y", [event], [cursor])


# The api account, as a daemon ---------------------------------------------------------------------------------
def api_config(tmp_path: Path, url: str, min_replicas: int) -> tuple[Path, int, int, int]:
    a, b, http = free_port(), free_port(), free_port()
    config = ConfigToml().general()
    config.api("a", a, "token-a").api("b", b, "token-b").gateway("g", ("api.a", "api"), ("api.b", "api"))
    config.section("redis", URL=url, MinReplicas=min_replicas, ReplicaWaitSeconds=2)
    config.section("http", BindAddress=f"127.0.0.1:{http}").section("bus", LeaseSeconds=3)
    return config.write(tmp_path / "talkbridge.toml"), a, b, http


def post(port: int, token: str, text: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/api/message", headers={"Authorization": f"Bearer {token}"},
                      json={"text": text, "username": "alice", "gateway": "g"}, timeout=10)  # fmt: skip


def get_messages(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/api/messages", headers={"Authorization": "Bearer token-b"}, timeout=10)


def scrape(http: int) -> str:
    return httpx.get(f"http://127.0.0.1:{http}/metrics", timeout=5).text


@pytest.mark.parametrize("min_replicas", [1, 0])
def test_an_api_post_is_answered_once_on_the_replica_or_503(
    tmp_path: Path, pair: tuple[RedisServer, RedisServer], replica: sync_redis.Redis, min_replicas: int
) -> None:
    master_server = pair[0]
    with sync_redis.Redis(port=master_server.port) as m:
        m.flushall()
    path, a, b, http = api_config(tmp_path, master_server.url, min_replicas)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    stream = inbound_key("tb", "api.a")
    try:
        gauge = f"talkbridge_redis_min_replicas {min_replicas}.0"
        wait_for(lambda: gauge in scrape(http), what="the gauge")
        resp = post(a, "token-a", "one")
        assert resp.status_code == 200, resp.text
        if min_replicas:
            assert replica.xlen(stream) >= 1  # on the replica when the answer came
        buffered = account_key("tb", "api.b", "apibuf")
        wait_for(lambda: replica.xlen(buffered) == 1, what="'one' in b's buffer")
        with replica_away(pair):
            resp = post(a, "token-a", "two")
            read = get_messages(b)
        if min_replicas:
            assert resp.status_code == 503, resp.text
            assert "0 of the 1 replicas [redis] MinReplicas asks for within 2 s" in resp.json()["message"]
            # the buffer's rows wait for their removal to be on the replica: nothing handed out, nothing lost
            assert read.status_code == 503 and "replicas" in read.json()["message"], read.text
            metrics = scrape(http)
            assert 'talkbridge_replication_short_total{what="api"} 1.0' in metrics
            assert 'talkbridge_replication_short_total{what="api_read"} 1.0' in metrics
        else:  # today's behaviour: acknowledged, and handed out, on the master's word
            assert resp.status_code == 200 and read.status_code == 200, (resp.text, read.text)
        # The replica back: both reach b. The 503'd "two" too: the master kept it (a client's
        # retry would now duplicate it; docs/operations.md says so).
        got = [m["text"] for m in read.json()] if read.status_code == 200 else []

        def arrived() -> bool:
            answer = get_messages(b)
            if answer.status_code == 200:  # else 503: the replica still catching up
                got.extend(m["text"] for m in answer.json())
            return "two" in got

        wait_for(arrived, what="both messages at b")
        assert got == ["one", "two"]
    finally:
        daemon.stop()


class HeldLink:
    """The replica's connection to its master, relayed through here so that
    it can be held: while held, nothing the master sends reaches the replica
    (a lagging link). SIGSTOP does not do that: a stopped replica's kernel
    still takes the bytes, and it applies them when it runs again."""

    def __init__(self, master_port: int) -> None:
        self.master_port = master_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                replica, _ = self.listener.accept()
                master = socket.create_connection(("127.0.0.1", self.master_port))
                self.sockets += [replica, master]
                threading.Thread(target=self._pump, args=(master, replica, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(replica, master, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, held: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if held:
                    self.flowing.wait()
                sink.sendall(data)

    def cut(self) -> None:
        """Drop the link and whatever it holds."""
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.flowing.set()


@pytest.mark.parametrize("min_replicas", [0, 1])
def test_what_a_failover_loses_of_what_was_acknowledged(tmp_path: Path, min_replicas: int) -> None:
    """The master dies while its link to the replica lags, and the replica is
    promoted (as Sentinel would): with MinReplicas 0 every POST answered 200
    in the lag is gone; with 1 none was answered 200, so nothing
    acknowledged is gone."""
    (tmp_path / "m").mkdir(), (tmp_path / "r").mkdir()
    master = start_redis_server(tmp_path / "m")
    link = HeldLink(master.port)
    replica = start_redis_server(tmp_path / "r", None, "--replicaof", "127.0.0.1", str(link.port))
    promoted = sync_redis.Redis(port=replica.port)
    path, a, _b, http = api_config(tmp_path, master.url, min_replicas)
    wait_for(lambda: promoted.info("replication")["master_link_status"] == "up", what="the replica's link")
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        acknowledged = [text for text in ["one"] if post(a, "token-a", text).status_code == 200]
        link.flowing.clear()
        acknowledged += [text for text in ["two", "three", "four"] if post(a, "token-a", text).status_code == 200]
        master.proc.kill()  # the master dies with the lag
        master.proc.wait()
        link.cut()
        promoted.replicaof("NO", "ONE")  # what Sentinel does
        kept = {event_from_wire(f[b"d"]).text for _id, f in promoted.xrange(inbound_key("tb", "api.a"))}
        lost = [text for text in acknowledged if text not in kept]
        if min_replicas:
            assert (acknowledged, lost) == (["one"], [])
        else:  # the window MinReplicas 0 leaves open: acknowledged, and gone
            assert (acknowledged, lost) == (["one", "two", "three", "four"], ["two", "three", "four"])
    finally:
        daemon.kill()
        link.cut()
        promoted.close()
        replica.stop()
        master.stop()


# The Talk bot's webhook ---------------------------------------------------------------------------------------
def create(msg_id: int, text: str) -> bytes:
    note = {"type": "Note", "id": str(msg_id), "name": "message",
            "content": php_json_encode({"message": text, "parameters": []}), "mediaType": "text/markdown"}  # fmt: skip
    payload = {"type": "Create", "actor": {"type": "Person", "id": "users/alice", "name": "Alice"},
               "object": note, "target": {"type": "Collection", "id": "room1", "name": "General"}}  # fmt: skip
    return php_json_encode(payload).encode()


async def webhook(url: str, body: bytes) -> httpx.Response:
    random = talk_random()
    headers = {"Content-Type": "application/json", "X-Nextcloud-Talk-Random": random,
               "X-Nextcloud-Talk-Signature": signature(SECRET, random, body)}  # fmt: skip
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(url, content=body, headers=headers)


async def test_a_talk_webhook_is_answered_once_on_the_replica_or_503(
    tmp_path: Path, master: Redis, replica: sync_redis.Redis, pair: tuple[RedisServer, RedisServer], talk: TalkServer
) -> None:
    config = write_config(tmp_path / "talkbridge.toml", bot_section("talk", talk.url))
    bus = Bus(master, BusSettings(min_replicas=1, replica_wait_seconds=2))
    rig = await start_rig(config, "nctalkbot.talk", master, bus)
    try:
        resp = await webhook(rig.url, create(1, "one"))
        assert resp.status_code == 200, resp.text
        assert replica.xlen(rig.stream) == 1  # on the replica when the answer came
        body = create(2, "two")
        with replica_away(pair):
            resp = await webhook(rig.url, body)
        assert resp.status_code == 503 and "0 of the 1 replicas" in resp.text, resp.text
        assert metric(rig.metrics, "talkbridge_replication_short_total", what="webhook") == 1
        # not taken for a replay: a resend goes through (and the master had kept the first)
        assert (await webhook(rig.url, body)).status_code == 200
        assert [e["text"] for e in await rig.events()] == ["one", "two", "two"]
        # a Join publishes nothing: the room state it wrote is what waits
        join = php_json_encode({"type": "Join", "actor": {"type": "Application", "id": "bots/x", "name": "Bridge"},
                                "object": {"type": "Collection", "id": "room2", "name": "Other"}}).encode()  # fmt: skip
        with replica_away(pair):
            resp = await webhook(rig.url, join)
        assert resp.status_code == 503 and "0 of the 1 replicas" in resp.text, resp.text
        assert (await webhook(rig.url, join)).status_code == 200
        assert b"room2" in replica.smembers(rig.adapter.rooms_key)
    finally:
        await rig.close()


# Delivery: nothing is sent on the strength of state the replicas lack ----------------------------------------
class Recorder(Adapter):
    protocol = "recorder"
    traits = AdapterTraits()

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    async def send(self, delivery: Delivery) -> str | None:
        self.sent.append(delivery.text)
        return f"n{len(self.sent)}"


async def test_a_delivery_waits_for_its_entry_on_the_replicas(
    master: Redis, pair: tuple[RedisServer, RedisServer]
) -> None:
    bus = Bus(master, BusSettings(min_replicas=1, replica_wait_seconds=0.5))
    metrics, adapter = Metrics(), Recorder()
    loop = DeliveryLoop(bus, IdMap(master, "tb", 3600), adapter, "x.y", "c1", metrics, LOG, RetryPolicy())
    event = Event(kind=EventKind.MESSAGE, account="api.a", channel="api", sender_name="bob", text="hi")
    wire = Delivery(event=event, account="x.y", channel="room", gateway="g", username="", text="hi").to_wire()
    with replica_away(pair):
        await master.xadd(bus.outbound("x.y"), {b"d": wire})  # the route loop's write, not yet on the replica
        with pytest.raises(NotReplicated):
            async with asyncio.timeout(15):  # bounds a failure: a loop that never waits runs on
                await loop.run()
    assert adapter.sent == []  # not sent: a failover now would route it again, and send it twice
    assert metrics.registry.get_sample_value("talkbridge_replication_short_total", {"what": "delivery"}) == 1
    assert (await master.xpending(bus.outbound("x.y"), "deliver"))["pending"] == 1  # still pending: retried
    patient = Bus(master, BusSettings(min_replicas=1, replica_wait_seconds=10))  # the replica back: time to catch up
    loop = DeliveryLoop(patient, IdMap(master, "tb", 3600), adapter, "x.y", "c1", metrics, LOG, RetryPolicy())
    task = asyncio.create_task(loop.run())
    try:
        await until(lambda: adapter.sent == ["hi"], what="the delivery, the replica back")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# Config ---------------------------------------------------------------------------------------------------
def load(tmp_path: Path, redis: str) -> list[str]:
    path = tmp_path / "t.toml"
    path.write_text('[api.a]\nBindAddress = "127.0.0.1:5001"\n' + redis)
    try:
        load_config(path, protocol_specs(AdapterRegistry()))
    except ConfigError as err:
        return err.problems
    return []


@pytest.mark.parametrize(
    "redis, expected",
    [
        ("[redis]\nMinReplicas = 1\n", "embedded Redis, which has no replicas"),
        ("[redis]\nURL = 'redis+cluster://h:7000'\nMinReplicas = 2\n", "is a Redis Cluster"),
        ("[redis]\nMinReplicas = -1\n", "redis.MinReplicas: must be at least 0"),
        ("[redis]\nURL = 'redis://h'\nReplicaWaitSeconds = 0\n", "redis.ReplicaWaitSeconds: must be more than 0"),
    ],
)
def test_min_replicas_where_no_wait_can_work_is_a_config_error(tmp_path: Path, redis: str, expected: str) -> None:
    assert any(expected in p for p in load(tmp_path, redis)), load(tmp_path, redis)


URLS = ["", "redis://h:6379/0", "redis+sentinel://h:26379/mymaster", "redis+cluster://h:7000", "unix:///r.sock"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(min_value=-3, max_value=10), url=st.sampled_from(URLS))
def test_min_replicas_is_refused_exactly_where_it_cannot_work(tmp_path: Path, n: int, url: str) -> None:
    found = load(tmp_path, f"[redis]\n{f'URL = {url!r}' if url else ''}\nMinReplicas = {n}\n")
    cannot = n < 0 or (n > 0 and (not url or url.startswith("redis+cluster://")))
    assert bool(found) == cannot, found
    assert all(p.startswith("redis.MinReplicas: ") for p in found)
    assert all("h:" not in p for p in found)  # the URL is never echoed (it may hold a password)


async def test_a_sent_delivery_is_done_only_once_its_record_is_on_the_replicas(
    master: Redis, pair: tuple[RedisServer, RedisServer]
) -> None:
    """The replica goes away right after the send (the barrier before it had
    passed): the record, on the master only, is not taken for done — a
    failover now would lose it and the next owner would send the message
    again. It is written again until the replica confirms it; the entry stays
    pending meanwhile, and nothing is sent twice."""
    proc = pair[1].proc

    class ReplicaGoesAway(Recorder):
        async def send(self, delivery: Delivery) -> str | None:
            os.kill(proc.pid, signal.SIGSTOP)
            return await super().send(delivery)

    bus = Bus(master, BusSettings(min_replicas=1, replica_wait_seconds=0.2))
    metrics, adapter = Metrics(), ReplicaGoesAway()
    loop = DeliveryLoop(
        bus, IdMap(master, "tb", 3600), adapter, "x.y", "c1", metrics, LOG, RetryPolicy(), record_patience=60
    )
    event = Event(kind=EventKind.MESSAGE, account="api.a", channel="api", sender_name="bob", text="hi")
    wire = Delivery(event=event, account="x.y", channel="room", gateway="g", username="", text="hi").to_wire()
    await master.xadd(bus.outbound("x.y"), {b"d": wire})
    await master.wait(1, 5000)  # the entry on the replica: the send goes ahead
    short = lambda: metrics.registry.get_sample_value("talkbridge_replication_short_total", {"what": "record"})  # noqa: E731
    done = lambda: metrics.registry.get_sample_value("talkbridge_events_out_total", {"account": "x.y"}) or 0  # noqa: E731

    async def pending() -> int:
        return (await master.xpending(bus.outbound("x.y"), "deliver"))["pending"]

    task = asyncio.create_task(loop.run())
    try:
        try:
            await until(lambda: adapter.sent == ["hi"], what="the send")
            await until(lambda: (short() or 0) >= 2 or done() == 1 or task.done(), what="the record waiting")
            # not done, though the master has its record and its XACK: the lane still holds it
            assert done() == 0 and loop.in_memory == 1
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        await until(lambda: done() == 1, within=30, what="the record held")
        assert adapter.sent == ["hi"] and loop.in_memory == 0
        assert await pending() == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
