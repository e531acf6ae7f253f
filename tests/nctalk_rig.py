"""Shared set-up for the Talk user-account tests: a config, the adapter with
the context the daemon would give it, its receive loop as a task, and the
events it published."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from adapters.nctalk import TalkUser
from bridge.config import Config
from bridge.events import Event
from tests.adapter_rig import AdapterRig, connected_parts, delivery, gateway
from tests.helpers import SENTINEL, has_sentinel
from tests.talkbot_rig import until_sentinel, write_config
from tests.talkserver import TalkServer
from tests.talkserver.state import Actor

__all__ = ["PASSWORD", "UserRig", "delivery", "gateway", "load", "past_sentinel", "start_user_rig", "user_section"]

PASSWORD = "app-password-Zq8w-Lk2p-Ttt9-Mn4c"


def user_section(name: str, server: str, login: str = "bridge", password: str = PASSWORD, **extra: Any) -> str:
    lines = [f"[nctalk.{name}]", f'Server = "{server}"']
    if login:
        lines += [f'Login = "{login}"', f'Password = "{password}"']
    for key, value in extra.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {str(value).lower()}")
    return "\n".join(lines) + "\n"


def load(tmp_path: Path, body: str) -> Config:
    return write_config(tmp_path / "talkbridge.toml", body)


class UserRig(AdapterRig[TalkUser]):
    async def cursor(self, token: str) -> int | None:
        raw = await self.redis.hget(self.adapter.cursor_key, token)
        return int(raw) if raw is not None else None


async def past_sentinel(rig: UserRig, talk: TalkServer, author: Actor, *rooms: str) -> list[Event]:
    """The events published so far, once a sentinel ``author`` says in each
    of ``rooms`` after them is among them: a room is polled in order, so a
    late or repeated event of it is published before its sentinel."""

    async def say() -> None:
        for room in rooms:
            await talk.post(room, author, SENTINEL)

    return await until_sentinel(say, rig.events, lambda e: has_sentinel(e.text), count=len(rooms),
                                what="a sentinel from each room")  # fmt: skip


async def start_user_rig(config: Config, account: str, redis: Redis, receive: bool = True) -> UserRig:
    rig = UserRig(*await connected_parts(TalkUser, config, account, redis))
    if receive:
        rig.start()
    return rig
