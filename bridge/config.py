"""Configuration: a Matterbridge ``matterbridge.toml`` plus our own sections.

Accounts are ``[protocol.name]`` tables using Matterbridge's key names; a key
is looked up on the account first, then in ``[general]`` (as Matterbridge's
viper config does), case-insensitively. Gateways are ``[[gateway]]`` with
``[[gateway.inout]]`` / ``[[gateway.in]]`` / ``[[gateway.out]]`` entries.
Our own sections — ``[redis]``, ``[http]``, ``[bus]`` … — sit beside them,
each built once into a typed section the program reads by attribute
(``config.bus.stream_max_len``). The workers' features declare their own
sections, the switches they add to accounts, gateways and channels, and
their ``[KIND.NAME]`` tables (``FeatureSpec``), handed to ``load_config`` by
the composition root as the adapters' ``ProtocolSpec``s are; the model holds
what they set without knowing what it means (``room_values``, ``tables``).

Any string value may be ``env:NAME`` or ``file:PATH`` so secrets stay out of
the file (``${NAME}`` in a ``file:`` path is the environment variable NAME:
systemd's ``file:${CREDENTIALS_DIRECTORY}/secret``). Every problem is
reported as ``key.path: what is wrong``; the loader collects them all
instead of stopping at the first.

This module is what the rest of talkbridge imports: the model a loaded
config is (``Config``, its ``AccountConfig``s and ``Gateway``s), ``ConfigError``
and ``load_config``. The keys a file may hold are declared in
bridge/config_keys.py, checked and turned into the model by
bridge/config_loader.py; addresses (``HOST:PORT``, host names, networks) are
parsed by bridge/addresses.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli

from bridge.config_keys import (
    MATTERBRIDGE_SECTIONS,
    OWN_SECTIONS,
    AdminSection,
    AlertsSection,
    BusSection,
    HttpSection,
    LogSection,
    RedisSection,
    find_option,
)
from bridge.goregex import GoRegexp, Template
from bridge.options import FeatureSpec, Option, ProtocolSpec, SectionT, build_section, section_values

MAX_CONFIG_BYTES = 1 << 20  # a config larger than 1 MiB is a mistake, not a config


class ConfigError(Exception):
    """The config is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Rewrite:
    """One ``ReplaceMessages`` / ``ReplaceNicks`` pair, compiled."""

    key: str  # "ReplaceMessages[0]": named in the log when it fails on a message
    regexp: GoRegexp
    template: Template


@dataclass(frozen=True, slots=True)
class AccountRules:
    """An account's filters and rewrites in Go's regexp dialect
    (bridge/goregex.py), compiled once when the config loads (the loader must
    compile them to validate them; the router uses these)."""

    ignore_nicks: tuple[GoRegexp, ...] = ()
    ignore_messages: tuple[GoRegexp, ...] = ()
    replace_messages: tuple[Rewrite, ...] = ()
    replace_nicks: tuple[Rewrite, ...] = ()


@dataclass(slots=True)
class AccountConfig:
    name: str  # "protocol.bridge"
    protocol: str
    values: dict[str, Any]  # lower-cased keys, secrets resolved
    general: dict[str, Any]
    specs: dict[str, Option]
    rules: AccountRules = field(default_factory=AccountRules)
    # The protocol's adapter passes on events talkbridge has no kind of its
    # own for (an api client's topic_change or custom ones): ProtocolSpec
    relays_other_events: bool = False

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
        spec = self.specs.get(key) or find_option(self.specs, low)
        if spec is not None and spec.default is not None:
            return spec.default
        return default

    def __repr__(self) -> str:  # never show values: some are secrets
        return f"AccountConfig({self.name!r})"


@dataclass(frozen=True, slots=True)
class GatewayEntry:
    account: str
    channel: str
    direction: str  # "inout" | "in" | "out"
    # the features' switches set in the entry's ``options`` (FeatureSpec.room_options), by key
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

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
    # the features' switches set on the gateway, for all its channels (FeatureSpec.room_options), by key
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(slots=True)
class Config:
    path: Path
    accounts: dict[str, AccountConfig]
    gateways: list[Gateway]
    # our own top-level sections, typed (bridge/config_keys.py), and the
    # features' (bridge/options.py FeatureSpec), by name; built once by the loader
    sections: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    # the features' [KIND.NAME] tables (FeatureSpec.tables): KIND -> NAME -> its
    # values, secrets resolved, made what the feature reads by its TableSpec.load
    tables: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # [general] AdminRoom: (account, channel) where alerts go (bridge/alerts.py)
    admin_room: tuple[str, str] | None = None

    # the core's sections; a feature reads its own with ``settings``
    @property
    def redis(self) -> RedisSection:
        return self.sections["redis"]

    @property
    def http(self) -> HttpSection:
        return self.sections["http"]

    @property
    def bus(self) -> BusSection:
        return self.sections["bus"]

    @property
    def admin(self) -> AdminSection:
        return self.sections["admin"]

    @property
    def log(self) -> LogSection:
        return self.sections["log"]

    @property
    def alerts(self) -> AlertsSection:
        return self.sections["alerts"]

    def settings(self, section: type[SectionT]) -> SectionT:
        """A feature's typed section (workers/feature_settings.py), by its class."""
        for value in self.sections.values():
            if type(value) is section:
                return value
        raise KeyError(f"{section.__name__}: not declared to the loader (load_config's features)")

    def section(self, name: str) -> dict[str, Any]:
        """A section's values by key as the file spells them: for what reads
        keys by name (the tests' checks of what a file loads to); the program
        reads the typed attributes."""
        return section_values(self.sections[name])

    def room_values(self, key: str, account: str, channel: str) -> tuple[list[Any], list[Any]]:
        """Where a feature's switch (FeatureSpec.room_options) is set for a
        room: its values in the channel entries that list the room (by its
        channel or ``*``), then on the gateways that do, in the file's order.
        Which of them wins, and what the account's own key adds, is the
        feature's to say (workers/instagram.py, workers/llm_trigger.py)."""
        entries = [
            (gw, e) for gw in self.gateways for e in gw.entries if e.account == account and e.channel in (channel, "*")
        ]
        on_channels = [e.options[key] for _, e in entries if key in e.options]
        on_gateways = [gw.options[key] for gw, _ in entries if key in gw.options]
        return on_channels, on_gateways

    def channels_of(self, account: str) -> list[str]:
        seen: dict[str, None] = {}
        for gw in self.gateways:
            for entry in gw.entries:
                if entry.account == account and entry.channel != "*":
                    seen[entry.channel] = None
        if self.admin_room is not None and self.admin_room[0] == account:
            seen[self.admin_room[1]] = None  # joined like a gateway's room, so alerts can be posted there
        return list(seen)


def load_config(
    path: str | os.PathLike[str],
    protocols: Mapping[str, ProtocolSpec],
    environ: Mapping[str, str] | None = None,
    features: Sequence[FeatureSpec] = (),
) -> Config:
    """Load and validate; raise ``ConfigError`` listing every problem.

    ``features``: the workers' declarations (their sections, switches and
    tables); without them those keys are not known."""
    # the loader builds this module's classes: imported here, so that either module may be imported first
    from bridge.config_loader import ConfigLoader, check_sections

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

    loader = ConfigLoader(path, protocols, os.environ if environ is None else environ, features)
    lower = {k.lower(): k for k in raw}
    general = loader.general(raw.get(lower.get("general", "general")))
    declared = {**OWN_SECTIONS, **{name: cls for f in features for name, cls in f.sections.items()}}
    sections = {name: loader.own_section(name, cls, raw.get(lower.get(name, name))) for name, cls in declared.items()}
    tables = {kind: spec for f in features for kind, spec in f.tables.items()}

    accounts: dict[str, AccountConfig] = {}
    for key, value in raw.items():
        low = key.lower()
        if low in tables:
            continue  # loaded below, once the accounts that name them are known
        if low in declared or low in MATTERBRIDGE_SECTIONS:
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

    loader.warn_general_not_implemented(raw.get(lower.get("general", "general")), accounts)
    gateways = loader.gateways(raw.get(lower.get("gateway", "gateway")), accounts)
    loaded = {kind: loader.tables(kind, raw.get(lower.get(kind, kind)), spec) for kind, spec in tables.items()}
    typed = {name: build_section(declared[name], values) for name, values in sections.items()}
    config = Config(path, accounts, gateways, typed, loader.warnings, loaded)
    for feature in features:  # what only the whole config can say (a persona a room names is defined)
        if feature.check is not None:
            loader.problems.extend(feature.check(config))
    for feature in features:
        if feature.warn is not None:
            loader.warnings.extend(feature.warn(config))
    config.admin_room = loader.admin_room(general, accounts)
    check_sections(loader, typed)
    if loader.problems:
        raise ConfigError(loader.problems)
    return config
