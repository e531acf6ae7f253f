"""Shared set-up for the Talk user-account tests: a config, the adapter with
the context the daemon would give it, its receive loop as a task, and the
events it published."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from adapters.nctalk import TalkUser
from bridge.config import Config
from tests.adapter_rig import AdapterRig, connected_parts, delivery, gateway
from tests.talkbot_rig import write_config

__all__ = ["PASSWORD", "UserRig", "delivery", "gateway", "load", "start_user_rig", "user_section"]

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


async def start_user_rig(config: Config, account: str, redis: Redis, receive: bool = True) -> UserRig:
    rig = UserRig(*await connected_parts(TalkUser, config, account, redis))
    if receive:
        rig.start()
    return rig
