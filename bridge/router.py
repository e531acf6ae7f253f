"""Gateways: which channel's events go where, and how they look there.

Pure logic, no I/O: ``Router.route(event)`` returns one ``Delivery`` per
destination channel. Semantics follow Matterbridge v1.26's gateway
(``gateway/gateway.go``, ``gateway/handlers.go``, ``gateway/router.go``):

- an ``inout`` or ``in`` channel sends into its gateway, an ``inout`` or
  ``out`` channel receives from it; never back to the source channel;
- the *source* account's options: ``IgnoreNicks`` / ``IgnoreMessages``
  (whitespace-separated regexes, checked on every kind of event: a message's
  or an edit's text, a file's caption, a join's or leave's text, a reaction's
  emoji; the nick on all of them), ``ReplaceMessages`` / ``ReplaceNicks``,
  ``EditDisable`` / ``EditSuffix`` (Matterbridge reads these where its bridge
  receives the edit from its network), ``NoSendJoinPart``, ``Label``;
- the *destination* account's: ``RemoteNickFormat`` (its placeholders
  describe the source), ``StripNick`` (before ``ReplaceNicks``),
  ``ShowJoinPart``, ``ShowTopicChange`` / ``SyncTopic``, ``IconURL``,
  ``PreserveThreading``;
- an event with no text and no file is dropped (``ignoreTextEmpty``), and
  emoji shortcodes in a text become emoji (``modifyMessage``), before
  ``ReplaceMessages``;
- a channel of ``*`` stands for every room the account is in (a Talk bot is
  enabled per room): as a source it matches any of them, as a destination it
  fans out to the rooms the caller passes in ``rooms``.

Unlike Matterbridge, which rewrites one shared message object once per
destination (or per gateway), in map order, the rules here apply once to
each copy (README, "Differences from Matterbridge").

Regexes come compiled from the config (``AccountConfig.rules``), in Go's
dialect (bridge/goregex.py). A rule that fails on a message (none should:
the loader compiled and checked them) is logged with the account and the key,
and the rules after it are skipped, as Matterbridge's loops ``break`` on a
failing rule; the message goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from bridge.config import AccountConfig, AccountRules, Config, Gateway, Rewrite
from bridge.events import Delivery, Event, EventKind
from bridge.goregex import decode, encode
from bridge.shortcodes import emojize

ZWSP = "\u200b"
WILDCARD = "*"
# Events an api client may post that talkbridge has no kind for (EventKind.OTHER,
# the name in Event.event_name); bridge/config/config.go names them.
TOPIC_CHANGE = "topic_change"
USER_TYPING = "user_typing"
# Dropped for every destination talkbridge has: typing shows only on slack,
# discord and matrix (gateway/bridgemap UserTypingSupport); avatar downloads
# only on mattermost, telegram and xmpp (handlers.go ignoreEvent); IRC notices
# only on irc (gateway.go SendMessage); get_channel_members is the router's own
# (router.go handleReceive; Matterbridge panics on one without its data).
NEVER_RELAYED = frozenset({USER_TYPING, "avatar_download", "notice_irc", "get_channel_members"})


@dataclass(frozen=True, slots=True)
class _AccountRouting:
    """An account's options as the router reads them, looked up once."""

    name: str
    rules: AccountRules  # compiled filters and rewrites (source side)
    label: str
    nick_format: str
    strip_nick: bool
    show_join_part: bool
    show_topic_change: bool  # ShowTopicChange or SyncTopic
    no_send_join_part: bool
    edit_disable: bool
    edit_suffix: str
    icon_url: str
    preserve_threading: bool
    relays_other_events: bool

    @classmethod
    def of(cls, acct: AccountConfig) -> _AccountRouting:
        return cls(
            name=acct.name,
            rules=acct.rules,
            label=str(acct.get("Label", "")),
            nick_format=str(acct.get("RemoteNickFormat", "{NICK}")),
            strip_nick=bool(acct.get("StripNick", False)),
            show_join_part=bool(acct.get("ShowJoinPart", False)),
            show_topic_change=bool(acct.get("ShowTopicChange", False)) or bool(acct.get("SyncTopic", False)),
            no_send_join_part=bool(acct.get("NoSendJoinPart", False)),
            edit_disable=bool(acct.get("EditDisable", False)),
            edit_suffix=str(acct.get("EditSuffix", "")),
            icon_url=str(acct.get("IconURL", "")),
            preserve_threading=bool(acct.get("PreserveThreading", True)),
            relays_other_events=acct.relays_other_events,
        )


class Router:
    def __init__(self, config: Config, log: logging.Logger | None = None) -> None:
        self.log = log or logging.getLogger("talkbridge.router")
        self.gateways: list[Gateway] = list(config.gateways)
        self.accounts = {name: _AccountRouting.of(acct) for name, acct in config.accounts.items()}
        # (account, channel) -> gateways it sends into; built once, routing is hot.
        self._senders: dict[tuple[str, str], list[Gateway]] = {}
        self.wildcard_accounts: set[str] = set()  # accounts with a "*" destination
        for gw in self.gateways:
            for entry in gw.entries:
                if entry.can_send:
                    self._senders.setdefault((entry.account, entry.channel), []).append(gw)
                if entry.can_receive and entry.channel == WILDCARD:
                    self.wildcard_accounts.add(entry.account)

    def gateways_of(self, account: str, channel: str) -> list[Gateway]:
        exact = self._senders.get((account, channel), [])
        wild = self._senders.get((account, WILDCARD), [])
        if not wild:
            return exact
        return exact + [gw for gw in wild if gw not in exact]

    def ignored(self, event: Event, text: str) -> bool:
        """``text``: the event's text as its source account received it
        (an edit's with ``EditSuffix``), before ``ReplaceMessages``."""
        src = self.accounts[event.account]
        kind = event.kind
        if kind == EventKind.EDIT and src.edit_disable:
            return True
        if kind in (EventKind.JOIN, EventKind.LEAVE) and src.no_send_join_part:
            return True
        # gateway.go ignoreTextEmpty: nothing to show and no file (typing has no text);
        # our deletions and reactions carry no text of their own
        if kind not in (EventKind.DELETE, EventKind.REACTION, EventKind.UNREACTION):
            if not text and not event.attachments and event.event_name != USER_TYPING:
                return True
        rules = src.rules
        if rules.ignore_messages and kind != EventKind.DELETE:  # a deletion has no text of its own
            # Matterbridge matches msg.Text of every event and each file's
            # comment (gateway.go ignoreMessage, ignoreFilesComment); our
            # reactions carry their emoji where its api carries text.
            if kind in (EventKind.REACTION, EventKind.UNREACTION):
                texts = [event.reaction or ""]
            else:
                texts = [text, *(a.caption for a in event.attachments if a.caption)]
            data = [encode(t) for t in texts]
            if any(p.search(d) for p in rules.ignore_messages for d in data):
                return True
        if rules.ignore_nicks:
            name = encode(event.sender_name)
            return any(p.search(name) for p in rules.ignore_nicks)
        return False

    def nick(self, event: Event, gateway: str, dest_account: str, name: str | None = None) -> str:
        """The destination's ``RemoteNickFormat`` for this event, in
        gateway.go modifyUsername's order: ``{NOPINGNICK}`` first, then
        ``{BRIDGE}``, ``{PROTOCOL}``, ``{GATEWAY}``, ``{LABEL}``, ``{NICK}``,
        ``{USERID}``, ``{CHANNEL}``, ``{TENGO}``. So a ``{BRIDGE}`` in a
        remote nick stays as typed, a ``{NICK}`` in ``Label`` is expanded, and
        a ``{CHANNEL}`` in a nick is expanded, as there. ``name``: the nick
        after StripNick and ReplaceNicks (``display_name``)."""
        src = self.accounts[event.account]
        dest = self.accounts[dest_account]
        if name is None:
            name = self.display_name(event, dest.strip_nick)
        nick = dest.nick_format
        if "{" not in nick:
            return nick
        if name:  # an empty nick leaves {NOPINGNICK} as written, as there
            # after the first character; Go splits the first *byte* of a
            # one-letter nick and so breaks a non-ASCII one (issue #193's fix)
            nick = nick.replace("{NOPINGNICK}", name[:1] + ZWSP + name[1:])
        # a message relayed to us by another bridge is named by where it was written
        written_on = event.relayed_from or event.account
        protocol, _, bridge = written_on.partition(".")
        return (
            nick.replace("{BRIDGE}", bridge or protocol)
            .replace("{PROTOCOL}", protocol)
            .replace("{GATEWAY}", gateway)
            .replace("{LABEL}", src.label)
            .replace("{NICK}", name)
            .replace("{USERID}", event.sender_id)
            .replace("{CHANNEL}", event.channel)
            .replace("{TENGO}", "")  # no [tengo] RemoteNickFormat script: modifyUsernameTengo gives ""
        )

    def display_name(self, event: Event, strip_nick: bool) -> str:
        """The nick after the destination's StripNick (``[^a-zA-Z0-9]+``
        removed) and then the source's ReplaceNicks (gateway.go modifyUsername)."""
        name = event.sender_name
        if strip_nick:
            name = "".join(c for c in name if c.isascii() and c.isalnum())
        rewrites = self.accounts[event.account].rules.replace_nicks
        return self._rewrite(name, rewrites, event.account) if rewrites else name

    def received_text(self, event: Event) -> str:
        """The text as the source account hands it on: an edit gets its
        ``EditSuffix`` (Matterbridge appends it where the edit is received)."""
        if event.kind == EventKind.EDIT:
            return event.text + self.accounts[event.account].edit_suffix
        return event.text

    def text(self, received: str, event: Event) -> str:
        """gateway.go modifyMessage: shortcodes to emoji, then ReplaceMessages."""
        text = emojize(received)
        rewrites = self.accounts[event.account].rules.replace_messages
        return self._rewrite(text, rewrites, event.account) if rewrites else text

    def _rewrite(self, text: str, rewrites: tuple[Rewrite, ...], account: str) -> str:
        data = encode(text)
        for rule in rewrites:
            try:
                data = rule.regexp.replace_all(data, rule.template)
            except Exception as exc:  # a bug, not the message's fault: the message goes on
                self.log.error(
                    "%s: %s failed on a message (%s: %s); it and the rules after it were skipped",
                    account, rule.key, type(exc).__name__, exc,
                )  # fmt: skip
                break
        try:
            return decode(data)
        except UnicodeDecodeError as exc:
            self.log.error(
                "%s: %s made text that is not UTF-8 (%s); the rules were skipped", account, rewrites[0].key, exc
            )
            return text

    def _drops(self, event: Event, dest: _AccountRouting) -> bool:
        """Whether an event of another kind (EventKind.OTHER) stays away from
        ``dest`` (handlers.go handleMessage and ignoreEvent; Matterbridge's
        bridges other than api pass on no event they do not know)."""
        name = event.event_name
        if name in NEVER_RELAYED:
            return True
        if name == TOPIC_CHANGE and not dest.show_topic_change:
            return True
        return not dest.relays_other_events

    def route(self, event: Event, rooms: Mapping[str, Collection[str]] | None = None) -> list[Delivery]:
        """``rooms``: for accounts with a ``*`` destination, their current rooms."""
        if event.account not in self.accounts:
            return []
        received = self.received_text(event)
        if self.ignored(event, received):
            return []
        trail = set(event.origin)
        text = self.text(received, event)
        unthreaded: Event | None = None  # the event without its reply link, made once if needed
        names: dict[bool, str] = {}  # the nick without and with StripNick, made once each
        out: list[Delivery] = []
        seen: set[tuple[str, str]] = set()
        for gw in self.gateways_of(event.account, event.channel):
            if event.gateway is not None and event.gateway != gw.name:
                continue
            for entry in gw.entries:
                if not entry.can_receive:
                    continue
                dest = self.accounts[entry.account]
                if event.kind in (EventKind.JOIN, EventKind.LEAVE) and not dest.show_join_part:
                    continue
                if event.kind == EventKind.OTHER and self._drops(event, dest):
                    continue
                copy = event
                if event.reply_to and not dest.preserve_threading:
                    # handlers.go handleMessage: no parent unless the destination preserves threading
                    if unthreaded is None:
                        unthreaded = dataclasses.replace(event, reply_to=None)
                    copy = unthreaded
                if entry.channel == WILDCARD:
                    channels: Collection[str] = sorted((rooms or {}).get(entry.account, ()))
                else:
                    channels = (entry.channel,)
                for channel in channels:
                    where = (entry.account, channel)
                    if where == (event.account, event.channel) or where in seen:
                        continue
                    if f"{entry.account}/{channel}" in trail:
                        continue  # it came from there: never bridge a message back
                    seen.add(where)
                    name = names.get(dest.strip_nick)
                    if name is None:
                        name = names[dest.strip_nick] = self.display_name(event, dest.strip_nick)
                    out.append(
                        Delivery(
                            event=copy,
                            account=entry.account,
                            channel=channel,
                            gateway=gw.name,
                            username=self.nick(event, gw.name, entry.account, name),
                            text=text,
                            avatar=self.avatar(event, dest) if dest.icon_url else None,
                        )
                    )
        return out

    @staticmethod
    def avatar(event: Event, dest: _AccountRouting) -> str | None:
        """gateway.go modifyAvatar: the destination's ``IconURL``, its
        ``{NICK}`` the sender's nick, when the message brings no avatar."""
        if event.avatar or not dest.icon_url:
            return None  # the event's own avatar (or none) stands
        return dest.icon_url.replace("{NICK}", event.sender_name)
