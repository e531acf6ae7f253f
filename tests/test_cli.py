"""``talkbridge status`` and ``talkbridge dlq`` against real Redis servers."""

from __future__ import annotations

import io
from pathlib import Path

from redis.asyncio import Redis

from bridge.bus import DELIVER_GROUP, Bus, BusSettings
from bridge.cli import main
from bridge.events import Event, EventKind, event_to_wire
from bridge.keys import outbound_key, workers_key
from tests.helpers import RedisServer, api_pair_config


async def test_status_reports_length_lag_pending_and_dead_letters(
    tmp_path: Path, redis: Redis, redis_server: RedisServer
) -> None:
    path, _ = api_pair_config(tmp_path, redis_server.url)
    bus = Bus(redis, BusSettings())
    await bus.ensure_group(bus.outbound("api.b"), DELIVER_GROUP)
    for i in range(3):
        await redis.xadd(bus.outbound("api.b"), {b"d": b"x%d" % i})
    await bus.read_new(bus.outbound("api.b"), DELIVER_GROUP, "c", 1, 10)  # one pending, two lagging
    await bus.dead_letter(bus.outbound("api.b"), b"1-1", b"payload", "boom", 5)
    out = io.StringIO()
    assert await _main(["status", "--config", str(path)], out) == 0
    lines = out.getvalue().splitlines()
    row = next(line.split() for line in lines if line.startswith(outbound_key("tb", "api.b")))
    assert row[:4] == [outbound_key("tb", "api.b"), "3", "2", "1"]
    assert lines[-1] == "dead letters: 1"


async def test_dlq_list_and_replay(tmp_path: Path, redis: Redis, redis_server: RedisServer) -> None:
    path, _ = api_pair_config(tmp_path, redis_server.url)
    bus = Bus(redis, BusSettings())
    payload = event_to_wire(Event(kind=EventKind.MESSAGE, account="api.a", channel="api", text="hi"))
    await bus.dead_letter(bus.outbound("api.b"), b"5-0", payload, "TransientError: 503", 5)
    out = io.StringIO()
    assert await _main(["dlq", "list", "--config", str(path)], out) == 0
    assert "tb:out:{api.b}  attempts=5  TransientError: 503" in out.getvalue()
    out = io.StringIO()
    assert await _main(["dlq", "replay", "--all", "--config", str(path)], out) == 0
    assert "replayed 1 dead letter(s)" in out.getvalue()
    assert await redis.xlen(bus.dlq) == 0
    [(_, fields)] = await redis.xrange(bus.outbound("api.b"))
    assert fields[b"d"] == payload


def test_status_on_embedded_redis_without_a_running_daemon(tmp_path: Path) -> None:
    path, _ = api_pair_config(tmp_path, None)
    out = io.StringIO()
    assert main(["status", "--config", str(path)], out=out) == 0
    assert "dead letters: 0" in out.getvalue()
    assert (tmp_path / "data" / "redis.log").exists()  # it started, and stopped, a server on the data dir


async def _main(argv: list[str], out: io.StringIO) -> int:
    # The CLI runs its own event loop; keep it off the test's loop.
    import asyncio

    return await asyncio.to_thread(main, argv, out)


BOT_CONFIG = """
[nctalkbot.cortex]
Server = "https://cloud.example.com"
BotSecret = "env:TB_TEST_BOT_SECRET"
WebhookURL = "https://bridge.example.com/webhook/nextcloud/cortex"
[api.a]
BindAddress = "127.0.0.1:1"
[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "nctalkbot.cortex"
channel = "*"
[[gateway.inout]]
account = "api.a"
channel = "api"
"""


def test_talk_bot_command_prints_the_occ_line(tmp_path: Path, monkeypatch, capsys) -> None:
    secret = "s" * 48
    monkeypatch.setenv("TB_TEST_BOT_SECRET", secret)
    path = tmp_path / "bot.toml"
    path.write_text(BOT_CONFIG)
    out = io.StringIO()
    assert main(["talk-bot-command", "--config", str(path), "cortex"], out=out) == 0
    assert out.getvalue().strip() == (
        "occ talk:bot:install --feature webhook --feature response --feature reaction "
        f"'cortex' '{secret}' 'https://bridge.example.com/webhook/nextcloud/cortex'"
    )
    assert main(["talk-bot-command", "--config", str(path), "api.a"]) == 2
    assert 'no nctalkbot account "api.a" (configured: nctalkbot.cortex)' in capsys.readouterr().err
    path.write_text(BOT_CONFIG.replace('WebhookURL = "https://bridge.example.com/webhook/nextcloud/cortex"\n', ""))
    out = io.StringIO()
    assert main(["talk-bot-command", "--config", str(path), "cortex"], out=out) == 0
    assert "https://PUBLIC-HOST/webhook/nextcloud/cortex" in out.getvalue()
    assert "WebhookURL is not set" in capsys.readouterr().err


def test_a_second_daemon_on_the_same_embedded_data_dir_is_refused_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT, Daemon

    path, (_a, _b, http) = api_pair_config(tmp_path, None)
    first = Daemon(path, http, tmp_path / "first.log").start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "run", "--config", str(path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        # refused because it is serving (not after waiting for it to go away)
        assert "is in use by a running redis-server" in second.stderr
        assert first.proc is not None and first.proc.poll() is None  # the first daemon is untouched
        first.wait_ready()
    finally:
        first.stop()


# talkbridge worker beside talkbridge run on the embedded Redis --------------------------------
def test_a_worker_started_before_the_daemon_waits_for_its_redis_and_runs(tmp_path: Path) -> None:
    import redis as sync_redis

    from bridge.embedded_redis import EmbeddedRedis
    from tests.helpers import Daemon, WorkerProcess, wait_for

    path, (_a, _b, http) = api_pair_config(tmp_path, None)
    worker = WorkerProcess(path, tmp_path / "worker.log").start(ready=False)  # wins the race
    daemon = Daemon(path, http, tmp_path / "daemon.log")
    try:
        wait_for(lambda: "waiting for the daemon's embedded Redis" in worker.log(), what="the worker waits")
        assert worker.proc is not None and worker.proc.poll() is None
        assert not (tmp_path / "data").exists()  # it started no server of its own
        daemon.start()
        wait_for(lambda: WorkerProcess.READY in worker.log(), timeout=30, what="the worker runs")
        client = sync_redis.Redis(unix_socket_path=EmbeddedRedis(tmp_path / "data").socket_path)
        try:  # on the management page's Workers table: its heartbeat is in the daemon's Redis
            wait_for(lambda: client.zcard(workers_key("tb")) == 1, what="the worker's heartbeat")
        finally:
            client.close()
        assert "the daemon's embedded Redis answers after" in worker.log()
        assert worker.stop() == 0
    finally:
        worker.stop()
        daemon.stop()


def test_a_worker_without_a_daemon_gives_up_after_its_bound(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT

    path, _ = api_pair_config(tmp_path, None)
    worker = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "worker", "--config", str(path), "--wait-for-redis", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert worker.returncode == 1, worker.stderr
    assert "waiting for the daemon's embedded Redis" in worker.stderr and "giving up after 0.5 s" in worker.stderr
    assert "no Redis after 0.5 s: start `talkbridge run` with this config" in worker.stderr
    assert not (tmp_path / "data").exists()  # it never started a server of its own
    for bad in ("-1", "nan", "soon"):
        refused = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "worker", "--config", str(path), "--wait-for-redis", bad],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 2 and "--wait-for-redis" in refused.stderr


def test_a_waiting_worker_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    from tests.helpers import WorkerProcess, wait_for

    path, _ = api_pair_config(tmp_path, None)
    worker = WorkerProcess(path, tmp_path / "worker.log").start(ready=False)
    try:
        wait_for(lambda: "waiting for the daemon's embedded Redis" in worker.log(), what="the worker waits")
    finally:
        assert worker.stop() == 0  # a service manager stopping it meanwhile: a clean exit, not a failure
