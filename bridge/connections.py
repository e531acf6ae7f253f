"""Redis connections from a URL: standalone, unix socket, Sentinel or Cluster.

- ``redis://`` / ``rediss://`` / ``unix://``  — redis-py's own URL forms
- ``redis+sentinel://[:password@]host:port[,host:port...]/SERVICE[/DB]``
- ``redis+cluster://[:password@]host:port``

``redis_for`` opens the configured one, or the embedded server
(bridge/embedded_redis.py) when no URL is set: for the CLI's commands and
the ones adapters add (``Adapter.cli_commands``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from bridge.config_keys import REDIS_SCHEMES
from bridge.embedded_redis import EmbeddedRedis

if TYPE_CHECKING:
    from bridge.config import Config

# Blocking reads (XREADGROUP BLOCK) must not trip a socket timeout. No
# periodic health checks: every caller already retries on a broken connection,
# and the check costs a clock read on every command.
COMMON: dict[str, Any] = {"socket_timeout": None, "socket_connect_timeout": 5}


SCHEMES = REDIS_SCHEMES  # declared in the config layer, which checks URLs without a Redis client


class RedisURLError(ValueError):
    pass


def connect(url: str) -> Redis:
    if url.startswith("redis+sentinel://"):
        return _sentinel(url)
    if url.startswith("redis+cluster://"):
        return RedisCluster.from_url("redis://" + url[len("redis+cluster://") :], socket_connect_timeout=5)  # type: ignore[return-value]
    if not url.startswith(("redis://", "rediss://", "unix://")):
        # Never echo the URL: it may carry a password.
        raise RedisURLError(f"redis.URL: must start with one of {', '.join(SCHEMES)}")
    return Redis.from_url(url, **COMMON)


def _sentinel(url: str) -> Redis:
    parts = urlsplit(url)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        password = unquote(cred.split(":", 1)[-1]) or None
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise RedisURLError(f"redis.URL: bad sentinel address {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise RedisURLError("redis.URL: redis+sentinel:// needs the service name as its path")
    db = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
    sentinel = Sentinel(hosts, password=password, db=db, **COMMON)
    return sentinel.master_for(path[0], password=password, db=db, **COMMON)


def embedded_for(config: Config) -> EmbeddedRedis:
    section = config.redis
    data_dir = Path(section.data_dir).expanduser()
    if not data_dir.is_absolute():
        data_dir = config.path.parent / data_dir
    return EmbeddedRedis(data_dir, section.redis_server, section.append_fsync)


@contextlib.asynccontextmanager
async def redis_for(config: Config, *, start: bool) -> AsyncIterator[Redis]:
    """The configured Redis; the embedded one when no URL is set.

    ``start`` (the daemon): run our own server and stop it on exit. Otherwise
    (status, dlq): attach to the running daemon's server, or start one on the
    data directory just for this command.
    """
    url = config.redis.url
    embedded: EmbeddedRedis | None = None
    if not url:
        embedded = embedded_for(config)
        if not start and embedded.attach():
            url, embedded = embedded.url, None
        else:
            url = embedded.start()
    client = connect(url)
    watchdog = None
    if embedded is not None and start:
        watchdog = asyncio.create_task(embedded.supervise(logging.getLogger("talkbridge.redis")))
    try:
        yield client
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await client.aclose()
        if embedded is not None:
            embedded.stop()
