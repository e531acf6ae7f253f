"""Slow and idle clients cannot starve the daemon (``talkbridge run`` as a real process).

The daemon starts with a service manager's usual soft file limit, 1,024 (the
hard one left as it is) and raises it itself. 5,000 connections per
listener then start a request and never finish its head; meanwhile a signed
Talk webhook and an api POST are answered as usual, and every held
connection is closed by the server: evicted at the listener's connection
cap, or answered 408 when its head timeout expires.
"""

from __future__ import annotations

import asyncio
import resource
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from adapters.nctalk_bot import H_RANDOM, H_SIGNATURE, sign
from bridge.listener import ListenerLimits
from tests.helpers import ROOT, ConfigToml, Daemon, RedisServer, free_port

SECRET = "slow-" + "s" * 40
HELD_PER_LISTENER = 5000
SERVICE_SOFT_LIMIT = 1024
OPENING_AT_ONCE = 400  # connects in flight at a time (the listen backlog is 1,024)
WEBHOOK = b"""{"type":"Create","actor":{"type":"Person","id":"users\\/alice","name":"Alice"},
"object":{"type":"Note","id":"17","name":"message","content":"{\\"message\\":\\"still here\\",\\"parameters\\":[]}",
"mediaType":"text\\/markdown"},"target":{"type":"Collection","id":"room1234","name":"General"}}"""


class ServiceDaemon(Daemon):
    """The daemon process with the soft file limit a service manager gives it."""

    def start(self, ready: bool = True) -> Daemon:
        def limit_files() -> None:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (SERVICE_SOFT_LIMIT, hard))

        self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files,
        )
        if ready:
            self.wait_ready()
        return self


@pytest.fixture
def daemon(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Daemon, int]]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    api_port, http_port = free_port(), free_port()
    config = ConfigToml().api("a", api_port, "token-a")
    config.section("nctalkbot.bot", Server="http://127.0.0.1:9", BotSecret=SECRET)
    config.gateway("g", ("api.a", "api"), ins=[("nctalkbot.bot", "*")])
    path = config.daemon(redis_server.url, http_port, LeaseSeconds=3).write(tmp_path / "talkbridge.toml")
    proc = ServiceDaemon(path, http_port, tmp_path / "daemon.log").start()
    try:
        yield proc, api_port
    finally:
        proc.stop()


async def hold(port: int, gate: asyncio.Semaphore) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that starts a request head and never finishes it."""
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /webhook/nextcloud/bot HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server said before closing (b"" when it just closed)."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


def test_held_connections_do_not_starve_a_webhook_or_an_api_post(daemon: tuple[Daemon, int]) -> None:
    proc, api_port = daemon
    log = proc.log()
    assert f"raised the soft limit on open files from {SERVICE_SOFT_LIMIT} to" in log, log

    # this process holds 2 x 5,000 sockets: raise its own soft limit too
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * HELD_PER_LISTENER + 512
    assert hard == resource.RLIM_INFINITY or hard >= need, f"hard file limit {hard} < {need}: raise it to run this"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        asyncio.run(_scenario(proc.http_port, api_port))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Traceback" not in proc.log()


async def _scenario(http_port: int, api_port: int) -> None:
    gate = asyncio.Semaphore(OPENING_AT_ONCE)
    held = await asyncio.gather(*(hold(port, gate) for port in (http_port, api_port) for _ in range(HELD_PER_LISTENER)))
    endings = [asyncio.create_task(closed_by_server(reader)) for reader, _ in held]
    try:
        # While they are held: a signed Talk webhook and an api POST, answered as ever.
        random = secrets.token_hex(32)
        async with httpx.AsyncClient(timeout=20) as client:
            webhook, post = await asyncio.gather(
                client.post(
                    f"http://127.0.0.1:{http_port}/webhook/nextcloud/bot",
                    content=WEBHOOK,
                    headers={H_RANDOM: random, H_SIGNATURE: sign(SECRET, random, WEBHOOK)},
                ),
                client.post(
                    f"http://127.0.0.1:{api_port}/api/message",
                    json={"text": "also here", "username": "bob", "gateway": "g"},
                    headers={"Authorization": "Bearer token-a"},
                ),
            )
        assert webhook.status_code == 200, webhook.text
        assert post.status_code == 200 and post.json()["text"] == "also here", post.text

        # Every held connection is closed by the server: at the cap (silently),
        # or at its head timeout with a 408. The deadline only bounds a failure.
        limits = ListenerLimits()
        said = await asyncio.wait_for(asyncio.gather(*endings), timeout=limits.request_timeout + 30)
        timed_out = [answer for answer in said if answer.startswith(b"HTTP/1.1 408 ")]
        assert all(answer == b"" or answer.startswith(b"HTTP/1.1 408 ") for answer in said)
        assert timed_out, "no connection reached its head timeout"
        assert len(timed_out) <= 2 * limits.max_connections  # the rest were evicted at the cap
    finally:
        for task in endings:
            task.cancel()
        for _, writer in held:
            writer.close()
