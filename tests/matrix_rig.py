"""Shared set-up for the Matrix adapter tests: a bot user on the session's
Synapse, a room with a human in it, the adapter with the context the daemon
would give it, its receive loop as a task, and the events it published."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from adapters.matrix import Matrix
from bridge.config import Config
from bridge.events import Delivery, Event, EventKind
from tests.adapter_rig import AdapterRig, connected_parts, gateway
from tests.adapter_rig import delivery as account_delivery
from tests.helpers import SENTINEL, has_sentinel
from tests.synapse_rig import MatrixUser, SynapseServer, unique
from tests.talkbot_rig import until_sentinel, write_config

BOT_PASSWORD = "bot-password-9f3k"
ACCOUNT = "matrix.test"


def matrix_section(name: str, server: str, login: str = "", password: str = BOT_PASSWORD, **extra: Any) -> str:
    lines = [f"[matrix.{name}]", f'Server = "{server}"']
    if login:
        lines += [f'Login = "{login}"', f'Password = "{password}"']
    for key, value in extra.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = {json.dumps(value)}")  # a TOML array of strings
        else:
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


def api_section(port: int = 1) -> str:
    return f'[api.a]\nBindAddress = "127.0.0.1:{port}"\nToken = "t"\n'


@dataclass
class Room:
    """A room with a human (``alice``) and the bot invited."""

    synapse: SynapseServer
    alice: MatrixUser
    bot_login: str
    room_id: str

    @property
    def bot_id(self) -> str:
        return f"@{self.bot_login}:test.local"


def new_room(synapse: SynapseServer, invite_bot: bool = True, encrypted: bool = False) -> Room:
    bot_login = unique("bot")
    bot = synapse.register(bot_login, BOT_PASSWORD)
    bot.call("POST", "/_matrix/client/v3/logout", {})  # the registration's device: the adapter logs in itself
    bot.close()
    alice = synapse.register(unique("alice"))
    alice.call("PUT", f"/_matrix/client/v3/profile/{alice.user_id}/displayname", {"displayname": "Alice"})
    room_id = alice.create_room(invite=[bot.user_id] if invite_bot else [], encrypted=encrypted)
    return Room(synapse, alice, bot_login, room_id)


def room_config(tmp_path: Path, room: Room, channel: str | None = None, **extra: Any) -> Config:
    body = matrix_section("test", room.synapse.url, login=room.bot_login, **extra) + api_section()
    body += gateway("g", (ACCOUNT, channel or room.room_id), ("api.a", "api"))
    return write_config(tmp_path / "talkbridge.toml", body)


class MatrixRig(AdapterRig[Matrix]):
    async def synced(self) -> bool:
        return await self.redis.get(self.adapter.sync_key) is not None


async def past_sentinel(rig: MatrixRig, room: Room) -> list[Event]:
    """The events published so far, once a sentinel alice says in ``room``
    after them is among them: the room's timeline is synced in order, so a
    late or repeated event of it is published before the sentinel."""
    return await until_sentinel(lambda: room.alice.text(room.room_id, SENTINEL), rig.events,
                                lambda e: has_sentinel(e.text), what="the sentinel from the room")  # fmt: skip


async def start_rig(config: Config, redis: Redis, receive: bool = True) -> MatrixRig:
    rig = MatrixRig(*await connected_parts(Matrix, config, ACCOUNT, redis))
    if receive:
        rig.start()
    return rig


def delivery(
    source: Event, channel: str, username: str = "[api/a] <bob> ", *, text: str | None = None,
    reply_to: str | None = None, target_id: str | None = None,
) -> Delivery:  # fmt: skip
    return account_delivery(source, ACCOUNT, channel, username, text=text, reply_to=reply_to, target_id=target_id)


def api_event(text: str = "", kind: EventKind = EventKind.MESSAGE, **fields: Any) -> Event:
    return Event(kind=kind, account="api.a", channel="api", sender_name="bob", text=text, **fields)
