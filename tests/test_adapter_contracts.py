"""What the core and the adapters share, each in one named place (issue 7,
item 2): the rooms set through ``AdapterContext.rooms``, read by the route
loop through the same class, and subcommands an adapter registers."""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import TextIO

import pytest
from redis.asyncio import Redis

from adapters import AdapterRegistry
from bridge.adapter import AdapterContext, CliCommand
from bridge.bus import Bus, BusSettings
from bridge.cli import main, parser, protocol_specs
from bridge.config import Config, ConfigError, load_config
from bridge.metrics import Metrics
from bridge.relay import RouteLoop
from bridge.router import Router
from tests.poison_daemon import PoisonAdapter

CONFIG = """
[poison.everywhere]
[poison.fixed]

[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "poison.everywhere"
channel = "*"
[[gateway.inout]]
account = "poison.fixed"
channel = "room"
"""


def shout(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    if args.account not in config.accounts:
        raise ConfigError([f'shout: no account "{args.account}"'])
    print(f"{args.account} says {args.word.upper()}", file=out)
    return 0


class CommandingAdapter(PoisonAdapter):
    protocol = "commanding"

    @classmethod
    def cli_commands(cls) -> tuple[CliCommand, ...]:
        def arguments(p: argparse.ArgumentParser) -> None:
            p.add_argument("account")
            p.add_argument("--word", default="hello")

        return (CliCommand("shout", "say a word as an account", arguments, shout),)


async def test_the_route_loop_reads_the_rooms_an_adapter_keeps_through_its_context(
    tmp_path: Path, redis: Redis
) -> None:
    path = tmp_path / "t.toml"
    path.write_text(CONFIG)
    config = load_config(path, protocol_specs({"poison": PoisonAdapter}))
    bus = Bus(redis, BusSettings())
    ctx = AdapterContext(
        account=config.accounts["poison.everywhere"],
        publish=bus.publish,
        redis=redis,
        metrics=Metrics(),
        log=logging.getLogger("test"),
        key_prefix=bus.prefix,
    )
    loop = RouteLoop(bus, Router(config), "poison.fixed", "c1", Metrics(), logging.getLogger("test"))
    assert await loop.rooms() == {"poison.everywhere": set()}
    await ctx.rooms.add("r1", "r2", "r3")
    await ctx.rooms.remove("r2")
    assert await loop.rooms() == {"poison.everywhere": {"r1", "r3"}}
    assert await ctx.rooms.members() == {"r1", "r3"}


def test_an_adapter_brings_its_own_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.toml"
    path.write_text(CONFIG.replace("[poison.fixed]", "[commanding.fixed]").replace("poison.fixed", "commanding.fixed"))
    adapters = {"poison": PoisonAdapter, "commanding": CommandingAdapter}
    out = io.StringIO()
    assert main(["shout", "-c", str(path), "commanding.fixed", "--word", "hi"], out, adapters) == 0
    assert out.getvalue() == "commanding.fixed says HI\n"
    assert main(["shout", "-c", str(path), "nobody"], io.StringIO(), adapters) == 2
    assert 'shout: no account "nobody"' in capsys.readouterr().err
    # without the adapter, there is no such command
    with pytest.raises(SystemExit) as exit_:
        main(["shout", "-c", str(path), "commanding.fixed"], io.StringIO(), {"poison": PoisonAdapter})
    assert exit_.value.code == 2


def test_a_subcommand_name_is_taken_once() -> None:
    class Clashing(CommandingAdapter):
        @classmethod
        def cli_commands(cls) -> tuple[CliCommand, ...]:
            return (CliCommand("status", "a second status", lambda p: None, shout),)

    with pytest.raises(ValueError, match="'status' is already taken"):
        parser({"clashing": Clashing})


def test_talk_bot_command_comes_from_the_talk_bot_adapter() -> None:
    registry = AdapterRegistry()
    commands = {c.name for protocol in registry for c in registry[protocol].cli_commands()}
    assert commands == {"talk-bot-command", "matrix-register"}
    assert [c.name for c in registry["nctalkbot"].cli_commands()] == ["talk-bot-command"]
