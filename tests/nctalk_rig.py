"""Shared set-up for the Talk user-account tests: a config, the adapter with
the context the daemon would give it, its receive loop as a task, and the
events it published."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from adapters.nctalk import TalkUser
from bridge.bus import Bus, BusSettings
from bridge.config import Config
from bridge.daemon import adapter_context
from bridge.events import Delivery, Event, EventKind, event_from_wire
from bridge.idmap import IdMap
from bridge.metrics import Metrics
from tests.talkbot_rig import write_config

PASSWORD = "app-password-Zq8w-Lk2p-Ttt9-Mn4c"


def user_section(name: str, server: str, login: str = "bridge", password: str = PASSWORD, **extra: Any) -> str:
    lines = [f"[nctalk.{name}]", f'Server = "{server}"']
    if login:
        lines += [f'Login = "{login}"', f'Password = "{password}"']
    for key, value in extra.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {str(value).lower()}")
    return "\n".join(lines) + "\n"


def gateway(name: str, *entries: tuple[str, str]) -> str:
    out = f'[[gateway]]\nname = "{name}"\nenable = true\n'
    for account, channel in entries:
        out += f'[[gateway.inout]]\naccount = "{account}"\nchannel = "{channel}"\n'
    return out


def load(tmp_path: Path, body: str) -> Config:
    return write_config(tmp_path / "talkbridge.toml", body)


@dataclass
class UserRig:
    adapter: TalkUser
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

    async def cursor(self, token: str) -> int | None:
        raw = await self.redis.hget(self.adapter.cursor_key, token)
        return int(raw) if raw is not None else None


async def start_user_rig(config: Config, account: str, redis: Redis, receive: bool = True) -> UserRig:
    bus = Bus(redis, BusSettings())
    metrics = Metrics()
    idmap = IdMap(redis, bus.prefix, 3600)
    ctx = adapter_context(config, account, redis, bus.publish, metrics, bus.prefix, idmap)
    adapter = TalkUser(ctx)
    await adapter.connect()
    for channel in ctx.channels:
        await adapter.join(channel)
    rig = UserRig(adapter, redis, bus, metrics, idmap)
    if receive:
        rig.start()
    return rig


def delivery(
    source: Event, account: str, channel: str, username: str = "[api/a] <bob> ", *, text: str | None = None,
    reply_to: str | None = None, target_id: str | None = None,
) -> Delivery:  # fmt: skip
    d = Delivery(source, account, channel, "g", username, source.text if text is None else text)
    d.reply_to, d.target_id = reply_to, target_id
    return d
