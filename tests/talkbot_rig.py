"""Shared set-up for the Talk bot tests: configs, an in-process adapter
served on a real port, and async polling with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from redis.asyncio import Redis

from adapters import AdapterRegistry
from adapters.nctalk_bot import TalkBot
from bridge.adapter import AdapterContext
from bridge.bus import Bus, BusSettings
from bridge.cli import protocol_specs
from bridge.config import Config, load_config
from bridge.daemon import adapter_context
from bridge.idmap import IdMap
from bridge.metrics import Metrics
from workers.feature_settings import FEATURE_SPECS

SECRET = "s3cr3t-" + "x" * 40  # 47 chars: Talk wants 40..128
T = TypeVar("T")


def write_config(path: Path, body: str) -> Config:
    path.write_text(body)
    return load_config(path, protocol_specs(AdapterRegistry()), features=FEATURE_SPECS)


def bot_section(name: str, server: str, secret: str = SECRET, **extra: Any) -> str:
    lines = [f"[nctalkbot.{name}]", f'Server = "{server}"', f'BotSecret = "{secret}"']
    for key, value in extra.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


async def until(condition: Callable[[], Awaitable[T] | T], within: float = 15.0, what: str = "condition") -> T:
    """Poll (sync or async condition) until truthy; the deadline only bounds a failure."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def until_sentinel(
    send: Callable[[], object],
    observe: Callable[[], Awaitable[Sequence[T]] | Sequence[T]],
    is_sentinel: Callable[[T], bool],
    count: int = 1,
    within: float = 30.0,
    what: str = "the sentinel",
) -> list[T]:
    """``tests.helpers.through_sentinel`` for a test whose loop runs in its
    own event loop: ``send()`` (sync or async) posts the sentinel(s) down the
    path the run's messages took, ``observe()`` (sync or async) is polled
    until ``count`` items satisfy ``is_sentinel``; what it shows without them
    is returned. A duplicate of the run arrives before the sentinel (a room's
    messages go in order); a sentinel seen more often than sent is one too."""
    sent = send()
    if asyncio.iscoroutine(sent):
        await sent

    async def arrived() -> list[T] | None:
        items = observe()
        if asyncio.iscoroutine(items) or isinstance(items, asyncio.Future):
            items = await items
        items = list(items)  # type: ignore[arg-type]
        return items if sum(1 for x in items if is_sentinel(x)) >= count else None

    items = await until(arrived, within=within, what=what)
    marks = sum(1 for x in items if is_sentinel(x))
    assert marks == count, f"{what}: {marks} sentinel(s) arrived, {count} sent"
    return [x for x in items if not is_sentinel(x)]


async def until_quiet(
    observe: Callable[[], Awaitable[T] | T], quiet: float = 1.0, within: float = 30.0, what: str = "quiet"
) -> T:
    """Keep observing (sync or async) until the value has not changed for
    ``quiet`` seconds; return it. An observation window after a count-reached
    wait, only where no sentinel can follow the run (``until_sentinel`` is
    the rule; see ``tests.helpers.wait_quiet`` for when); the deadline only
    bounds a failure (a value that never settles)."""

    async def look() -> T:
        value = observe()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        return value  # type: ignore[return-value]

    value = await look()
    deadline = time.monotonic() + within
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still changing after {within} s")
        await asyncio.sleep(0.02)
        new = await look()
        if new != value:
            value, since = new, time.monotonic()
    return value


@dataclass
class Rig:
    adapter: TalkBot
    ctx: AdapterContext
    bus: Bus
    redis: Redis
    metrics: Metrics
    url: str  # the webhook URL
    runner: web.AppRunner

    @property
    def stream(self) -> str:
        return self.bus.inbound(self.ctx.account.name)

    async def events(self) -> list[dict[str, Any]]:
        from bridge.events import event_from_wire

        rows = await self.redis.xrange(self.stream)
        return [event_from_wire(fields[b"d"]).to_dict() for _id, fields in rows]

    async def close(self) -> None:
        await self.adapter.disconnect()
        await self.runner.cleanup()


async def start_rig(config: Config, account: str, redis: Redis, bus: Bus | None = None) -> Rig:
    """The account's adapter, with the context the daemon would give it
    (``bridge.daemon.adapter_context``), serving its webhook on a real port;
    ``bus``: one of the test's own (its settings), passed in the context too."""
    given = bus
    bus = bus or Bus(redis, BusSettings())
    metrics = Metrics()
    idmap = IdMap(redis, bus.prefix, 3600)
    ctx = adapter_context(config, account, redis, bus.publish, metrics, bus.prefix, idmap, bus=given)
    adapter = TalkBot(ctx)
    app = web.Application(client_max_size=ctx.max_body)
    app.add_routes(adapter.ingress_routes())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await adapter.connect()
    url = f"http://127.0.0.1:{port}/webhook/nextcloud/{ctx.account.bridge}"
    return Rig(adapter, ctx, bus, redis, metrics, url, runner)
