"""Gateway routing: directions, filters, nick formats, loops.

The accounts are of a plain protocol, ``chat``, whose gateway entries name
their channels (an api account's channel is always "api")."""

from __future__ import annotations

from pathlib import Path

from bridge.config import load_config
from bridge.events import Attachment, Event, EventKind
from bridge.options import ProtocolSpec
from bridge.router import Router

SPECS = {"chat": ProtocolSpec("chat", {})}


def router(tmp_path: Path, text: str) -> Router:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return Router(load_config(path, SPECS))


def accounts(*names: str, **options: str) -> str:
    out = []
    for name in names:
        out.append(f"[chat.{name}]\n")
        for key, value in options.items():
            if key.startswith(name + "_"):
                out.append(f"{key[len(name) + 1 :]} = {value}\n")
    return "".join(out)


def gateway(name: str, *entries: tuple[str, str, str]) -> str:
    out = f'[[gateway]]\nname = "{name}"\nenable = true\n'
    for direction, account, channel in entries:
        out += f'[[gateway.{direction}]]\naccount = "chat.{account}"\nchannel = "{channel}"\n'
    return out


def msg(account: str, channel: str = "api", text: str = "hello", nick: str = "alice", **kw) -> Event:
    return Event(kind=EventKind.MESSAGE, account=f"chat.{account}", channel=channel, sender_name=nick, text=text, **kw)


def dests(deliveries) -> list[tuple[str, str]]:
    return sorted((d.account, d.channel) for d in deliveries)


def test_directions(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b", "c", "d")
        + gateway("g", ("inout", "a", "x"), ("in", "b", "x"), ("out", "c", "x"), ("inout", "d", "x")),
    )
    assert dests(r.route(msg("a", "x"))) == [("chat.c", "x"), ("chat.d", "x")]  # never back to a, never to in-only b
    assert dests(r.route(msg("b", "x"))) == [("chat.a", "x"), ("chat.c", "x"), ("chat.d", "x")]
    assert r.route(msg("c", "x")) == []  # out-only channels send nothing
    assert r.route(msg("a", "elsewhere")) == []  # a channel in no gateway


def test_same_destination_through_two_gateways_gets_one_copy(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b")
        + gateway("g1", ("inout", "a", "x"), ("inout", "b", "y"))
        + gateway("g2", ("inout", "a", "x"), ("inout", "b", "y")),
    )
    assert dests(r.route(msg("a", "x"))) == [("chat.b", "y")]


def test_event_gateway_restricts_routing(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b", "c")
        + gateway("g1", ("inout", "a", "api"), ("inout", "b", "api"))
        + gateway("g2", ("inout", "a", "api"), ("inout", "c", "api")),
    )
    assert dests(r.route(msg("a", gateway="g2"))) == [("chat.c", "api")]
    assert dests(r.route(msg("a"))) == [("chat.b", "api"), ("chat.c", "api")]


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
    assert d.username == "[chat/a] <alice> u1 LA gw x a\u200blice"
    [back] = r.route(msg("b", "y"))
    assert back.username == "alice"  # a has no RemoteNickFormat: Matterbridge's "{NICK}"


def test_a_message_relayed_by_another_bridge_is_named_by_its_network(tmp_path: Path) -> None:
    """A Matterbridge relays IRC to us: {PROTOCOL}/{BRIDGE} name IRC's account, not ours."""
    r = router(
        tmp_path,
        accounts("a", "b", b_RemoteNickFormat='"[{PROTOCOL}/{BRIDGE}] <{NICK}> "')
        + gateway("gw", ("inout", "a", "x"), ("inout", "b", "y")),
    )
    relayed = msg("a", "x")
    relayed.relayed_from = "irc.libera"
    [d] = r.route(relayed)
    assert d.username == "[irc/libera] <alice> "
    relayed.relayed_from = "api"  # an account without a name part names its protocol twice, as bridge_name does
    [d] = r.route(relayed)
    assert d.username == "[api/api] <alice> "


def test_protocols_md_example(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        '[general]\nRemoteNickFormat = "[{PROTOCOL}/{BRIDGE}] <{NICK}> "\n'
        + accounts("a", "b")
        + gateway("g", ("inout", "a", "api"), ("inout", "b", "api")),
    )
    [d] = r.route(msg("a"))
    assert d.username == "[chat/a] <alice> "


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


def test_origin_trail_stops_loops(tmp_path: Path) -> None:
    r = router(
        tmp_path, accounts("a", "b", "c") + gateway("g", ("inout", "a", "x"), ("inout", "b", "x"), ("inout", "c", "x"))
    )
    assert dests(r.route(msg("a", "x", origin=["chat.a/x", "chat.c/x"]))) == [("chat.b", "x")]


def test_join_leave_only_where_show_join_part(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        accounts("a", "b", "c", c_ShowJoinPart="true")
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x"), ("inout", "c", "x")),
    )
    join = Event(kind=EventKind.JOIN, account="chat.a", channel="x", sender_name="alice", text="alice joins")
    assert dests(r.route(join)) == [("chat.c", "x")]


def test_wildcard_channel_matches_every_room(tmp_path: Path) -> None:
    r = router(tmp_path, accounts("bot", "b") + gateway("g", ("inout", "bot", "*"), ("inout", "b", "x")))
    assert dests(r.route(msg("bot", "room1"))) == [("chat.b", "x")]
    fan = r.route(msg("b", "x"), rooms={"chat.bot": {"r2", "r1"}})
    assert dests(fan) == [("chat.bot", "r1"), ("chat.bot", "r2")]
    assert r.route(msg("b", "x")) == []  # no rooms known yet


# Matterbridge v1.26 line, read through the search tool (42wim/matterbridge):
#   gateway/gateway.go   @ 4ab72acec656dafd304f88359b509b1f27c06604
#   gateway/handlers.go  @ 3c36f651beafbaeca36a7112a47378e8a4d19d7d
#   gateway/router.go    @ 802dc3c324a3a1224519ba95ab615199f6368391
#   bridge/discord/handlers.go @ 03b19062a548b47275e6ab58f01f97dd373a4bbb


def edit(account: str, channel: str = "x", text: str = "fixed", nick: str = "alice") -> Event:
    return Event(
        kind=EventKind.EDIT, account=f"chat.{account}", channel=channel, sender_name=nick, text=text, target_id="m1"
    )


def test_edit_disable_drops_the_edits_made_on_that_account(tmp_path: Path) -> None:
    """bridge/discord/handlers.go messageUpdate (lines 19-29): ``if
    b.GetBool("EditDisable") { return }`` -- the account that *receives* an
    edit from its network does not relay it; its messages still cross, and
    other accounts' edits still reach it."""
    r = router(
        tmp_path, accounts("a", "b", a_EditDisable="true") + gateway("g", ("inout", "a", "x"), ("inout", "b", "x"))
    )
    assert r.route(edit("a")) == []
    assert dests(r.route(msg("a", "x"))) == [("chat.b", "x")]
    assert dests(r.route(edit("b"))) == [("chat.a", "x")]


def test_edit_suffix_is_appended_to_the_sources_edits_before_its_rules(tmp_path: Path) -> None:
    """bridge/discord/handlers.go messageUpdate (lines 19-29): ``m.Content +=
    b.GetString("EditSuffix")`` where the edit is received, so the gateway's
    IgnoreMessages and ReplaceMessages (gateway.go ignoreMessage,
    modifyMessage) see the text with its suffix. Messages get no suffix, and
    the destination's EditSuffix plays no part."""
    r = router(
        tmp_path,
        accounts(
            "a",
            "b",
            a_EditSuffix='" (edited)"',
            a_ReplaceMessages='[["[(]edited[)]$", "(fixed)"]]',
            a_IgnoreMessages='"^skip.[(]edited"',
            b_EditSuffix='" [b]"',
        )
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x")),
    )
    [copy] = r.route(edit("a", text="typo"))
    assert copy.text == "typo (fixed)"
    assert r.route(edit("a", text="skip")) == []  # matched only with the suffix
    [plain] = r.route(msg("a", "x", text="new"))
    assert plain.text == "new"
    [other] = r.route(edit("b", text="typo"))
    assert other.text == "typo [b]"


def test_strip_nick_is_the_destinations_ascii_only_and_before_replace_nicks(tmp_path: Path) -> None:
    """gateway/gateway.go modifyUsername: ``if dest.GetBool("StripNick")``
    removes ``[^a-zA-Z0-9]+`` from the nick, then the source's ReplaceNicks
    run on what is left."""
    r = router(
        tmp_path,
        accounts("a", "b", "c", a_StripNick="true", a_ReplaceNicks='[["^", "~"]]', b_StripNick="true")
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x"), ("inout", "c", "x")),
    )
    by_dest = {d.account: d.username for d in r.route(msg("a", "x", nick="Zoë_b-1"))}
    assert by_dest == {"chat.b": "~Zob1", "chat.c": "~Zoë_b-1"}  # a's own StripNick plays no part
    [to_a] = [d for d in r.route(msg("b", "x", nick="Zoë b")) if d.account == "chat.a"]
    assert to_a.username == "Zob"


def test_preserve_threading_is_the_destinations(tmp_path: Path) -> None:
    """gateway/handlers.go handleMessage: ``if rmsg.ParentID != "" &&
    dest.GetBool("PreserveThreading")`` -- only then does the copy get its
    parent. talkbridge's default is true (replies have always crossed);
    PreserveThreading = false on a destination sends its copies unthreaded."""
    r = router(
        tmp_path,
        accounts("a", "b", "c", b_PreserveThreading="false")
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x"), ("inout", "c", "x")),
    )
    replies = {d.account: d.event.reply_to for d in r.route(msg("a", "x", reply_to="p1"))}
    assert replies == {"chat.b": None, "chat.c": "p1"}


def test_ignore_filters_apply_to_every_kind_of_event(tmp_path: Path) -> None:
    """gateway/router.go handleReceive runs gateway.go ignoreMessage on every
    message whatever its event: IgnoreNicks on the nick, IgnoreMessages on the
    text (a join's, an edit's) and on each file's comment
    (ignoreFilesComment). Our reactions carry their emoji where
    Matterbridge's api carries text. (IgnoreNicks already held on every kind;
    IgnoreMessages did not on joins, reactions and captions.)"""
    r = router(
        tmp_path,
        accounts("a", "b", a_IgnoreNicks='"^bot"', a_IgnoreMessages='"secret 👎"', b_ShowJoinPart="true")
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x")),
    )

    def event(kind: EventKind, nick: str = "alice", **kw) -> Event:
        return Event(kind=kind, account="chat.a", channel="x", sender_name=nick, target_id="m1", **kw)

    assert r.route(event(EventKind.JOIN, text="alice has a secret")) == []
    assert r.route(event(EventKind.EDIT, text="now secret")) == []
    assert r.route(event(EventKind.REACTION, reaction="👎")) == []
    assert r.route(event(EventKind.UNREACTION, reaction="👎")) == []
    captioned = [Attachment("f.txt", data_b64="aGk=", caption="a secret file")]
    assert r.route(event(EventKind.MESSAGE, text="see", attachments=captioned)) == []
    for kind in (EventKind.JOIN, EventKind.EDIT, EventKind.DELETE, EventKind.REACTION):
        assert r.route(event(kind, nick="botty", text="hi", reaction="👍")) == [], kind
    # and what matches nothing still crosses
    assert len(r.route(event(EventKind.JOIN, text="alice joined"))) == 1
    assert len(r.route(event(EventKind.REACTION, reaction="👍"))) == 1
    assert len(r.route(event(EventKind.DELETE))) == 1


def test_router_uses_the_patterns_the_config_compiled(tmp_path: Path) -> None:
    """One compiled form: the loader compiles each rule to validate it, and
    the router matches with those objects instead of compiling again."""
    path = tmp_path / "r.toml"
    path.write_text(
        accounts("a", "b", a_IgnoreMessages='"^!"', a_ReplaceNicks='[["x", "y"]]')
        + gateway("g", ("inout", "a", "x"), ("inout", "b", "x"))
    )
    config = load_config(path, SPECS)
    rules = config.accounts["chat.a"].rules
    assert [p.pattern for p in rules.ignore_messages] == ["^!"]
    assert [(r.key, r.regexp.pattern, r.template.literal) for r in rules.replace_nicks] == [
        ("ReplaceNicks[0]", "x", b"y")
    ]
    r = Router(config)
    assert r.accounts["chat.a"].rules is rules
