"""What the adapter rigs share (tests/nctalk_rig.py, tests/matrix_rig.py): a
gateway's TOML, the adapter with the context the daemon would give it
(``bridge.daemon.adapter_context``), its receive loop as a task, and the
events it published."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from redis.asyncio import Redis

from bridge.adapter import Adapter
from bridge.bus import Bus, bus_for
from bridge.config import Config
from bridge.daemon import adapter_context
from bridge.events import Delivery, Event, EventKind, event_from_wire
from bridge.idmap import Fence, IdMap
from bridge.metrics import Metrics
from tests.helpers import ConfigToml

A = TypeVar("A", bound=Adapter)


def gateway(name: str, *entries: tuple[str, str]) -> str:
    """``[[gateway]]`` with its two-way ``(account, channel)`` pairs, as ``ConfigToml`` writes it."""
    return ConfigToml().gateway(name, *entries).text()


@dataclass
class AdapterRig(Generic[A]):
    adapter: A
    redis: Redis
    bus: Bus
    metrics: Metrics
    idmap: IdMap
    task: asyncio.Task[None] | None = None

    @property
    def account(self) -> str:
        return self.adapter.name

    async def events(self) -> list[Event]:
        rows = await self.redis.xrange(self.bus.inbound(self.account))
        return [event_from_wire(fields[b"d"]) for _id, fields in rows]

    async def texts(self) -> list[str]:
        return [e.text for e in await self.events() if e.kind == EventKind.MESSAGE]

    def start(self) -> None:
        self.task = asyncio.create_task(self.adapter.receive())

    async def stop_receiving(self) -> BaseException | None:
        if self.task is None:
            return None
        task, self.task = self.task, None
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception as exc:
                return exc
        return None

    async def close(self) -> None:
        await self.stop_receiving()
        await self.adapter.disconnect()


async def connected_parts(
    adapter_class: type[A], config: Config, account: str, redis: Redis, fence: Callable[[], Fence | None] = lambda: None
) -> tuple[A, Redis, Bus, Metrics, IdMap]:
    """An ``AdapterRig``'s fields: the adapter connected and joined to its channels,
    with its Redis, bus (the config's ``[bus]``), metrics and id map; ``fence``
    the lease token its writes carry (None: unfenced, as without a lease)."""
    bus = bus_for(config, redis)
    metrics = Metrics()
    idmap = IdMap(redis, bus.prefix, 3600)
    ctx = adapter_context(config, account, redis, bus.publish, metrics, bus.prefix, idmap, fence=fence, bus=bus)
    adapter = adapter_class(ctx)
    await adapter.connect()
    for channel in ctx.channels:
        await adapter.join(channel)
    return adapter, redis, bus, metrics, idmap


def delivery(
    source: Event, account: str, channel: str, username: str = "[api/a] <bob> ", *, text: str | None = None,
    reply_to: str | None = None, target_id: str | None = None,
) -> Delivery:  # fmt: skip
    d = Delivery(source, account, channel, "g", username, source.text if text is None else text)
    d.reply_to, d.target_id = reply_to, target_id
    return d
