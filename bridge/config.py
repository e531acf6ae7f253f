"""Configuration: a Matterbridge ``matterbridge.toml`` plus our own sections.

Accounts are ``[protocol.name]`` tables using Matterbridge's key names; a key
is looked up on the account first, then in ``[general]`` (as Matterbridge's
viper config does), case-insensitively. Gateways are ``[[gateway]]`` with
``[[gateway.inout]]`` / ``[[gateway.in]]`` / ``[[gateway.out]]`` entries.
Our own sections — ``[redis]``, ``[http]``, ``[bus]`` — sit beside them.

Any string value may be ``env:NAME`` or ``file:PATH`` so secrets stay out of
the file. Every problem is reported as ``key.path: what is wrong``; the
loader collects them all instead of stopping at the first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli

from adapters.base import Option
from bridge.connections import SCHEMES as REDIS_SCHEMES

MAX_CONFIG_BYTES = 1 << 20  # a config larger than 1 MiB is a mistake, not a config

# Keys every account understands (Matterbridge's [general]-level options).
COMMON_OPTIONS: dict[str, Option] = {
    "RemoteNickFormat": Option(str, default="{NICK}"),
    "IgnoreNicks": Option(str, default=""),
    "IgnoreMessages": Option(str, default=""),
    "ReplaceMessages": Option(list, default=()),
    "ReplaceNicks": Option(list, default=()),
    "Label": Option(str, default=""),
    "ShowJoinPart": Option(bool, default=False),
    "NoSendJoinPart": Option(bool, default=False),
    "StripNick": Option(bool, default=False),
    "MediaDownloadSize": Option(int, default=1_000_000),
    "MediaServerDownload": Option(str, default=""),
    "MediaDownloadPath": Option(str, default=""),
    "MediaDownloadBlackList": Option(list, default=()),
    "MediaServerUpload": Option(str, default=""),
    "IconURL": Option(str, default=""),
    "EditDisable": Option(bool, default=False),
    "EditSuffix": Option(str, default=""),
    "PrefixMessagesWithNick": Option(bool, default=False),
    "ShowTopicChange": Option(bool, default=False),
    "SyncTopic": Option(bool, default=False),
    "PreserveThreading": Option(bool, default=False),
    "ExtractNicks": Option(list, default=()),
    "IgnoreFailureOnStart": Option(bool, default=False),
    "MessageSplit": Option(bool, default=False),
    "MessageLength": Option(int, default=0),
    "Debug": Option(bool, default=False),
    "Charset": Option(str, default=""),
}

# Sections of a Matterbridge config that hold no accounts.
MATTERBRIDGE_SECTIONS = {"general", "gateway", "samechannelgateway", "tengo"}


@dataclass(frozen=True, slots=True)
class OwnSection:
    """One of our own top-level sections and its keys."""

    options: dict[str, Option]


OWN_SECTIONS: dict[str, OwnSection] = {
    "redis": OwnSection(
        {
            "URL": Option(str, default="", secret=True, help="empty: embedded Redis"),
            "DataDir": Option(str, default="talkbridge-data"),
            "AppendFsync": Option(str, default="everysec"),
            "KeyPrefix": Option(str, default="tb"),
            "RedisServer": Option(str, default="", help="redis-server binary for the embedded default"),
        }
    ),
    "http": OwnSection(
        {
            "BindAddress": Option(str, default="127.0.0.1:4280"),
            "MaxBodyBytes": Option(int, default=1 << 20),
            # every listener (this one, each api account's): bridge/listener.py
            "RequestTimeoutSeconds": Option((int, float), default=10, help="for a request head, then its body"),
            "IdleTimeoutSeconds": Option((int, float), default=75, help="a kept-alive connection between requests"),
            "MaxConnections": Option(int, default=1000, help="open connections per listener"),
        }
    ),
    "bus": OwnSection(
        {
            "MaxDeliveries": Option(int, default=5),
            "RetryBaseSeconds": Option((int, float), default=0.5),
            "RetryMaxSeconds": Option((int, float), default=30.0),
            "StreamMaxLen": Option(int, default=0, help="0: trim only what was consumed"),
            "DeadLetterMaxLen": Option(int, default=100_000),
            "MessageMapDays": Option((int, float), default=7),
            "MessageMapPerRoom": Option(int, default=5000, help="copies a room's id map keeps"),
            "LeaseSeconds": Option((int, float), default=15),
            "BatchSize": Option(int, default=200),
        }
    ),
    "log": OwnSection(
        {
            "Level": Option(str, default="info"),
            "Format": Option(str, default="text"),
        }
    ),
}

DIRECTIONS = ("inout", "in", "out")


class ConfigError(Exception):
    """The config is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """What the config loader needs to know about a protocol."""

    name: str
    options: dict[str, Option]
    check: Any = None  # callable(AccountConfig) -> list[str]


def _ci(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k.lower(): v for k, v in mapping.items()}


@dataclass(slots=True)
class AccountConfig:
    name: str  # "protocol.bridge"
    protocol: str
    values: dict[str, Any]  # lower-cased keys, secrets resolved
    general: dict[str, Any]
    specs: dict[str, Option]
    written: dict[str, str] = field(default_factory=dict)  # lower -> as written

    @property
    def bridge(self) -> str:
        return self.name.split(".", 1)[1]

    def get(self, key: str, default: Any = None) -> Any:
        """Account value, then [general], then the option's default."""
        low = key.lower()
        if low in self.values:
            return self.values[low]
        if low in self.general:
            return self.general[low]
        spec = self.specs.get(key) or _spec_ci(self.specs, low)
        if spec is not None and spec.default is not None:
            return spec.default
        return default

    def is_set(self, key: str) -> bool:
        return key.lower() in self.values or key.lower() in self.general

    def __repr__(self) -> str:  # never show values: some are secrets
        return f"AccountConfig({self.name!r})"


@dataclass(frozen=True, slots=True)
class GatewayEntry:
    account: str
    channel: str
    direction: str  # "inout" | "in" | "out"

    @property
    def can_send(self) -> bool:  # the channel's messages go into the gateway
        return self.direction in ("inout", "in")

    @property
    def can_receive(self) -> bool:
        return self.direction in ("inout", "out")


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    entries: tuple[GatewayEntry, ...]


@dataclass(slots=True)
class Config:
    path: Path
    accounts: dict[str, AccountConfig]
    gateways: list[Gateway]
    sections: dict[str, dict[str, Any]]  # our own sections, defaults applied
    warnings: list[str] = field(default_factory=list)

    def section(self, name: str) -> dict[str, Any]:
        return self.sections[name]

    def channels_of(self, account: str) -> list[str]:
        seen: dict[str, None] = {}
        for gw in self.gateways:
            for entry in gw.entries:
                if entry.account == account and entry.channel != "*":
                    seen[entry.channel] = None
        return list(seen)


def _spec_ci(specs: Mapping[str, Option], low: str) -> Option | None:
    for key, spec in specs.items():
        if key.lower() == low:
            return spec
    return None


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def _type_ok(value: Any, t: type | tuple[type, ...]) -> bool:
    types = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in types:
        return False  # TOML true is not an integer here
    return isinstance(value, types)


class _Loader:
    def __init__(self, path: Path, protocols: Mapping[str, ProtocolSpec], environ: Mapping[str, str]):
        self.path = path
        self.base = path.parent
        self.protocols = protocols
        self.environ = environ
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{key}: {text}")

    # env:/file: indirection -------------------------------------------------
    def resolve(self, key: str, value: Any) -> Any:
        if isinstance(value, str):
            if value.startswith("env:"):
                name = value[4:]
                if not name:
                    self.problem(key, "env: needs a variable name")
                    return ""
                if name not in self.environ:
                    self.problem(key, f"environment variable {name} is not set")
                    return ""
                return self.environ[name]
            if value.startswith("file:"):
                target = Path(value[5:]).expanduser()
                if not target.is_absolute():
                    target = self.base / target
                try:
                    data = target.read_bytes()
                except OSError as exc:
                    self.problem(key, f"cannot read {target}: {exc.strerror or exc}")
                    return ""
                if len(data) > 64 * 1024:
                    self.problem(key, f"{target} is larger than 64 KiB")
                    return ""
                try:
                    return data.decode().rstrip("\r\n")
                except UnicodeDecodeError:
                    self.problem(key, f"{target} is not UTF-8 text")
                    return ""
            return value
        if isinstance(value, list):
            return [self.resolve(f"{key}[{i}]", v) for i, v in enumerate(value)]
        return value

    def typed(self, key: str, value: Any, spec: Option) -> bool:
        if not _type_ok(value, spec.type):
            self.problem(key, f"must be {_type_name(spec.type)}, not {_describe(value)}")
            return False
        return True

    # sections -----------------------------------------------------------------
    def own_section(self, name: str, raw: Any) -> dict[str, Any]:
        spec = OWN_SECTIONS[name]
        out = {k: opt.default for k, opt in spec.options.items()}
        if raw is None:
            return out
        if not isinstance(raw, dict):
            self.problem(name, f"must be a table, not {_describe(raw)}")
            return out
        for key, value in raw.items():
            opt_name = next((k for k in spec.options if k.lower() == key.lower()), None)
            if opt_name is None:
                known = ", ".join(spec.options)
                self.problem(f"{name}.{key}", f"unknown key (known: {known})")
                continue
            value = self.resolve(f"{name}.{key}", value)
            if self.typed(f"{name}.{key}", value, spec.options[opt_name]):
                out[opt_name] = value
        return out

    def general(self, raw: Any) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem("general", f"must be a table, not {_describe(raw)}")
            return {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            value = self.resolve(f"general.{key}", value)
            spec = _spec_ci(COMMON_OPTIONS, key.lower())
            if spec is not None and not self.typed(f"general.{key}", value, spec):
                continue
            out[key.lower()] = value
        return out

    def account(self, protocol: str, bridge: str, raw: Any, general: dict[str, Any]) -> AccountConfig | None:
        name = f"{protocol}.{bridge}"
        if not isinstance(raw, dict):
            self.problem(name, f"must be a table, not {_describe(raw)}")
            return None
        if not re.fullmatch(r"[A-Za-z0-9_-]+", bridge):
            self.problem(name, "account names may use letters, digits, '-' and '_' only")
            return None
        proto = self.protocols[protocol]
        specs = {**COMMON_OPTIONS, **proto.options}
        values: dict[str, Any] = {}
        written: dict[str, str] = {}
        for key, value in raw.items():
            path = f"{name}.{key}"
            spec = _spec_ci(specs, key.lower())
            if spec is None:
                self.warnings.append(f"{path}: unknown key, ignored")
                continue
            value = self.resolve(path, value)
            if not self.typed(path, value, spec):
                continue
            values[key.lower()] = value
            written[key.lower()] = key
        for key, spec in specs.items():
            if spec.required and key.lower() not in values and key.lower() not in general:
                self.problem(f"{name}.{key}", "is required")
        acct = AccountConfig(name, protocol, values, general, specs, written)
        self.check_rules(acct)
        if proto.check is not None:
            for text in proto.check(acct):
                self.problems.append(text if text.startswith(name) else f"{name}.{text}")
        return acct

    def check_rules(self, acct: AccountConfig) -> None:
        """Regexes and replace pairs must compile now, not at the first message."""
        for key in ("IgnoreNicks", "IgnoreMessages"):
            for pattern in str(acct.get(key, "")).split():
                try:
                    re.compile(pattern)
                except re.error as exc:
                    self.problem(f"{acct.name}.{key}", f"bad regular expression {pattern!r}: {exc}")
        for key in ("ReplaceMessages", "ReplaceNicks"):
            for i, pair in enumerate(acct.get(key, ()) or ()):
                where = f"{acct.name}.{key}[{i}]"
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                    self.problem(where, 'must be a pair of strings ["regex", "replacement"]')
                    continue
                try:
                    re.compile(pair[0])
                except re.error as exc:
                    self.problem(where, f"bad regular expression {pair[0]!r}: {exc}")

    def gateways(self, raw: Any, accounts: dict[str, AccountConfig]) -> list[Gateway]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problem("gateway", "must be an array of tables ([[gateway]])")
            return []
        out: list[Gateway] = []
        names: set[str] = set()
        for gi, gw in enumerate(raw):
            where = f"gateway[{gi}]"
            if not isinstance(gw, dict):
                self.problem(where, "must be a table")
                continue
            gwl = _ci(gw)
            name = gwl.get("name")
            if not isinstance(name, str) or not name:
                self.problem(f"{where}.name", "is required (a non-empty string)")
                name = None
            elif name in names:
                self.problem(f"{where}.name", f'gateway "{name}" is defined twice')
            else:
                names.add(name)
            enable = gwl.get("enable", False)
            if not isinstance(enable, bool):
                self.problem(f"{where}.enable", f"must be true or false, not {_describe(enable)}")
            for key in gw:
                if key.lower() not in ("name", "enable", *DIRECTIONS):
                    self.warnings.append(f"{where}.{key}: unknown key, ignored")
            entries: list[GatewayEntry] = []
            seen: set[tuple[str, str]] = set()
            for direction in DIRECTIONS:
                items = gwl.get(direction, [])
                if not isinstance(items, list):
                    self.problem(f"{where}.{direction}", f"must be an array of tables ([[gateway.{direction}]])")
                    continue
                for ei, item in enumerate(items):
                    ewhere = f"{where}.{direction}[{ei}]"
                    entry = self.gateway_entry(ewhere, item, direction, accounts)
                    if entry is None:
                        continue
                    if (entry.account, entry.channel) in seen:
                        self.problem(ewhere, f'{entry.account} channel "{entry.channel}" is listed twice')
                        continue
                    seen.add((entry.account, entry.channel))
                    entries.append(entry)
            if name is None or enable is not True:
                if name is not None:
                    self.warnings.append(f'{where}: gateway "{name}" is not enabled (enable=true), skipped')
                continue
            if len(entries) < 2:
                self.warnings.append(f'{where}: gateway "{name}" links fewer than two channels')
            out.append(Gateway(name, tuple(entries)))
        return out

    def gateway_entry(
        self, where: str, item: Any, direction: str, accounts: dict[str, AccountConfig]
    ) -> GatewayEntry | None:
        if not isinstance(item, dict):
            self.problem(where, "must be a table with account and channel")
            return None
        il = _ci(item)
        account = il.get("account")
        channel = il.get("channel")
        ok = True
        if not isinstance(account, str) or not account:
            self.problem(f"{where}.account", 'is required (a string like "api.myapi")')
            ok = False
        elif account not in accounts:
            self.problem(f"{where}.account", f'no account "{account}"')
            ok = False
        if not isinstance(channel, str) or not channel:
            self.problem(f"{where}.channel", "is required (a non-empty string)")
            ok = False
        for key in item:
            if key.lower() not in ("account", "channel", "options"):
                self.warnings.append(f"{where}.{key}: unknown key, ignored")
        return GatewayEntry(account, channel, direction) if ok else None


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def load_config(
    path: str | os.PathLike[str],
    protocols: Mapping[str, ProtocolSpec],
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load and validate; raise ``ConfigError`` listing every problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES} bytes"])
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 (byte {exc.start})"]) from None
    try:
        raw = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        hint = ""
        if any(q in text for q in "«»“”″"):
            hint = ' (typographic quotes: use straight " quotes)'
        raise ConfigError([f"{path}: not valid TOML: {exc}{hint}"]) from None

    loader = _Loader(path, protocols, os.environ if environ is None else environ)
    lower = {k.lower(): k for k in raw}
    general = loader.general(raw.get(lower.get("general", "general")))
    sections = {name: loader.own_section(name, raw.get(lower.get(name, name))) for name in OWN_SECTIONS}

    accounts: dict[str, AccountConfig] = {}
    for key, value in raw.items():
        low = key.lower()
        if low in OWN_SECTIONS or low in MATTERBRIDGE_SECTIONS:
            if low in ("samechannelgateway", "tengo"):
                loader.warnings.append(f"{key}: not supported by talkbridge, ignored")
            continue
        if low not in protocols:
            supported = ", ".join(sorted(protocols))
            loader.problem(key, f'protocol "{key}" is not supported (supported: {supported})')
            continue
        if not isinstance(value, dict) or not value:
            loader.problem(key, f"must hold accounts as [{key}.NAME] tables")
            continue
        for bridge, body in value.items():
            acct = loader.account(low, bridge, body, general)
            if acct is not None:
                accounts[acct.name] = acct

    gateways = loader.gateways(raw.get(lower.get("gateway", "gateway")), accounts)
    _check_sections(loader, sections)
    if loader.problems:
        raise ConfigError(loader.problems)
    return Config(path, accounts, gateways, sections, loader.warnings)


def _check_sections(loader: _Loader, sections: dict[str, dict[str, Any]]) -> None:
    url = sections["redis"]["URL"]
    if url and not url.startswith(REDIS_SCHEMES):  # never echo the value: it may hold a password
        loader.problem("redis.URL", f"must start with one of {', '.join(REDIS_SCHEMES)}")
    if sections["redis"]["AppendFsync"] not in ("always", "everysec", "no"):
        loader.problem("redis.AppendFsync", "must be always, everysec or no")
    bind = sections["http"]["BindAddress"]
    if bind and parse_hostport(bind) is None:
        loader.problem("http.BindAddress", f'"{bind}" is not HOST:PORT')
    for key in ("MaxDeliveries", "BatchSize"):
        if sections["bus"][key] < 1:
            loader.problem(f"bus.{key}", "must be at least 1")
    if sections["bus"]["MessageMapDays"] <= 0:
        loader.problem("bus.MessageMapDays", "must be more than 0")
    if sections["bus"]["MessageMapPerRoom"] < 100:
        loader.problem("bus.MessageMapPerRoom", "must be at least 100")
    if sections["bus"]["LeaseSeconds"] < 2:
        loader.problem("bus.LeaseSeconds", "must be at least 2")
    if sections["http"]["MaxBodyBytes"] < 1024:
        loader.problem("http.MaxBodyBytes", "must be at least 1024")
    for key in ("RequestTimeoutSeconds", "IdleTimeoutSeconds"):
        if not 0 < sections["http"][key] <= 86400:
            loader.problem(f"http.{key}", "must be more than 0 and at most 86400")
    if sections["http"]["MaxConnections"] < 1:
        loader.problem("http.MaxConnections", "must be at least 1")
    if sections["log"]["Level"].lower() not in ("debug", "info", "warning", "error"):
        loader.problem("log.Level", "must be debug, info, warning or error")
    if sections["log"]["Format"] not in ("text", "json"):
        loader.problem("log.Format", "must be text or json")


def parse_hostport(value: str) -> tuple[str, int] | None:
    """'127.0.0.1:4280', '[::1]:80', ':4280' -> (host, port)."""
    m = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value.strip())
    if not m or not 0 <= int(m.group(2)) <= 65535:
        return None
    return (m.group(1) or "0.0.0.0", int(m.group(2)))
