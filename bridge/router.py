"""Gateways: which channel's events go where, and how they look there.

Pure logic, no I/O: ``Router.route(event)`` returns one ``Delivery`` per
destination channel. Semantics follow Matterbridge's gateway:

- an ``inout`` or ``in`` channel sends into its gateway, an ``inout`` or
  ``out`` channel receives from it; never back to the source channel;
- ``IgnoreNicks`` / ``IgnoreMessages`` (whitespace-separated regexes) and
  ``ReplaceMessages`` / ``ReplaceNicks`` are the *source* account's;
- ``RemoteNickFormat`` is the *destination* account's, and its placeholders
  describe the source;
- a channel of ``*`` stands for every room the account is in (a Talk bot is
  enabled per room): as a source it matches any of them, as a destination it
  fans out to the rooms the caller passes in ``rooms``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from bridge.config import AccountConfig, Config, Gateway
from bridge.events import Delivery, Event, EventKind

ZWSP = "\u200b"
WILDCARD = "*"


def go_replacement(template: str) -> str:
    """Go's ``$1`` / ``${1}`` / ``${name}`` -> Python's ``\\g<1>``."""
    out = template.replace("\\", "\\\\")
    return re.sub(r"\$\{(\w+)\}|\$(\d+)", lambda m: f"\\g<{m.group(1) or m.group(2)}>", out)


@dataclass(slots=True)
class _Rules:
    ignore_nicks: list[re.Pattern[str]]
    ignore_messages: list[re.Pattern[str]]
    replace_messages: list[tuple[re.Pattern[str], str]]
    replace_nicks: list[tuple[re.Pattern[str], str]]
    strip_nick: bool
    label: str
    nick_format: str
    show_join_part: bool
    no_send_join_part: bool

    @classmethod
    def of(cls, acct: AccountConfig) -> _Rules:
        def pairs(key: str) -> list[tuple[re.Pattern[str], str]]:
            return [(re.compile(a), go_replacement(b)) for a, b in acct.get(key, ()) or ()]

        return cls(
            ignore_nicks=[re.compile(p) for p in str(acct.get("IgnoreNicks", "")).split()],
            ignore_messages=[re.compile(p) for p in str(acct.get("IgnoreMessages", "")).split()],
            replace_messages=pairs("ReplaceMessages"),
            replace_nicks=pairs("ReplaceNicks"),
            strip_nick=bool(acct.get("StripNick", False)),
            label=str(acct.get("Label", "")),
            nick_format=str(acct.get("RemoteNickFormat", "{NICK}")),
            show_join_part=bool(acct.get("ShowJoinPart", False)),
            no_send_join_part=bool(acct.get("NoSendJoinPart", False)),
        )


class Router:
    def __init__(self, config: Config) -> None:
        self.gateways: list[Gateway] = list(config.gateways)
        self.rules = {name: _Rules.of(acct) for name, acct in config.accounts.items()}
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

    def ignored(self, event: Event) -> bool:
        rules = self.rules[event.account]
        if event.kind in (EventKind.MESSAGE, EventKind.EDIT):
            if not event.text and not event.attachments:
                return True
            if any(p.search(event.text) for p in rules.ignore_messages):
                return True
        if event.kind in (EventKind.JOIN, EventKind.LEAVE) and rules.no_send_join_part:
            return True
        return any(p.search(event.sender_name) for p in rules.ignore_nicks)

    def nick(self, event: Event, gateway: str, dest_account: str) -> str:
        src = self.rules[event.account]
        name = event.sender_name
        for pattern, repl in src.replace_nicks:
            name = pattern.sub(repl, name)
        if src.strip_nick:
            name = re.sub(r"[^\w]", "", name)
        noping = name[:1] + ZWSP + name[1:] if name else name
        fmt = self.rules[dest_account].nick_format
        return (
            fmt.replace("{NOPINGNICK}", noping)
            .replace("{NICK}", name)
            .replace("{USERID}", event.sender_id)
            .replace("{BRIDGE}", event.bridge_name)
            .replace("{LABEL}", src.label)
            .replace("{PROTOCOL}", event.protocol)
            .replace("{GATEWAY}", gateway)
            .replace("{CHANNEL}", event.channel)
        )

    def text(self, event: Event) -> str:
        text = event.text
        for pattern, repl in self.rules[event.account].replace_messages:
            text = pattern.sub(repl, text)
        return text

    def route(self, event: Event, rooms: Mapping[str, Collection[str]] | None = None) -> list[Delivery]:
        """``rooms``: for accounts with a ``*`` destination, their current rooms."""
        if event.account not in self.rules or self.ignored(event):
            return []
        trail = set(event.origin)
        text = self.text(event)
        out: list[Delivery] = []
        seen: set[tuple[str, str]] = set()
        for gw in self.gateways_of(event.account, event.channel):
            if event.gateway is not None and event.gateway != gw.name:
                continue
            for entry in gw.entries:
                if not entry.can_receive:
                    continue
                if event.kind in (EventKind.JOIN, EventKind.LEAVE) and not self.rules[entry.account].show_join_part:
                    continue
                if entry.channel == WILDCARD:
                    channels: Collection[str] = sorted((rooms or {}).get(entry.account, ()))
                else:
                    channels = (entry.channel,)
                for channel in channels:
                    dest = (entry.account, channel)
                    if dest == (event.account, event.channel) or dest in seen:
                        continue
                    if f"{entry.account}/{channel}" in trail:
                        continue  # it came from there: never bridge a message back
                    seen.add(dest)
                    out.append(
                        Delivery(
                            event=event,
                            account=entry.account,
                            channel=channel,
                            gateway=gw.name,
                            username=self.nick(event, gw.name, entry.account),
                            text=text,
                        )
                    )
        return out
