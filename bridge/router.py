"""Gateways: which channel's events go where, and how they look there.

Pure logic, no I/O: ``Router.route(event)`` returns one ``Delivery`` per
destination channel. Semantics follow Matterbridge's gateway
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
  ``ShowJoinPart``, ``PreserveThreading``;
- a channel of ``*`` stands for every room the account is in (a Talk bot is
  enabled per room): as a source it matches any of them, as a destination it
  fans out to the rooms the caller passes in ``rooms``.

Regexes come compiled from the config (``AccountConfig.rules``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from bridge.config import AccountConfig, AccountRules, Config, Gateway
from bridge.events import Delivery, Event, EventKind

ZWSP = "\u200b"
WILDCARD = "*"
# Matterbridge's StripNick: gateway.go modifyUsername, "[^a-zA-Z0-9]+"
NOT_ASCII_ALNUM = re.compile(r"[^a-zA-Z0-9]+")


@dataclass(frozen=True, slots=True)
class _AccountRouting:
    """An account's options as the router reads them, looked up once."""

    rules: AccountRules  # compiled filters and rewrites (source side)
    label: str
    nick_format: str
    strip_nick: bool
    show_join_part: bool
    no_send_join_part: bool
    edit_disable: bool
    edit_suffix: str
    preserve_threading: bool

    @classmethod
    def of(cls, acct: AccountConfig) -> _AccountRouting:
        return cls(
            rules=acct.rules,
            label=str(acct.get("Label", "")),
            nick_format=str(acct.get("RemoteNickFormat", "{NICK}")),
            strip_nick=bool(acct.get("StripNick", False)),
            show_join_part=bool(acct.get("ShowJoinPart", False)),
            no_send_join_part=bool(acct.get("NoSendJoinPart", False)),
            edit_disable=bool(acct.get("EditDisable", False)),
            edit_suffix=str(acct.get("EditSuffix", "")),
            preserve_threading=bool(acct.get("PreserveThreading", True)),
        )


class Router:
    def __init__(self, config: Config) -> None:
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
        if kind in (EventKind.MESSAGE, EventKind.EDIT) and not event.text and not event.attachments:
            return True
        if kind in (EventKind.JOIN, EventKind.LEAVE) and src.no_send_join_part:
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
            if any(p.search(t) for p in rules.ignore_messages for t in texts):
                return True
        return any(p.search(event.sender_name) for p in rules.ignore_nicks)

    def nick(self, event: Event, gateway: str, dest_account: str) -> str:
        src = self.accounts[event.account]
        dest = self.accounts[dest_account]
        name = event.sender_name
        if dest.strip_nick:  # the destination's option, before ReplaceNicks: gateway.go modifyUsername
            name = NOT_ASCII_ALNUM.sub("", name)
        for pattern, repl in src.rules.replace_nicks:
            name = pattern.sub(repl, name)
        noping = name[:1] + ZWSP + name[1:] if name else name
        return (
            dest.nick_format.replace("{NOPINGNICK}", noping)
            .replace("{NICK}", name)
            .replace("{USERID}", event.sender_id)
            .replace("{BRIDGE}", event.bridge_name)
            .replace("{LABEL}", src.label)
            .replace("{PROTOCOL}", event.protocol)
            .replace("{GATEWAY}", gateway)
            .replace("{CHANNEL}", event.channel)
        )

    def received_text(self, event: Event) -> str:
        """The text as the source account hands it on: an edit gets its
        ``EditSuffix`` (Matterbridge appends it where the edit is received)."""
        if event.kind == EventKind.EDIT:
            return event.text + self.accounts[event.account].edit_suffix
        return event.text

    def text(self, received: str, event: Event) -> str:
        text = received
        for pattern, repl in self.accounts[event.account].rules.replace_messages:
            text = pattern.sub(repl, text)
        return text

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
                    out.append(
                        Delivery(
                            event=copy,
                            account=entry.account,
                            channel=channel,
                            gateway=gw.name,
                            username=self.nick(event, gw.name, entry.account),
                            text=text,
                        )
                    )
        return out
