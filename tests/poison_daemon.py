"""A network whose adapter has a bug one message triggers, and ``talkbridge``
with it registered: ``python -m tests.poison_daemon run --config FILE``.

``[poison.NAME]`` accounts record what they deliver in the Redis list
``poison:sent:NAME`` (the "network" the test reads). Sending a message whose
text is the account's ``Poison`` value raises ``KeyError`` — an exception no
adapter contract foresees.
"""

from __future__ import annotations

import sys
from typing import ClassVar

from adapters import PROTOCOLS, AdapterRegistry
from bridge.adapter import Adapter, Option
from bridge.events import Delivery


class PoisonAdapter(Adapter):
    protocol = "poison"
    options: ClassVar[dict[str, Option]] = {"Poison": Option(str, default="")}

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    def sent_key(self) -> str:
        return f"poison:sent:{self.ctx.account.name}"

    async def send(self, delivery: Delivery) -> str | None:
        poison = self.ctx.account.get("Poison", "")
        if poison and delivery.text == poison:
            return {}["the field this adapter's author was sure every message has"]
        await self.ctx.redis.rpush(self.sent_key(), delivery.text)
        return None


def registry() -> AdapterRegistry:
    return AdapterRegistry({**PROTOCOLS, "poison": "tests.poison_daemon:PoisonAdapter"})


if __name__ == "__main__":
    from bridge.cli import main

    sys.exit(main(sys.argv[1:], adapters=registry()))
