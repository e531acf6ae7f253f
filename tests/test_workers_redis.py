"""The workers' job queue on a Redis of its own (issue 20): arq does not run
on Redis Cluster, the bus does, so ``[workers] RedisURL`` puts arq's keys on
a standalone (or Sentinel) Redis while the streams, the answers posted back,
caches, rate limits, alerts and the workers' heartbeat stay on ``[redis] URL``.

- end to end, every part real and in its own process: the daemon's bus on a
  one-node Redis Cluster, the queue on a standalone server, a real
  ``talkbridge worker``; an Instagram link posted to an api room waits in
  the queue's server (the daemon's management page counts it there) and,
  once the worker runs, is answered there with its preview; arq's keys are
  on the standalone server and none on the Cluster;
- a Cluster URL (or any other scheme) for the queue is a config error named
  by its key, never echoing the value, and neither ``run`` nor ``worker``
  starts anything; a worker whose bus is a Cluster and whose queue has no
  Redis of its own is refused with the key to set; a daemon's triggers say so;
- in process, the queue on a standalone server or behind a Sentinel: the
  queue's own Redis is where jobs are enqueued, run and
  counted on the management page's snapshot, while what a job writes goes
  to the bus's Redis; what a job keeps there (the preview cache, dedupe,
  rate limits, the breaker, a persona's room) works on a Cluster, and a
  persona job hands its room on through the queue's Redis.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from adapters import AdapterRegistry
from bridge.admin import fleet
from bridge.bus import FIELD, bus_for
from bridge.config import Config, ConfigError, load_config
from bridge.connections import connect
from bridge.events import Delivery, Event, EventKind
from bridge.keys import instagram_cache_key, queue_name
from bridge.options import protocol_specs
from tests.admin_rig import PASSWORD_HASH, USER, AdminClient
from tests.helpers import ROOT, ConfigToml, Daemon, RedisServer, WorkerProcess, free_port, start_redis_server, wait_for
from tests.instagram_rig import JPEG, FakeInstagram, image_item
from tests.llama_rig import FakeLLM, fake_llm_fixture  # noqa: F401
from tests.talkbot_rig import until
from tests.test_api_e2e import Api
from tests.test_llm_jobs import BOT, ROOM, make_rig
from tests.test_workers_core import ECHO
from workers import llm_queue
from workers.feature_settings import FEATURE_SPECS, QUEUE_SCHEMES, WorkersSection
from workers.instagram_breaker import Breaker
from workers.instagram_cache import Cached, Dedupe, PreviewCache
from workers.instagram_fetch import Preview
from workers.instagram_reply import File
from workers.instagram_urls import Target
from workers.ratelimit import RateLimiter
from workers.settings import run_worker
from workers.triggers import build_triggers

SPECS = protocol_specs(AdapterRegistry())
TOKEN = "api-token"


def cluster_url(cluster: RedisCluster) -> str:
    [node] = cluster.nodes_manager.startup_nodes.values()  # the one node (a sync test never initialised the client)
    return f"redis+cluster://127.0.0.1:{node.port}"


def keys_of(url: str) -> list[str]:
    """Every key of one server (the one node of the test's Cluster, or a standalone one)."""
    client = sync_redis.Redis.from_url(url)
    try:
        return sorted(key.decode() for key in client.scan_iter("*", count=1000))
    finally:
        client.close()


def bridge_config(
    tmp: Path, bus_url: str | None, http: int, api_port: int, admin_port: int = 0, **workers: str
) -> Path:
    config = ConfigToml().api("a", api_port, TOKEN).api("b", free_port(), TOKEN)
    config.gateway("g", ("api.a", "api"), ("api.b", "api"), Instagram=True)
    config.daemon(bus_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05)
    if workers:
        config.section("workers", **workers)
    if admin_port:  # the management page, served by the daemon
        config.section("admin", BindAddress=f"127.0.0.1:{admin_port}", User=USER, Password=PASSWORD_HASH,
                       RefreshSeconds=0.5)  # fmt: skip
    return config.write(tmp / "talkbridge.toml")


@pytest.fixture
def queue_server(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The suite's standalone server, emptied: the job queue's own Redis."""
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server


# end to end -----------------------------------------------------------------------------
def test_a_preview_runs_through_a_queue_of_its_own_while_the_bus_is_on_a_cluster(
    tmp_path: Path, cluster: RedisCluster, queue_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus_url = cluster_url(cluster)
    node_url = bus_url.replace("redis+cluster://", "redis://")
    fake = FakeInstagram(tmp_path).start()
    http, api_port, admin_port = free_port(), free_port(), free_port()
    path = bridge_config(tmp_path, bus_url, http, api_port, admin_port, RedisURL=queue_server.url)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    for name, value in fake.worker_env().items():  # the worker reaches Instagram through the fake's proxy
        monkeypatch.setenv(name, value)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    admin = AdminClient(f"http://127.0.0.1:{admin_port}")
    try:
        api = Api(api_port, TOKEN)
        code = fake.add_post(image_item("OwnQueue01", caption="queued apart"))
        posted = api.post(text=f"look: https://www.instagram.com/p/{code}/", username="bob", gateway="g").json()
        # no worker yet: the job waits on the queue's server, and the daemon's page counts it there
        queue = sync_redis.Redis.from_url(queue_server.url)
        wait_for(lambda: queue.zcard(queue_name("tb")) == 1, what="the job in the queue's own Redis")
        queue.close()
        assert admin.login().status_code == 303
        wait_for(lambda: "<dt>Worker queue</dt><dd>1</dd>" in admin.http.get("/").text, what="the page's count")
        worker.start()
        got: list[dict] = []

        def preview() -> list[dict]:
            got.extend(api.messages())
            return [m for m in got if m["text"].startswith("📷")]

        [answer] = wait_for(preview, timeout=30, what="the preview in the api room")
        assert answer["text"].splitlines()[:2] == ["📷 Post by @alice (Alice Person)", "queued apart"]
        assert answer["parent_id"] == posted["id"]  # the answer, threaded under the link
        [file] = answer["Extra"]["file"]
        assert base64.b64decode(file["Data"]) == JPEG

        queue_keys, bus_keys = keys_of(queue_server.url), keys_of(node_url)
        # arq's: the finished job's result (KeepResultSeconds) and the worker's health note, on the queue's server
        assert any(key.startswith("arq:result:") for key in queue_keys), queue_keys
        assert any(key.startswith("tb:arq:queue:health:") for key in queue_keys), queue_keys
        assert [key for key in bus_keys if "arq:" in key] == []
        # the bus's: the streams, the preview cache, the workers' heartbeat; none of it on the queue's server
        assert instagram_cache_key("tb", f"media:{code}") in bus_keys
        assert "tb:workers" in bus_keys and any(key.startswith("tb:out:") for key in bus_keys)
        assert [key for key in queue_keys if not key.startswith(("arq:", "tb:arq:"))] == []
        assert "arq does not run on Redis Cluster" not in daemon.log()
    finally:
        admin.close()
        worker.stop()
        daemon.stop()
        fake.stop()
    assert worker.proc is not None and worker.proc.returncode == 0  # closed both clients and left cleanly


# config errors ----------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+cluster://:hunter2@127.0.0.1:7000", "workers.RedisURL: arq does not run on Redis Cluster: name a"),
        ("http://:hunter2@127.0.0.1:6379", "workers.RedisURL: must start with one of redis://, rediss://, unix://,"),
    ],
)
def test_a_queue_url_arq_cannot_run_on_is_a_config_error_and_nothing_starts(
    tmp_path: Path, url: str, expected: str
) -> None:
    """``run`` and ``worker`` refuse it before anything starts: the embedded
    Redis (no [redis] URL here) never gets its data directory."""
    path = bridge_config(tmp_path, None, free_port(), free_port(), RedisURL=url)
    for args in (["check-config", str(path)], ["run", "-c", str(path)], ["worker", "-c", str(path)]):
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(expected), (args, done.stderr)
        assert "hunter2" not in done.stderr + done.stdout
    assert not (tmp_path / "data").exists()


def test_a_bad_sentinel_address_for_the_queue_is_named_by_its_key(tmp_path: Path) -> None:
    path = bridge_config(tmp_path, None, free_port(), free_port(), RedisURL="redis+sentinel://:hunter2@nohost/mymaster")
    done = run_cli("run", "-c", str(path))
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "talkbridge: workers.RedisURL: bad sentinel address 'nohost'", done.stderr
    assert "hunter2" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_a_worker_on_a_cluster_bus_without_a_queue_redis_is_told_what_to_set(
    tmp_path: Path, cluster: RedisCluster
) -> None:
    path = bridge_config(tmp_path, cluster_url(cluster), free_port(), free_port())
    done = run_cli("worker", "-c", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith("talkbridge worker: [redis] URL is a Redis Cluster, where arq"), done.stderr
    assert "set [workers] RedisURL to a standalone or Sentinel Redis" in done.stderr
    assert "Traceback" not in done.stderr


def write_config(tmp_path: Path, bus_url: str | None, **workers: str) -> Config:
    return load_config(bridge_config(tmp_path, bus_url, free_port(), free_port(), **workers), SPECS,
                       features=FEATURE_SPECS)  # fmt: skip


async def test_a_daemon_on_a_cluster_without_a_queue_redis_names_the_key_in_its_log(
    tmp_path: Path, cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.registry import FEATURES

    config = write_config(tmp_path, cluster_url(cluster))
    with caplog.at_level(logging.ERROR, "test.triggers"):
        assert build_triggers(config, cluster, "tb", logging.getLogger("test.triggers"), FEATURES) is None
    assert "jobs are off until [workers] RedisURL names a standalone or Sentinel Redis" in caplog.text


def test_check_config_says_the_queue_has_its_own_redis_never_its_url(tmp_path: Path) -> None:
    path = bridge_config(tmp_path, None, free_port(), free_port(), RedisURL="redis://:hunter2@10.0.0.9:6379/2")
    done = run_cli("check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert "job queue: its own Redis ([workers] RedisURL)" in done.stdout
    assert "hunter2" not in done.stdout
    bare = run_cli("check-config", str(bridge_config(tmp_path, None, free_port(), free_port())))
    assert "job queue" not in bare.stdout


URL_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
SCHEME = st.sampled_from(["", "redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://", "http://"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=SCHEME, rest=URL_TEXT)
def test_any_queue_url_loads_only_with_a_scheme_arq_runs_on_and_is_never_echoed(
    tmp_path: Path, scheme: str, rest: str
) -> None:
    url = scheme + rest
    path = tmp_path / "talkbridge.toml"
    toml = '[api.a]\nBindAddress = "127.0.0.1:0"\nToken = "t"\n[workers]\nRedisURL = ' + _toml_string(url) + "\n"
    path.write_text(toml)
    try:
        config = load_config(path, SPECS, features=FEATURE_SPECS)
    except ConfigError as exc:
        assert url and not url.startswith(QUEUE_SCHEMES)
        [problem] = exc.problems
        assert problem.startswith("workers.RedisURL: ")
        assert ("Redis Cluster" in problem) == url.startswith("redis+cluster://")
        if len(rest) >= 6:  # a secret long enough not to appear by chance in the message
            assert rest not in problem
        return
    assert not url or url.startswith(QUEUE_SCHEMES)
    assert config.settings(WorkersSection).redis_url == url
    assert url == "" or url not in repr(config.settings(WorkersSection))  # a secret: out of the repr


def _toml_string(text: str) -> str:
    escaped = "".join(
        f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c for c in text
    )  # TOML basic string
    return f'"{escaped}"'


# in process: who reads and writes where -----------------------------------------------------
@contextlib.contextmanager
def sentinel_for(tmp: Path, master: RedisServer, service: str = "jobs") -> Iterator[str]:
    """One Sentinel watching ``master`` as ``service``: the redis+sentinel:// URL of it."""
    port = free_port()
    conf = tmp / "sentinel.conf"  # Sentinel rewrites its file: one of its own
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor {service} 127.0.0.1 {master.port} 1\n")
    proc = subprocess.Popen([master.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: _sentinel_knows(port, service) or proc.poll() is not None, what="the sentinel")
        assert proc.poll() is None, f"redis-server --sentinel exited with {proc.returncode}"
        yield f"redis+sentinel://127.0.0.1:{port}/{service}"
    finally:
        proc.terminate()
        proc.wait(10)


def _sentinel_knows(port: int, service: str) -> bool:
    client = sync_redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        return client.execute_command("SENTINEL", "get-master-addr-by-name", service) is not None
    except sync_redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(params=["standalone", "sentinel"])
async def queue_redis(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Redis]:
    """The job queue's own Redis, beside the suite's (the bus's): a second
    standalone server, or the same reached through a Sentinel (as
    ``[workers] RedisURL = "redis+sentinel://…"`` connects)."""
    (tmp_path / "queue").mkdir()
    server = start_redis_server(tmp_path / "queue")
    try:
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(sentinel_for(tmp_path, server)) if request.param == "sentinel" else server.url
            client = connect(url)
            assert isinstance(client.connection_pool, SentinelConnectionPool) == (request.param == "sentinel")
            try:
                yield client
            finally:
                await client.aclose()
    finally:
        server.stop()


async def test_jobs_are_enqueued_run_and_counted_on_the_queue_redis_and_answer_on_the_bus(
    tmp_path: Path, redis: Redis, queue_redis: Redis
) -> None:
    """The daemon's triggers enqueue on the queue's Redis, the management
    page's snapshot counts the job there, a worker runs it from there (arq's
    result stays there), and the job's answer is on the bus's outbound stream."""
    config = write_config(tmp_path, "redis://127.0.0.1:1/0")  # not dialled: the clients are handed in
    triggers = build_triggers(config, redis, "tb", logging.getLogger("test"), [ECHO], queue_redis)
    assert triggers is not None
    source = Event(EventKind.MESSAGE, "api.a", "api", sender_name="zoe", text="!echo pong", native_id="m1")
    await triggers.consider(source)
    assert await queue_redis.zrange(queue_name("tb"), 0, -1) == [f"echo:{source.id}".encode()]
    assert not await redis.exists(queue_name("tb"))
    bus = bus_for(config, redis)
    tally = fleet.DeadLetterTally(redis, bus.dlq)
    assert (await fleet.snapshot(redis, bus, config, tally, queue=queue_redis)).queue == 1
    assert (await fleet.snapshot(redis, bus, config, tally)).queue == 0  # where it was counted before

    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(config, redis, stop, features=[ECHO], queue=queue_redis))
    try:
        [(_, answer)] = await until(lambda: redis.xrange(bus.outbound("api.a")), within=30, what="the answer")
    finally:
        stop.set()
        await worker
    assert Delivery.from_wire(answer[FIELD]).text == "pong"
    assert await queue_redis.zcard(queue_name("tb")) == 0
    assert await queue_redis.exists(f"arq:result:echo:{source.id}")  # arq's record of it, on the queue's Redis
    assert [key async for key in redis.scan_iter("*arq:*")] == []


async def test_what_a_job_keeps_besides_arqs_keys_works_on_a_cluster(cluster: RedisCluster) -> None:
    """The keys the workers keep on the bus's Redis, not arq's: the preview
    cache (replaced whole, with its expiry, in one script: redis-py refuses a
    MULTI on Cluster), the links' dedupe, the shared rate limit (one hash tag)
    and the circuit breaker (one key), on a Cluster."""
    cache = PreviewCache(cluster, "tb", 60)
    target = Target("post", "OnCluster1")
    await cache.put_error(target, "deleted")
    assert await cache.get(target, files=True) == Cached(None, "deleted", None)
    preview = Preview("post", "OnCluster1", target.url, author="alice", caption="kept")
    await cache.put(target, preview, [File("a.jpg", "image/jpeg", JPEG)])
    assert await cache.get(target, files=True) == Cached(preview, None, [File("a.jpg", "image/jpeg", JPEG)])
    assert 0 < await cluster.pttl(cache.key(target)) <= 60_000
    dedupe = Dedupe(cluster, "tb", 60)
    assert await dedupe.claim("api.a", "api", target, "e1") and not await dedupe.claim("api.a", "api", target, "e2")
    limiter = RateLimiter(cluster, "tb", "instagram", limit=1, room_limit=1)
    assert await limiter.acquire("job1", "room") == 0
    assert await limiter.acquire("job2", "room") > 0  # over the limit: waits, its place kept
    await limiter.leave("job2", "room")
    breaker = Breaker(cluster, "tb")
    assert (await breaker.check("job1")).fetch


async def test_a_persona_job_on_a_cluster_bus_hands_the_room_on_through_the_queues_redis(
    cluster: RedisCluster, queue_redis: Redis, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """A persona's room lives on the bus (a Cluster here); the fresh job a
    job near its JobTimeout leaves the rest to is arq's, on the queue's Redis."""
    async with httpx.AsyncClient() as http:
        rig = await make_rig(cluster, fake_llm, tmp_path, http, job_timeout=4)  # type: ignore[arg-type]
        rig.deps.queue = queue_redis
        await rig.say("one")
        second = await rig.say("two")
        room = llm_queue.room_id(BOT, ROOM)
        assert await rig.job(room) == "answered 1, handed the rest on"
        assert await queue_redis.zscore(queue_name("tb"), f"llm:{room}:next:{second.id}") is not None
        assert await rig.job(room) == "answered 1"
    assert [r.text for r in await rig.replies()] == ["answer 1: Alice: one", "answer 2: Alice: two"]
