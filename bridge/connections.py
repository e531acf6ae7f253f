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
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError

from bridge.config_keys import REDIS_SCHEMES
from bridge.embedded_redis import EmbeddedRedis

if TYPE_CHECKING:
    from bridge.config import Config

# Blocking reads (XREADGROUP BLOCK) must not trip a socket timeout. No
# periodic health checks: every caller already retries on a broken connection,
# and the check costs a clock read on every command. TCP keepalive instead,
# probing an idle connection after 5 seconds: a master that
# vanished without closing its sockets (power lost, a partition) leaves a
# blocked read or a pub/sub listener waiting for ever otherwise; with it the
# kernel gives up within idle + interval x count (about 11 s) and the caller
# reconnects (through Sentinel: to the promoted replica).
KEEPALIVE = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}  # seconds, seconds, probes
KEEPALIVE_OPTIONS: dict[int, int] = {  # Linux's names; elsewhere the system's values stay
    getattr(socket, name): value for name, value in KEEPALIVE.items() if hasattr(socket, name)
}
COMMON: dict[str, Any] = {"socket_timeout": None, "socket_connect_timeout": 5}
TCP: dict[str, Any] = COMMON | {"socket_keepalive": True, "socket_keepalive_options": KEEPALIVE_OPTIONS}
# Through Sentinel a connection is tried at the address the sentinels name, a
# dead master's until they agree on another: a short connect timeout keeps an
# ingress request that meets it a quick 503 (Talk waits 5 s for a webhook).
SENTINEL_CONNECT_TIMEOUT = 2


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
    return Redis.from_url(url, **(COMMON if url.startswith("unix://") else TCP))


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
    options = TCP | {"socket_connect_timeout": SENTINEL_CONNECT_TIMEOUT}
    sentinel = Sentinel(hosts, password=password, db=db, **options)
    return sentinel.master_for(path[0], password=password, db=db, connection_class=MasterConnection, **options)


class MasterConnection(SentinelManagedConnection):
    """A connection to the master Sentinel names. redis-py turns a READONLY
    answer (the server was demoted: a failover) into a connection error that
    makes the next connection ask the sentinels again, but only a plain
    ``-READONLY`` reply: not one inside a transaction's EXEC reply (a list),
    nor Redis 6.2's error of a script that wrote (``Error running script …
    -READONLY …``). Either left the connection on the replica, refusing every
    later write of the group commits and the fenced scripts."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if demoted(exc):
                await self._rediscover()
            raise
        if isinstance(response, list) and any(demoted(item) for item in response):
            await self._rediscover()
        return response

    async def _rediscover(self) -> None:
        await self.disconnect()
        raise RedisConnectionError("the Redis master is now a replica (READONLY): asking the sentinels again")


def demoted(reply: object) -> bool:
    """A write refused by a replica, in any of the forms Redis 6.2 and 7 give it."""
    return isinstance(reply, ReadOnlyError) or (
        isinstance(reply, ResponseError) and "READONLY You can't write against a read only" in str(reply)
    )


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
