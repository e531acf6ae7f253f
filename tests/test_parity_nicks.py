"""Matterbridge parity, points 3 and 4 of issue 8: ``StripNick`` and
``RemoteNickFormat`` as gateway/gateway.go ``modifyUsername`` does them
(42wim/matterbridge v1.26 line, gateway.go @
4ab72acec656dafd304f88359b509b1f27c06604):

    if dest.GetBool("StripNick") {
        re := regexp.MustCompile("[^a-zA-Z0-9]+")
        msg.Username = re.ReplaceAllString(msg.Username, "")
    }
    nick := dest.GetString("RemoteNickFormat")
    for _, outer := range br.GetStringSlice2D("ReplaceNicks") { ... }   // br: the source
    if len(msg.Username) > 0 { nick = ReplaceAll(nick, "{NOPINGNICK}", first + "\\u200b" + rest) }
    nick = ReplaceAll(nick, "{BRIDGE}", br.Name)
    nick = ReplaceAll(nick, "{PROTOCOL}", br.Protocol)
    nick = ReplaceAll(nick, "{GATEWAY}", gw.Name)
    nick = ReplaceAll(nick, "{LABEL}", br.GetString("Label"))
    nick = ReplaceAll(nick, "{NICK}", msg.Username)
    nick = ReplaceAll(nick, "{USERID}", msg.UserID)
    nick = ReplaceAll(nick, "{CHANNEL}", msg.Channel)
    nick = ReplaceAll(nick, "{TENGO}", tengoNick)   // "" without a [tengo] RemoteNickFormat script
"""

from __future__ import annotations

from pathlib import Path

from bridge.config import load_config
from bridge.events import Event, EventKind
from bridge.options import ProtocolSpec
from bridge.router import Router

SPECS = {"chat": ProtocolSpec("chat", {})}
EVERY_PLACEHOLDER = "{NOPINGNICK}|{BRIDGE}|{PROTOCOL}|{GATEWAY}|{LABEL}|{NICK}|{USERID}|{CHANNEL}|{TENGO}|"


def bridge(tmp_path: Path, general: str = "", a: str = "", b: str = "", c: str = "") -> Router:
    path = tmp_path / "r.toml"
    path.write_text(
        f"[general]\n{general}\n[chat.a]\n{a}\n[chat.b]\n{b}\n[chat.c]\n{c}\n"
        '[[gateway]]\nname = "gw"\nenable = true\n'
        '[[gateway.inout]]\naccount = "chat.a"\nchannel = "room-a"\n'
        '[[gateway.inout]]\naccount = "chat.b"\nchannel = "room-b"\n'
        '[[gateway.inout]]\naccount = "chat.c"\nchannel = "room-c"\n'
    )
    return Router(load_config(path, SPECS))


def nicks(r: Router, nick: str, account: str = "chat.a", channel: str = "room-a", **kw: str) -> dict[str, str]:
    event = Event(
        kind=EventKind.MESSAGE, account=account, channel=channel, sender_name=nick, text="hi", sender_id="u1", **kw
    )
    return {d.account: d.username for d in r.route(event)}


def test_strip_nick_is_the_destinations_keeps_ascii_letters_and_digits_and_runs_before_replace_nicks(
    tmp_path: Path,
) -> None:
    """Point 3: ``dest.GetBool("StripNick")`` -- the destination's option (or
    ``[general]``'s, where the lookup falls back), ``[^a-zA-Z0-9]+`` removed
    (so é, ß and digits of other scripts go too), then the *source's*
    ReplaceNicks on what is left: ``^Zo9$`` matches only the stripped nick."""
    r = bridge(tmp_path, a='ReplaceNicks = [["^Zo9$", "Zed"]]\nStripNick = true', b="StripNick = true")
    assert nicks(r, "Zoë ٣ 9!") == {"chat.b": "Zed", "chat.c": "Zoë ٣ 9!"}  # a's own StripNick plays no part
    everywhere = bridge(tmp_path, general="StripNick = true", a='ReplaceNicks = [["^Zo9$", "Zed"]]')
    assert nicks(everywhere, "Zoë ٣ 9!") == {"chat.b": "Zed", "chat.c": "Zed"}


def test_every_placeholder_renders_in_matterbridges_order(tmp_path: Path) -> None:
    """Point 4: each placeholder Matterbridge knows renders, the source's
    data in the destination's format; {TENGO} is empty (no tengo script)."""
    r = bridge(tmp_path, a='Label = "LA"', b=f'RemoteNickFormat = "{EVERY_PLACEHOLDER}"')
    assert nicks(r, "alice")["chat.b"] == "a\u200blice|a|chat|gw|LA|alice|u1|room-a||"


def test_placeholders_typed_by_a_remote_user_stay_literal_where_matterbridge_keeps_them(tmp_path: Path) -> None:
    """Point 4: {NICK} is replaced after {BRIDGE}, {PROTOCOL}, {GATEWAY} and
    {LABEL}, so those typed into a nick stay as typed (before this they were
    expanded: a remote user could inject text); {USERID}, {CHANNEL} and
    {TENGO} come after {NICK} and are expanded inside a nick, as they are in
    Matterbridge. A {NICK} in Label is expanded (Label goes in before {NICK})."""
    r = bridge(tmp_path, a='Label = "L:{NICK}:{BRIDGE}"', b='RemoteNickFormat = "<{NICK}> [{LABEL}] "')
    typed = "{BRIDGE}{PROTOCOL}{GATEWAY}{LABEL}{NOPINGNICK}{USERID}{CHANNEL}{TENGO}"
    kept = "{BRIDGE}{PROTOCOL}{GATEWAY}{LABEL}{NOPINGNICK}u1room-a"
    assert nicks(r, typed)["chat.b"] == f"<{kept}> [L:{kept}:{{BRIDGE}}] "
    assert nicks(r, "bob")["chat.b"] == "<bob> [L:bob:{BRIDGE}] "


def test_noping_nick_of_an_empty_nick_stays_as_written(tmp_path: Path) -> None:
    """``if len(msg.Username) > 0``: with no nick {NOPINGNICK} is left in
    place; a one-letter nick gets the zero-width space after it (Go splits a
    one-letter nick's first *byte*, which breaks a non-ASCII letter; we split
    after the character)."""
    r = bridge(tmp_path, b='RemoteNickFormat = "{NOPINGNICK}:"')
    assert nicks(r, "")["chat.b"] == "{NOPINGNICK}:"
    assert nicks(r, "a")["chat.b"] == "a\u200b:"
    assert nicks(r, "é")["chat.b"] == "é\u200b:"
