"""The config loader: checks a parsed ``matterbridge.toml`` against the key
declarations (bridge/config_keys.py) and builds the model (bridge/config.py)
from it; ``load_config`` in bridge/config.py reads the file and drives it.

``ConfigLoader`` reads one part at a time, ``[general]``, our own sections,
accounts, gateways, the features' ``[KIND.NAME]`` tables, ``AdminRoom``,
resolving ``env:`` / ``file:`` values on the way; ``check_sections`` checks
what a declaration cannot say (a Redis URL's scheme, addresses, the admin
page's password). The keys a worker feature adds (its switches on accounts,
gateways and channel entries, its tables) come from its ``FeatureSpec``:
what they mean is the feature's (workers/feature_settings.py), and without
it they are unknown keys. Both record every problem as ``key.path: what is
wrong`` and go on, so one run names them all; warnings are the settings
that work but are probably not meant.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bridge.addresses import is_loopback, parse_host_name, parse_hostport, parse_networks
from bridge.config import AccountConfig, AccountRules, Gateway, GatewayEntry, Rewrite
from bridge.config_keys import (
    COMMON_OPTIONS,
    DIRECTIONS,
    REDIS_SCHEMES,
    AdminSection,
    HttpSection,
    find_option,
)
from bridge.goregex import GoRegexError, GoRegexp, go_fields, unknown_references
from bridge.options import FeatureSpec, Option, ProtocolSpec, TableSpec, go_weak, section_options

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${NAME} in a file: path
MIN_PLAIN_PASSWORD = 12  # [admin] Password: a shorter plain one is warned about


def _ci(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k.lower(): v for k, v in mapping.items()}


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


class ConfigLoader:
    def __init__(
        self,
        path: Path,
        protocols: Mapping[str, ProtocolSpec],
        environ: Mapping[str, str],
        features: Sequence[FeatureSpec] = (),
    ):
        self.path = path
        self.base = path.parent
        self.protocols = protocols
        self.environ = environ
        # the keys every account understands, the features' switches among them
        self.common: dict[str, Option] = {**COMMON_OPTIONS}
        # the keys a [[gateway]] or a channel entry's options may set: the features' switches
        self.room_options: dict[str, Option] = {}
        for feature in features:
            self.common.update(feature.account_options)
            self.room_options.update(feature.room_options)
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
                expanded = self.expand(key, value[5:])
                if expanded is None:
                    return ""
                target = Path(expanded).expanduser()
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

    def expand(self, key: str, path: str) -> str | None:
        """``${NAME}`` in a ``file:`` path is the environment variable NAME
        (``file:${CREDENTIALS_DIRECTORY}/bot-secret`` under systemd); None
        when one is not set (a problem is recorded)."""
        missing: list[str] = []

        def value_of(m: re.Match[str]) -> str:
            if m.group(1) not in self.environ:
                missing.append(m.group(1))
                return ""
            return self.environ[m.group(1)]

        expanded = _ENV_REFERENCE.sub(value_of, path)
        if missing:
            self.problem(key, f"environment variable {missing[0]} is not set (named in {path})")
            return None
        return expanded

    def admin_room(self, general: Mapping[str, Any], accounts: Mapping[str, AccountConfig]) -> tuple[str, str] | None:
        """``[general] AdminRoom = "ACCOUNT:CHANNEL"``: the room alerts go to."""
        if "adminroom" not in general:
            return None
        value = general["adminroom"]
        if not isinstance(value, str) or not value.strip():
            self.problem("general.AdminRoom", f'must be a string "ACCOUNT:CHANNEL", not {_describe(value)}')
            return None
        try:
            account, channel = parse_admin_room(value)
        except ValueError as exc:
            self.problem("general.AdminRoom", str(exc))
            return None
        acct = accounts.get(account)
        if acct is None:
            known = ", ".join(sorted(accounts)) or "none"
            self.problem("general.AdminRoom", f'no account "{account}" (accounts: {known})')
            return None
        fixed = self.protocols[acct.protocol].fixed_channel
        if fixed is not None:
            return account, fixed  # an api account's one channel, whatever was written (as in gateways)
        if not channel or channel == "*":
            self.problem("general.AdminRoom", f'must name one room of {account}: "{account}:CHANNEL"')
            return None
        return account, channel

    def checked(self, key: str, value: Any, spec: Option, weak: bool = False) -> tuple[bool, Any]:
        """Is the value what ``spec`` declares (type, then range or choice)?
        Records the problem when not; returns the value as it is stored.
        ``weak``: a Matterbridge key, read as Matterbridge's loader reads it
        (``"true"`` for true, ``"100"`` for 100: options.go_weak)."""
        understood, value = go_weak(value, spec.type) if weak else (_type_ok(value, spec.type), value)
        if not understood:
            if weak and type(value) is int and spec.type is int:  # an integer Go's int cannot hold
                self.problem(key, "must fit in 64 bits")
            else:
                self.problem(key, f"must be {_type_name(spec.type)}, not {_describe(value)}")
            return False, value
        value, problem = spec.check(value)
        if problem is not None:
            self.problem(key, problem)
            return False, value
        return True, value

    def warn_not_implemented(self, key: str, spec: Option) -> None:
        self.warnings.append(f"{key}: accepted but ignored by talkbridge ({spec.not_implemented})")

    # sections -----------------------------------------------------------------
    def own_section(self, name: str, section: type, raw: Any) -> dict[str, Any]:
        """One of our top-level sections (a typed section's declarations),
        defaults applied, by key as declared."""
        options = section_options(section)
        out = {k: opt.default for k, opt in options.items()}
        if raw is None:
            return out
        if not isinstance(raw, dict):
            self.problem(name, f"must be a table, not {_describe(raw)}")
            return out
        for key, value in raw.items():
            opt_name = next((k for k in options if k.lower() == key.lower()), None)
            if opt_name is None:
                known = ", ".join(options)
                self.problem(f"{name}.{key}", f"unknown key (known: {known})")
                continue
            ok, value = self.checked(f"{name}.{key}", self.resolve(f"{name}.{key}", value), options[opt_name])
            if ok:
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
            spec = find_option(self.common, key.lower())
            if spec is not None:
                ok, value = self.checked(f"general.{key}", value, spec, weak=True)
                if not ok:
                    continue
            out[key.lower()] = value
        return out

    def warn_general_not_implemented(self, raw: Any, accounts: Mapping[str, AccountConfig]) -> None:
        """A [general] key no account does anything with (a Talk bot account
        does read MessageLength, an api account does not)."""
        if not isinstance(raw, dict):
            return
        for key in raw:
            specs = [find_option(acct.specs, key.lower()) for acct in accounts.values()] or [
                find_option(self.common, key.lower())
            ]
            found = [spec for spec in specs if spec is not None]
            if found and all(spec.not_implemented for spec in found):
                self.warn_not_implemented(f"general.{key}", found[0])

    def account(self, protocol: str, bridge: str, raw: Any, general: dict[str, Any]) -> AccountConfig | None:
        name = f"{protocol}.{bridge}"
        if not isinstance(raw, dict):
            self.problem(name, f"must be a table, not {_describe(raw)}")
            return None
        if not re.fullmatch(r"[A-Za-z0-9_-]+", bridge):
            self.problem(name, "account names may use letters, digits, '-' and '_' only")
            return None
        proto = self.protocols[protocol]
        specs = {**self.common, **proto.options}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            path = f"{name}.{key}"
            spec = find_option(specs, key.lower())
            if spec is None:
                self.warnings.append(f"{path}: unknown key, ignored")
                continue
            ok, value = self.checked(path, self.resolve(path, value), spec, weak=True)
            if not ok:
                continue
            if spec.not_implemented:
                self.warn_not_implemented(path, spec)
            values[key.lower()] = value
        for key, spec in specs.items():
            if spec.required and key.lower() not in values and key.lower() not in general:
                self.problem(f"{name}.{key}", "is required")
        acct = AccountConfig(name, protocol, values, general, specs, relays_other_events=proto.relays_other_events)
        acct.rules = self.rules(acct)
        if proto.check is not None:
            for text in proto.check(acct):
                self.problems.append(text if text.startswith(name) else f"{name}.{text}")
        if proto.warn is not None:
            for text in proto.warn(acct):
                self.warnings.append(text if text.startswith(name) else f"{name}.{text}")
        return acct

    def rules(self, acct: AccountConfig) -> AccountRules:
        """Compile the account's patterns in Go's dialect and parse its
        replacements by Go's Expand rules: a pattern Go would refuse is a
        problem now, not at the first message (Matterbridge logs it at every
        message and skips the rule); a replacement naming a group the pattern
        lacks is valid Go (it expands to nothing) and gets a warning."""
        ignore: dict[str, list[GoRegexp]] = {}
        for key in ("IgnoreNicks", "IgnoreMessages"):
            ignore[key] = []
            for pattern in go_fields(str(acct.get(key, ""))):  # gateway.go: strings.Fields
                try:
                    ignore[key].append(GoRegexp.compile(pattern))
                except GoRegexError as exc:
                    self.problem(f"{acct.name}.{key}", f"bad regular expression {pattern!r}: {exc}")
        replace: dict[str, list[Rewrite]] = {}
        for key in ("ReplaceMessages", "ReplaceNicks"):
            replace[key] = []
            for i, pair in enumerate(acct.get(key, ()) or ()):
                where = f"{acct.name}.{key}[{i}]"
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                    self.problem(where, 'must be a pair of strings ["regex", "replacement"]')
                    continue
                try:
                    regexp = GoRegexp.compile(pair[0])
                except GoRegexError as exc:
                    self.problem(where, f"bad regular expression {pair[0]!r}: {exc}")
                    continue
                for note in unknown_references(pair[1], regexp):
                    self.warnings.append(f"{where}: {note}")
                replace[key].append(Rewrite(f"{key}[{i}]", regexp, regexp.template(pair[1])))
        return AccountRules(
            ignore_nicks=tuple(ignore["IgnoreNicks"]),
            ignore_messages=tuple(ignore["IgnoreMessages"]),
            replace_messages=tuple(replace["ReplaceMessages"]),
            replace_nicks=tuple(replace["ReplaceNicks"]),
        )

    def gateways(self, raw: Any, accounts: dict[str, AccountConfig]) -> list[Gateway]:
        """``[[gateway]]`` as Matterbridge's router reads them
        (gateway/router.go NewRouter): a disabled gateway is skipped before
        its name is looked at, so only enabled ones need a name of their own."""
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
            enable_ok, enable = go_weak(gwl.get("enable", False), bool)
            if not enable_ok:
                self.problem(f"{where}.enable", f"must be true or false, not {_describe(enable)}")
            name_ok, name = go_weak(gwl.get("name", ""), str)
            own = {k: v for k, v in gw.items() if find_option(self.room_options, k.lower()) is not None}
            for key in gw:
                if key.lower() not in ("name", "enable", *DIRECTIONS) and key not in own:
                    self.warnings.append(f"{where}.{key}: unknown key, ignored")
            options = self.gateway_options(where, own)
            entries = self.gateway_entries(where, gwl, accounts)
            if enable_ok and enable is not True:
                shown = f'gateway "{name}"' if name_ok and name else "a gateway without a name"
                self.warnings.append(f"{where}: {shown} is not enabled (enable=true), skipped")
                continue
            # (an enable we cannot read is a problem already; the rest is checked as if enabled)
            if not name_ok or not name:
                self.problem(f"{where}.name", "is required (a non-empty string)")
                continue
            if name in names:
                self.problem(f"{where}.name", f'gateway "{name}" is defined twice')
                continue
            names.add(name)
            if len(entries) < 2:
                self.warnings.append(f'{where}: gateway "{name}" links fewer than two channels')
            out.append(Gateway(name, tuple(entries), options))
        return out

    def gateway_options(self, where: str, raw: Any) -> dict[str, Any]:
        """talkbridge's own keys on a gateway or in a channel entry's ``options``
        (the features' ``room_options``); Matterbridge's entry options
        (WebhookURL…) are accepted and ignored."""
        if not isinstance(raw, dict):
            self.problem(where, f"must be a table, not {_describe(raw)}")
            return {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            known = next((k for k in self.room_options if k.lower() == key.lower()), None)
            if known is None:
                continue
            ok, value = self.checked(f"{where}.{key}", value, self.room_options[known])
            if ok:
                out[known] = value
        return out

    def gateway_entries(
        self, where: str, gwl: dict[str, Any], accounts: dict[str, AccountConfig]
    ) -> list[GatewayEntry]:
        """A channel listed more than once in a gateway is one channel; listed
        with two directions it is ``inout`` (gateway.go mapChannelConfig)."""
        entries: dict[tuple[str, str], GatewayEntry] = {}
        for direction in DIRECTIONS:
            items = gwl.get(direction, [])
            if not isinstance(items, list):
                self.problem(f"{where}.{direction}", f"must be an array of tables ([[gateway.{direction}]])")
                continue
            for ei, item in enumerate(items):
                entry = self.gateway_entry(f"{where}.{direction}[{ei}]", item, direction, accounts)
                if entry is None:
                    continue
                known = entries.get((entry.account, entry.channel))
                if known is None:
                    entries[(entry.account, entry.channel)] = entry
                elif known.direction != entry.direction:
                    entries[(entry.account, entry.channel)] = dataclasses.replace(known, direction="inout")
        return list(entries.values())

    def gateway_entry(
        self, where: str, item: Any, direction: str, accounts: dict[str, AccountConfig]
    ) -> GatewayEntry | None:
        if not isinstance(item, dict):
            self.problem(where, "must be a table with account and channel")
            return None
        il = _ci(item)
        account_ok, account = go_weak(il.get("account"), str)
        channel_ok, channel = go_weak(il.get("channel"), str)
        ok = True
        acct = accounts.get(account) if account_ok else None
        if not account_ok or not account:
            self.problem(f"{where}.account", 'is required (a string like "api.myapi")')
            ok = False
        elif acct is None:
            self.problem(f"{where}.account", f'no account "{account}"')
            ok = False
        fixed = self.protocols[acct.protocol].fixed_channel if acct is not None else None
        if fixed is not None:
            # gateway.go mapChannelConfig: an api account's channel is "api", whatever the entry says
            channel = fixed
        elif not channel_ok or not channel:
            self.problem(f"{where}.channel", "is required (a non-empty string)")
            ok = False
        for key in item:
            if key.lower() not in ("account", "channel", "options"):
                self.warnings.append(f"{where}.{key}: unknown key, ignored")
        options = self.gateway_options(f"{where}.options", il["options"]) if "options" in il else {}
        if not ok:
            return None
        return GatewayEntry(account, channel, direction, options)

    def tables(self, kind: str, raw: Any, spec: TableSpec) -> dict[str, dict[str, Any]]:
        """A feature's ``[KIND.NAME]`` tables (the llm's ``[persona.NAME]``),
        their keys as the feature declares them, then made what the program
        reads by the feature's ``load``."""
        if raw is None:
            return {}
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            self.problem(kind, f"must hold {kind}s as [{kind}.NAME] tables")
            return {}
        options = spec.options
        out: dict[str, dict[str, Any]] = {}
        for name, body in raw.items():
            where = f"{kind}.{name}"
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                self.problem(where, f"{kind} names may use letters, digits, '-' and '_' only")
                continue
            values = {k: opt.default for k, opt in options.items()}
            given: set[str] = set()
            for key, value in body.items():
                known = next((k for k in options if k.lower() == key.lower()), None)
                if known is None:
                    self.problem(f"{where}.{key}", f"unknown key (known: {', '.join(options)})")
                    continue
                ok, value = self.checked(f"{where}.{known}", self.resolve(f"{where}.{known}", value), options[known])
                if ok:
                    values[known] = value
                    given.add(known)
            for key, opt in options.items():
                if opt.required and key not in given:
                    self.problem(f"{where}.{key}", "is required")
            if spec.load is not None:
                values, problems = spec.load(name, values, self.base)
                self.problems.extend(f"{where}.{text}" for text in problems)
            out[name] = values
        return out


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


def check_sections(loader: ConfigLoader, sections: Mapping[str, Any]) -> None:
    """What the option declarations cannot say (ranges and choices they do)."""
    url = sections["redis"].url
    if url and not url.startswith(REDIS_SCHEMES):  # never echo the value: it may hold a password
        loader.problem("redis.URL", f"must start with one of {', '.join(REDIS_SCHEMES)}")
    _check_min_replicas(loader, sections["redis"].min_replicas, url)
    bind = sections["http"].bind_address
    if bind and parse_hostport(bind) is None:
        loader.problem("http.BindAddress", f'"{bind}" is not HOST:PORT')
    _check_status_access(loader, sections["http"])
    _check_admin(loader, sections["admin"])
    for key, problem in sections["bus"].problems():
        loader.problem(key, problem)


def _check_min_replicas(loader: ConfigLoader, min_replicas: int, url: str) -> None:
    if not isinstance(min_replicas, int) or min_replicas <= 0:
        return
    if not url:
        loader.problem(
            "redis.MinReplicas",
            f"is {min_replicas}, but with no URL the bridge runs its own embedded Redis, which has no replicas: "
            "every write would be refused; set URL to a Redis with replicas (redis+sentinel://) or MinReplicas = 0",
        )
    elif url.startswith("redis+cluster://"):
        loader.problem(
            "redis.MinReplicas",
            f"is {min_replicas}, but the URL is a Redis Cluster, where a pipeline's writes span several masters "
            "and one WAIT cannot cover them: use a standalone or Sentinel Redis (redis+sentinel://) or MinReplicas = 0",
        )


def _check_status_access(loader: ConfigLoader, http: HttpSection) -> None:
    networks = http.metrics_from
    if not all(isinstance(n, str) for n in networks):
        loader.problem("http.MetricsFrom", 'must be a list of strings, e.g. ["127.0.0.0/8", "::1"]')
    else:
        try:
            parse_networks(networks)
        except ValueError as exc:
            loader.problem("http.MetricsFrom", str(exc))
    token = http.metrics_token
    if token and (len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token):
        # never echo the value: it is a secret
        loader.problem("http.MetricsToken", "must be 16 or more printable ASCII characters without spaces")


def _check_admin(loader: ConfigLoader, admin: AdminSection) -> None:
    from bridge.admin.passwords import PasswordFormatError, parse_password  # hashlib only

    bind = admin.bind_address
    if bind and parse_hostport(bind) is None:
        loader.problem("admin.BindAddress", f'"{bind}" is not HOST:PORT')
    if bool(admin.user) != bool(admin.password):
        missing = "Password" if admin.user else "User"
        loader.problem(f"admin.{missing}", "is required with the other (the page is served when both are set)")
    try:
        check = parse_password(admin.password)
    except PasswordFormatError as exc:
        loader.problem("admin.Password", str(exc))
        check = None
    for i, name in enumerate(admin.hosts):
        if not (isinstance(name, str) and parse_host_name(name) is not None):
            shown = f'"{name}"' if isinstance(name, str) else _describe(name)
            loader.problem(f"admin.Hosts[{i}]", f"{shown} is not a host name or IP address (no port, no scheme)")
    if not (admin.user and admin.password):
        return  # not served: nothing to warn about
    # dangerous settings that still work: warned about, named by key
    host = parse_hostport(bind)[0] if bind and parse_hostport(bind) else ""
    if host and not is_loopback(host) and not admin.secure_cookie:
        loader.warnings.append(
            f'admin.BindAddress: "{bind}" can be reached from other hosts over plain HTTP (SecureCookie = false): '
            "the password and the session cookie cross the network readable; keep it on 127.0.0.1 behind an SSH "
            "tunnel, or serve it through an HTTPS proxy and set SecureCookie = true"
        )
    if host in ("0.0.0.0", "::") and not admin.hosts:
        loader.warnings.append(
            f'admin.Hosts: BindAddress "{bind}" listens on every address, but the page answers only to localhost, '
            "127.0.0.1 and ::1 until Hosts lists the names browsers use for it"
        )
    if check is not None and check.method == "plain" and len(admin.password) < MIN_PLAIN_PASSWORD:
        loader.warnings.append(
            f"admin.Password: a password shorter than {MIN_PLAIN_PASSWORD} characters is quick to guess; use a "
            "longer one, best as its scrypt hash (python -m bridge.admin.passwords)"
        )


def parse_admin_room(value: str) -> tuple[str, str]:
    """``"ACCOUNT:CHANNEL"`` split at the first colon (a Matrix room id has
    colons, an account name never does); the channel may be empty here (an
    ``api`` account's is fixed). ValueError when the account part is empty."""
    account, _, channel = value.partition(":")
    if not account.strip():
        raise ValueError('must be "ACCOUNT:CHANNEL", e.g. "matrix.ops:!room:example.org" or "api.admin:api"')
    return account.strip(), channel.strip()
