"""Gateway routing: directions, filters, nick formats, loops."""

from __future__ import annotations

from pathlib import Path

from adapters import AdapterRegistry
from bridge.cli import protocol_specs
from bridge.config import load_config
from bridge.events import Event, EventKind
from bridge.router import Router, go_replacement


def router(tmp_path: Path, text: str) -> Router:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return Router(load_config(path, protocol_specs(AdapterRegistry())))


def accounts(*names: str, **options: str) -> str:
    out = []
    for i, name in enumerate(names):
        out.append(f'[api.{name}]\nBindAddress = "127.0.0.1:{6000 + i}"\n')
        for key, value in options.items():
            if key.startswith(name + "_"):
                out.append(f"{key[len(name) + 1 :]} = {value}\n")
    return "".join(out)


def gateway(name: str, *entries: tuple[str, str, str]) -> str:
    out = f'[[gateway]]\nname = "{name}"\nenable = true\n'
    for direction, account, channel in entries:
        out += f'[[gateway.{direction}]]\naccount = "api.{account}"\nchannel = "{channel}"\n'
    return out


def msg(account: str, channel: str = "api", text: str = "hello", nick: str = "alice", **kw) -> Event:
    return Event(kind=EventKind.MESSAGE, account=f"api.{account}", channel=channel, sender_name=nick, text=text, **kw)


def dests(deliveries) -> list[tuple[str, str]]:
    return sorted((d.account, d.channel) for d in deliveries)


def test_directions(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b", "c", "d")
        + gateway("g", ("inout", "a", "x"), ("in", "b", "x"), ("out", "c", "x"), ("inout", "d", "x")),
    )
    assert dests(r.route(msg("a", "x"))) == [("api.c", "x"), ("api.d", "x")]  # never back to a, never to in-only b
    assert dests(r.route(msg("b", "x"))) == [("api.a", "x"), ("api.c", "x"), ("api.d", "x")]
    assert r.route(msg("c", "x")) == []  # out-only channels send nothing
    assert r.route(msg("a", "elsewhere")) == []  # a channel in no gateway


def test_same_destination_through_two_gateways_gets_one_copy(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b")
        + gateway("g1", ("inout", "a", "x"), ("inout", "b", "y"))
        + gateway("g2", ("inout", "a", "x"), ("inout", "b", "y")),
    )
    assert dests(r.route(msg("a", "x"))) == [("api.b", "y")]


def test_event_gateway_restricts_routing(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b", "c")
        + gateway("g1", ("inout", "a", "api"), ("inout", "b", "api"))
        + gateway("g2", ("inout", "a", "api"), ("inout", "c", "api")),
    )
    assert dests(r.route(msg("a", gateway="g2"))) == [("api.c", "api")]
    assert dests(r.route(msg("a"))) == [("api.b", "api"), ("api.c", "api")]


def test_remote_nick_format_is_the_destinations_with_source_placeholders(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts(
            "a",
            "b",
            a_Label='"LA"',
            b_RemoteNickFormat='"[{PROTOCOL}/{BRIDGE}] <{NICK}> {USERID} {LABEL} {GATEWAY} {CHANNEL} {NOPINGNICK}"',
        )
        + gateway("gw", ("inout", "a", "x"), ("inout", "b", "y")),
    )
    [d] = r.route(msg("a", "x", sender_id="u1"))
    assert d.username == "[api/a] <alice> u1 LA gw x a\u200blice"
    [back] = r.route(msg("b", "y"))
    assert back.username == "alice"  # a has no RemoteNickFormat: Matterbridge's "{NICK}"


def test_protocols_md_example(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        '[general]\nRemoteNickFormat = "[{PROTOCOL}/{BRIDGE}] <{NICK}> "\n'
        + accounts("a", "b")
        + gateway("g", ("inout", "a", "api"), ("inout", "b", "api")),
    )
    [d] = r.route(msg("a"))
    assert d.username == "[api/a] <alice> "


def test_ignore_filters_are_the_sources(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b", a_IgnoreNicks='"^bot spam.*bot"', a_IgnoreMessages='"^!cmd secret"')
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x")),
    )
    assert r.route(msg("a", "x", nick="botty")) == []
    assert r.route(msg("a", "x", nick="spamXbot")) == []
    assert r.route(msg("a", "x", text="!cmd run")) == []
    assert r.route(msg("a", "x", text="a secret here")) == []
    assert len(r.route(msg("a", "x", text="fine"))) == 1
    assert len(r.route(msg("b", "x", nick="botty"))) == 1  # b has no filters


def test_empty_messages_are_dropped(tmp_path: Path) -> None:
    r = router(tmp_path, accounts("a", "b") + gateway("g", ("inout", "a", "x"), ("inout", "b", "x")))
    assert r.route(msg("a", "x", text="")) == []


def test_replace_rules_with_go_backreferences(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts(
            "a",
            "b",
            a_ReplaceMessages='[["cat", "dog"], ["(\\\\w+)@example", "$1 at example"]]',
            a_ReplaceNicks='[["^al(.*)", "AL${1}"]]',
            b_RemoteNickFormat='"<{NICK}> "',
        )
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x")),
    )
    [d] = r.route(msg("a", "x", text="cat mail bob@example"))
    assert d.text == "dog mail bob at example"
    assert d.username == "<ALice> "
    assert go_replacement("$1-${2}-$name-\\") == "\\g<1>-\\g<2>-$name-\\\\"


def test_origin_trail_stops_loops(tmp_path: Path) -> None:
    r = router(
        tmp_path, accounts("a", "b", "c") + gateway("g", ("inout", "a", "x"), ("inout", "b", "x"), ("inout", "c", "x"))
    )
    assert dests(r.route(msg("a", "x", origin=["api.a/x", "api.c/x"]))) == [("api.b", "x")]


def test_join_leave_only_where_show_join_part(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b", "c", c_ShowJoinPart="true")
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x"), ("inout", "c", "x")),
    )
    join = Event(kind=EventKind.JOIN, account="api.a", channel="x", sender_name="alice")
    assert dests(r.route(join)) == [("api.c", "x")]


def test_wildcard_channel_matches_every_room(tmp_path: Path) -> None:
    r = router(tmp_path, accounts("bot", "b") + gateway("g", ("inout", "bot", "*"), ("inout", "b", "x")))
    assert dests(r.route(msg("bot", "room1"))) == [("api.b", "x")]
    fan = r.route(msg("b", "x"), rooms={"api.bot": {"r2", "r1"}})
    assert dests(fan) == [("api.bot", "r1"), ("api.bot", "r2")]
    assert r.route(msg("b", "x")) == []  # no rooms known yet
