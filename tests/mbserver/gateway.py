"""Matterbridge's router and gateways, the part that decides what reaches
which account. Stored versions read (none is stored at e68ddcf5 itself):
gateway/router.go @ 802dc3c3, gateway/gateway.go @ 4ab72ace, gateway/
handlers.go @ 3c36f651, internal/tengo/outmessage.tengo @ 3fa277ac, bridge/
config/config.go @ 9989a7c6.

- router.go ``handleReceive``: the protocol is set from the account the
  message came from; per gateway (in config order here; Go walks a map) that
  does not ``ignoreMessage``: ``Timestamp = time.Now()``, ``modifyMessage``,
  then ``handleMessage`` for each of its bridges. The one ``msg`` is changed
  in place from gateway to gateway, as in Go.
- gateway.go ``ignoreMessage``/``ignoreTextEmpty``/``ignoreFilesComment``,
  ``modifyMessage`` (emoji shortcodes through bridge/shortcodes.py, the
  project's port of kyokomi/emoji; ReplaceMessages through bridge/goregex.py;
  ``Gateway = gw.Name`` unless the message is from an api account),
  ``getDestChannel`` (api messages only in the gateway they name; the source
  channel must be an "in" one; destinations "out"; ``validGatewayDest``),
  ``SendMessage`` (never to the source channel ID = channel + account; the
  nick from the DESTINATION's RemoteNickFormat via ``modifyUsername``; "for
  api we need originchannel as channel"; the parent: with PreserveThreading
  off nothing is looked up, so a parent_id becomes ``msg-parent-not-found``;
  the id for a destination comes from the message cache, where nothing ever
  is: api's Send returns "" and so do the network accounts here; then
  outmessage.tengo, then ``dest.Send``), ``modifyAvatar``,
  ``mapChannelConfig`` (an api account's channel is "api", irc channels are
  lowercased, in+out is inout).
- handlers.go ``handleMessage``/``ignoreEvent``: user_typing only to
  protocols in bridgemap.UserTypingSupport (slack and discord: gateway/
  bridgemap/bslack.go and bdiscord.go ``init``), a
  file_failure_size without text is dropped, join_leave only to a
  destination with ShowJoinPart, topic_change only with ShowTopicChange or
  SyncTopic, avatar_download only to mattermost/telegram/xmpp (and only to
  its own channel), no channel and not join_leave: dropped.

Not modelled (refused in the config): SameChannel, PreserveThreading,
ExtractNicks, Tengo scripts, media servers (handleFiles does nothing without one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.goregex import GoRegexError, GoRegexp, decode, encode, go_fields
from bridge.shortcodes import emojize
from tests.mbserver.gojson import FileInfo, Message, now_ns

API = "api"
PARENT_NOT_FOUND = "msg-parent-not-found"  # config.ParentIDNotFound
USER_TYPING_SUPPORT = ("slack", "discord")
_IRC_COLORS = GoRegexp.compile(r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|[[:cntrl:]]")  # outmessage.tengo
_DISCORD_EMOJI = GoRegexp.compile(r"<a?(:.*?:)[0-9]+>")


def _rules(text: str) -> list[GoRegexp]:
    """strings.Fields of a rule list, each compiled; one that does not compile
    is logged and skipped (ignoreText)."""
    out = []
    for entry in go_fields(text):
        try:
            out.append(GoRegexp.compile(entry))
        except GoRegexError:
            continue
    return out


@dataclass
class Bridge:
    """bridge.Bridge: ``Account`` protocol.name, its settings (the
    ``[protocol.name]`` section), and its Bridger's Send."""

    account: str
    settings: dict[str, Any]
    general: dict[str, Any]
    send: Callable[[Message], str]

    @property
    def protocol(self) -> str:
        return self.account.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.account.split(".", 1)[1]

    def get(self, key: str, default: Any = "") -> Any:
        """bridge.go GetString/GetBool: the account's key, else General's."""
        if key in self.settings:
            return self.settings[key]
        return self.general.get(key, default)

    def pairs(self, key: str) -> list[tuple[GoRegexp, str]]:
        return [(GoRegexp.compile(search), replace) for search, replace in self.get(key, []) or []]


@dataclass
class Channel:
    """config.ChannelInfo."""

    name: str
    account: str
    direction: str

    @property
    def id(self) -> str:
        return self.name + self.account


@dataclass
class Gateway:
    name: str
    bridges: dict[str, Bridge] = field(default_factory=dict)
    channels: dict[str, Channel] = field(default_factory=dict)

    def add(self, entries: list[dict[str, Any]], direction: str, bridges: dict[str, Bridge]) -> None:
        """mapChannelConfig, AddBridge."""
        for entry in entries:
            account, channel = entry["account"], str(entry.get("channel", ""))
            if entry.get("SameChannel") or entry.get("samechannel"):
                raise ValueError("SameChannel is not modelled by the test Matterbridge")
            if account.startswith("api."):
                channel = API
            if account.startswith("irc."):
                channel = channel.lower()
            key = channel + account
            if key not in self.channels:
                self.channels[key] = Channel(channel, account, direction)
            elif self.channels[key].direction != direction:
                self.channels[key].direction = "inout"
            self.bridges[account] = bridges[account]

    # router.go handleReceive, for this gateway ----------------------------------------------------------------------
    def route(self, msg: Message) -> None:
        if self.ignore(msg):
            return
        msg.timestamp = now_ns()
        self.modify(msg)
        for dest in self.bridges.values():
            self.handle(msg, dest)

    def ignore(self, msg: Message) -> bool:
        """ignoreMessage."""
        source = self.bridges.get(msg.account)
        if source is None:
            return True
        if self._text_empty(msg):
            return True
        nicks = _rules(str(source.get("IgnoreNicks")))
        rules = _rules(str(source.get("IgnoreMessages")))
        if any(nick.search(encode(msg.username)) for nick in nicks):  # ignoreText: each a regexp
            return True
        if any(rule.search(encode(msg.text)) for rule in rules):
            return True
        for item in (msg.Extra or {}).get("file") or []:  # ignoreFilesComment: FileInfo only
            if isinstance(item, FileInfo) and any(rule.search(encode(item.Comment)) for rule in rules):
                return True
        return False

    @staticmethod
    def _text_empty(msg: Message) -> bool:
        """ignoreTextEmpty."""
        if msg.text != "" or msg.event == "user_typing":
            return False
        extra = msg.Extra
        if extra is not None and (
            extra.get("attachments") is not None or extra.get("file") or extra.get("file_failure_size")
        ):
            return False
        return True

    def modify(self, msg: Message) -> None:
        """modifyMessage."""
        msg.text = emojize(msg.text)
        source = self.bridges[msg.account]
        for rule, replacement in source.pairs("ReplaceMessages"):
            msg.text = decode(rule.replace_all(encode(msg.text), rule.template(replacement)))
        if msg.protocol != API:
            msg.gateway = self.name

    def handle(self, rmsg: Message, dest: Bridge) -> None:
        """handlers.go handleMessage + ignoreEvent."""
        if rmsg.event == "user_typing" and dest.protocol not in USER_TYPING_SUPPORT:
            return
        if rmsg.Extra is not None and rmsg.Extra.get("file_failure_size") and rmsg.text == "":
            return
        if rmsg.event == "avatar_download" and dest.protocol not in ("mattermost", "telegram", "xmpp"):
            return
        if rmsg.event == "join_leave" and not dest.get("ShowJoinPart", False):
            return
        if rmsg.event == "topic_change" and not (dest.get("ShowTopicChange", False) or dest.get("SyncTopic", False)):
            return
        if rmsg.channel == "" and rmsg.event != "join_leave":
            return
        for channel in self.dest_channels(rmsg, dest):
            self.send(rmsg, dest, channel)

    def dest_channels(self, msg: Message, dest: Bridge) -> list[Channel]:
        """getDestChannel (the discord join/leave case aside)."""
        if msg.protocol == API and self.name != msg.gateway:
            return []
        source_id = msg.channel + msg.account
        source = self.channels.get(source_id)
        if source is not None and "in" not in source.direction:
            return []
        if source is None:
            return []
        return [
            channel
            for channel in self.channels.values()
            if "out" in channel.direction and channel.account == dest.account and msg.gateway == self.name
        ]

    def send(self, rmsg: Message, dest: Bridge, channel: Channel) -> None:
        """SendMessage."""
        own = rmsg.channel + rmsg.account
        if rmsg.event == "avatar_download":
            if channel.id != own:
                return
        elif channel.id == own:
            return  # do not send to ourself
        if rmsg.event == "notice_irc" and dest.protocol != "irc":
            return
        msg = rmsg.copy()
        msg.channel = channel.name
        msg.avatar = self.avatar(rmsg, dest)
        msg.username = self.username(rmsg, dest)
        if msg.event != "file_delete":
            msg.id = ""  # getDestMsgID: the cache never holds an id here
        if dest.protocol == API:  # for api we need originchannel as channel
            msg.channel = rmsg.channel
        msg.parent_id = ""  # getDestMsgID(canonicalParentMsgID = "") and the Replace of ""
        if rmsg.parent_id != "":
            msg.parent_id = PARENT_NOT_FOUND
        self.out_message(rmsg, msg, dest)
        dest.send(msg)

    @staticmethod
    def out_message(rmsg: Message, msg: Message, dest: Bridge) -> None:
        """modifyOutMessageTengo with the built-in outmessage.tengo."""
        if rmsg.protocol == "irc" and dest.protocol != "irc":
            msg.text = decode(_IRC_COLORS.replace_all(encode(msg.text), _IRC_COLORS.template("")))
        if rmsg.protocol == "discord":
            msg.text = decode(_DISCORD_EMOJI.replace_all(encode(msg.text), _DISCORD_EMOJI.template("$1")))

    @staticmethod
    def avatar(msg: Message, dest: Bridge) -> str:
        """modifyAvatar."""
        if msg.avatar == "":
            return str(dest.get("IconURL")).replace("{NICK}", msg.username)
        return msg.avatar

    def username(self, msg: Message, dest: Bridge) -> str:
        """modifyUsername: the destination's RemoteNickFormat (api accounts
        default to {NICK}: api.go New l.77-81), placeholders replaced in
        Go's order."""
        source = self.bridges[msg.account]
        username = msg.username
        if dest.get("StripNick", False):
            username = "".join(c for c in username if c.isascii() and c.isalnum())
        if dest.protocol == API and "RemoteNickFormat" not in dest.settings:
            nick = "{NICK}"
        else:
            nick = str(dest.get("RemoteNickFormat"))
        for rule, replacement in source.pairs("ReplaceNicks"):
            username = decode(rule.replace_all(encode(username), rule.template(replacement)))
        if username:
            nick = nick.replace("{NOPINGNICK}", username[:1] + "\u200b" + username[1:])
        nick = nick.replace("{BRIDGE}", source.name)
        nick = nick.replace("{PROTOCOL}", source.protocol)
        nick = nick.replace("{GATEWAY}", self.name)
        nick = nick.replace("{LABEL}", str(source.get("Label")))
        nick = nick.replace("{NICK}", username)
        nick = nick.replace("{USERID}", msg.userid)
        nick = nick.replace("{CHANNEL}", msg.channel)
        return nick.replace("{TENGO}", "")
