"""The stream gauges behind /metrics: read from Redis, shared by close scrapes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.asyncio import Redis

from adapters import AdapterRegistry
from bridge.config import load_config
from bridge.daemon import GAUGES_MAX_AGE, Daemon
from bridge.options import protocol_specs
from tests.helpers import metric

CONFIG = """
[api.a]
BindAddress = "127.0.0.1:0"
[api.b]
BindAddress = "127.0.0.1:0"
[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "api.a"
channel = "api"
[[gateway.inout]]
account = "api.b"
channel = "api"
"""


async def xinfo_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")  # Redis 7 counts "xinfo|groups", 6.2 "xinfo"
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_xinfo"))


async def test_concurrent_scrapes_share_one_read_of_the_gauges(redis: Redis, tmp_path: Path) -> None:
    """A client looping on /metrics must not become a load on Redis: scrapes within
    GAUGES_MAX_AGE of a refresh, and scrapes arriving during one, read nothing.
    (The age limit is set far out, then to zero: no dependence on the machine's speed.)"""
    path = tmp_path / "g.toml"
    path.write_text(CONFIG)
    registry = AdapterRegistry()
    daemon = Daemon(load_config(path, protocol_specs(registry)), redis, registry)
    assert daemon.gauges_max_age == GAUGES_MAX_AGE
    daemon.gauges_max_age = 3600.0
    for stream, group in daemon.streams():
        await daemon.bus.ensure_group(stream, group)
    await redis.xadd(daemon.bus.outbound("api.b"), {b"d": b"x"})
    before = await xinfo_calls(redis)
    await asyncio.gather(*(daemon.refresh_metrics() for _ in range(20)))
    await daemon.refresh_metrics()
    assert await xinfo_calls(redis) - before == len(daemon.streams())  # one XINFO per stream, once
    lag = metric(daemon.metrics, "talkbridge_stream_lag", stream=daemon.bus.outbound("api.b"))
    assert lag == 1
    daemon.gauges_max_age = 0.0  # every refresh is now too old: read again
    await daemon.refresh_metrics()
    assert await xinfo_calls(redis) - before == 2 * len(daemon.streams())
