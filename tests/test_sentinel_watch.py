"""The Redis watch (bridge/redis_watch.py) against a real Sentinel failover:
metrics, the fleet's record, and ``talkbridge status`` showing it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.connections import connect
from bridge.metrics import Metrics
from bridge.redis_watch import RedisWatch, read_record
from tests.admin_rig import AdminClient, AdminServer, admin_config
from tests.helpers import ROOT, api_pair_config, free_port, metric
from tests.sentinel_rig import SentinelRig, running
from tests.talkbot_rig import until


@pytest.fixture
def sentinel_rig(tmp_path: Path) -> Iterator[SentinelRig]:
    with running(tmp_path / "rig") as rig:
        yield rig


async def test_a_failover_is_counted_recorded_and_shown_by_status(tmp_path: Path, sentinel_rig: SentinelRig) -> None:
    redis = connect(sentinel_rig.url)
    metrics = Metrics()
    watch = RedisWatch(redis, "tb", metrics, "instance-1")
    old = sentinel_rig.master_port()
    try:

        async def looked(check):  # type: ignore[no-untyped-def]
            await watch.look()
            return check()

        await watch.look()
        record = await read_record(redis, "tb")
        assert record is not None and record.address == f"127.0.0.1:{old}" and record.failover_at is None
        assert (record.replicas, metric(metrics, "talkbridge_redis_replicas")) == (2, 2)
        assert metric(metrics, "talkbridge_redis_up") == 1

        sentinel_rig.kill_master()
        await until(lambda: looked(lambda: metric(metrics, "talkbridge_redis_up") == 0), what="Redis seen down")
        new = sentinel_rig.wait_failover(old)
        await until(lambda: looked(lambda: metric(metrics, "talkbridge_redis_up") == 1), within=30, what="Redis up")

        record = await read_record(redis, "tb")
        assert record is not None and record.address == f"127.0.0.1:{new}"
        assert (record.failover_from, record.failover_to) == (f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        assert record.failover_seen_by == "instance-1" and record.replicas == 1
        assert metric(metrics, "talkbridge_redis_failovers_total") == 1
        assert metric(metrics, "talkbridge_redis_replicas") == 1
        await watch.look()  # seen again: not a second failover
        assert metric(metrics, "talkbridge_redis_failovers_total") == 1
    finally:
        await redis.aclose()

    path, _ = api_pair_config(tmp_path, sentinel_rig.url)
    status = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge.cli", "status", "--config", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert f"redis master: 127.0.0.1:{new}\n" in status.stdout
    assert f"from 127.0.0.1:{old} to 127.0.0.1:{new} (seen first by instance-1)" in status.stdout

    # the management page, on the promoted master (the admin rig dials one server)
    direct = f"redis://127.0.0.1:{new}/0"
    (tmp_path / "admin").mkdir()
    admin = AdminServer(admin_config(tmp_path / "admin", direct, free_port()), direct).start()
    client = AdminClient(admin.base)
    try:
        assert client.login().status_code == 303
        page = await asyncio.to_thread(client.http.get, "/")
        assert "<dt>Redis master</dt><dd" in page.text and f"127.0.0.1:{new} · 1 replica</dd>" in page.text
        assert f": 127.0.0.1:{old} → 127.0.0.1:{new}</dd>" in page.text
    finally:
        client.close()
        admin.stop()


async def test_back_wakes_once_redis_answers_again_after_failing(tmp_path: Path) -> None:
    """What a loop that lost Redis waits for besides its backoff step: the
    watch's first successful look after a failed one (a failover's new master,
    a restarted server), not a look that merely succeeds."""
    from redis.asyncio import Redis

    from tests.helpers import start_redis_server

    server = start_redis_server(tmp_path)
    client = Redis(port=server.port)
    metrics = Metrics()
    watch = RedisWatch(client, "tb", metrics, "me")
    try:
        await watch.look()
        back = asyncio.ensure_future(watch.back())
        await watch.look()  # up, and up before: nothing to wake
        await asyncio.sleep(0)
        assert not back.done() and metric(metrics, "talkbridge_redis_up") == 1
        server.stop()
        await watch.look()
        assert not back.done() and metric(metrics, "talkbridge_redis_up") == 0
        server = start_redis_server(tmp_path, server.port)
        await watch.look()
        await until(back.done, what="the loops woken")
        assert metric(metrics, "talkbridge_redis_up") == 1
        again = asyncio.ensure_future(watch.back())  # the next recovery, not this one
        await watch.look()
        await asyncio.sleep(0)
        assert not again.done()
        again.cancel()
    finally:
        await client.aclose()
        server.stop()
