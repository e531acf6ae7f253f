"""Connections through ``redis+sentinel://`` (bridge/connections.py) when the
master goes: TCP keepalive on every connection (a master gone without a word
must not leave a blocked read waiting for ever), and a write that meets a
replica (a stale answer, an old master come back demoted) is a connection
error that sends the next attempt to the sentinels again."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.connections import connect
from tests.helpers import RedisServer
from tests.sentinel_rig import SentinelRig, running


@pytest.fixture
def sentinel_rig(tmp_path: Path) -> Iterator[SentinelRig]:
    with running(tmp_path / "rig") as rig:
        yield rig


async def keepalive_of(url: str) -> tuple[int, int]:
    """SO_KEEPALIVE and TCP_KEEPIDLE of a connection the client opened."""
    redis = connect(url)
    try:
        await redis.ping()
        conn = await redis.connection_pool.get_connection()
        try:
            sock = conn._writer.get_extra_info("socket")  # the connection's own socket: private, read only
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), sock.getsockopt(
                socket.IPPROTO_TCP, socket.TCP_KEEPIDLE
            )
        finally:
            await redis.connection_pool.release(conn)
    finally:
        await redis.aclose()


async def test_connections_probe_a_silent_peer(sentinel_rig: SentinelRig, redis_server: RedisServer) -> None:
    assert await keepalive_of(sentinel_rig.url) == (1, 5)
    assert await keepalive_of(redis_server.url) == (1, 5)


async def test_a_write_that_meets_a_replica_asks_the_sentinels_again(sentinel_rig: SentinelRig) -> None:
    redis = connect(sentinel_rig.url)
    pool = redis.connection_pool
    master = sentinel_rig.master_port()
    replica = next(port for port in sentinel_rig.alive_data_ports() if port != master)
    asked = pool.get_master_address
    answers = [("127.0.0.1", replica)]  # one stale answer, then the sentinels' own

    async def stale_first() -> tuple[str, int]:
        return answers.pop() if answers else await asked()

    pool.get_master_address = stale_first
    try:
        with pytest.raises(RedisConnectionError):  # READONLY: not an answer a caller would take for a bad command
            await redis.set("k", "v")
        assert await redis.set("k", "v")
        answers.append(("127.0.0.1", replica))
        pool.reset()  # a fresh connection: to the stale address again
        with pytest.raises(RedisConnectionError):  # a script in a transaction, as the group commits write
            async with redis.pipeline(transaction=True) as pipe:
                pipe.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "k", "w")
                await pipe.execute()
        assert await redis.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "k", "w")
        answers.append(("127.0.0.1", replica))
        pool.reset()
        with pytest.raises(RedisConnectionError):  # a script alone (Redis 6.2 words its refusal otherwise)
            await redis.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "k", "x")
        assert await redis.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "k", "x")
        assert await redis.get("k") == b"x"
    finally:
        await redis.aclose()
