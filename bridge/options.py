"""Option declarations: what a config key accepts, declared once and checked
by the loader.

This module is the bottom of the config layer: it imports nothing of the
daemon (no adapters, no bus, no Redis client), so ``bridge.config`` can load
and validate a file without them. Adapters declare their account keys with
``Option``; the loader checks types, ranges and allowed values from those
declarations, and an adapter's ``check_account`` is left with what a
declaration cannot say (a URL's shape, a secret's length).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from pathlib import Path

    from bridge.config import AccountConfig, Config


@dataclass(frozen=True, slots=True)
class Option:
    """One config key (Matterbridge spelling for account keys)."""

    type: type | tuple[type, ...] = str
    required: bool = False
    secret: bool = False  # never printed, never logged
    default: Any = None
    help: str = ""
    min: float | None = None  # numbers: the smallest value allowed
    above: float | None = None  # numbers: values must be greater than this
    max: float | None = None  # numbers: the largest value allowed
    # strings: the values allowed, matched without regard to case and stored
    # as spelled here
    choices: tuple[str, ...] = ()
    # Non-empty for a Matterbridge key talkbridge accepts (a matterbridge.toml
    # loads as it is) but does nothing with: why. Setting it gets a warning.
    not_implemented: str = ""

    def check(self, value: Any) -> tuple[Any, str | None]:
        """The value as stored and the problem with it (None: fine).

        The value's type is checked before; this checks its range or choice.
        """
        if self.choices and isinstance(value, str):
            for choice in self.choices:
                if value.lower() == choice.lower():
                    return choice, None
            return value, f"must be {_one_of(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value, None
        too_low = (self.min is not None and value < self.min) or (self.above is not None and value <= self.above)
        if too_low or (self.max is not None and value > self.max):
            return value, f"must be {self._range()}"
        return value, None

    def _range(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"at least {_number(self.min)}")
        if self.above is not None:
            parts.append(f"more than {_number(self.above)}")
        if self.max is not None:
            parts.append(f"at most {_number(self.max)}")
        return " and ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _one_of(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


# Go's strconv.ParseBool, as viper's decoder and cast read a bool from a string
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True}
_GO_BOOLS |= {"0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
# Go's strconv.ParseInt(s, 0, 64): a Go integer literal, "_" between digits
_GO_INT = re.compile(
    r"[+-]?(?:0[xX](?:_?[0-9a-fA-F])+|0[bB](?:_?[01])+|0[oO](?:_?[0-7])+|0(?:_?[0-7])*|[1-9](?:_?[0-9])*)"
)
_INT64 = (-(1 << 63), (1 << 63) - 1)


def go_weak(value: Any, t: type | tuple[type, ...]) -> tuple[bool, Any]:
    """A Matterbridge key's value as Matterbridge's loader reads it: viper
    decodes the config with mapstructure's ``WeaklyTypedInput`` and reads keys
    with ``cast`` (bridge/config/config.go; mapstructure 1.5.0, cast 1.5.0),
    so ``enable = "true"``, ``Buffer = "100"`` and ``Label = 5`` are fine
    there. Returns (understood, the value as the declared type). What Go
    cannot read either (``Buffer = "big"``) stays a problem here, where
    Matterbridge would refuse it at start (a section it decodes) or read it
    as zero (one it only looks up)."""
    types = t if isinstance(t, tuple) else (t,)
    if type(value) is int and int in types:
        return (True, value) if _INT64[0] <= value <= _INT64[1] else (False, value)  # Go's int is 64 bits
    if type(value) in types:
        return True, value
    if bool in types:
        if isinstance(value, str):
            if value == "":
                return True, False
            return (True, _GO_BOOLS[value]) if value in _GO_BOOLS else (False, value)
        if isinstance(value, int | float):
            return True, value != 0
    if int in types:
        if isinstance(value, bool):
            return True, int(value)
        if isinstance(value, float):
            # Go converts a float to an int by truncation
            return (True, int(value)) if math.isfinite(value) and _INT64[0] <= value <= _INT64[1] else (False, value)
        if isinstance(value, str):
            return _go_int(value)
    if str in types:
        if isinstance(value, bool):
            return True, "true" if value else "false"  # cast.ToString, as the keys are read
        if isinstance(value, int):
            return True, str(value)
        if isinstance(value, float):
            return True, _go_float(value)
    return False, value


def _go_int(text: str) -> tuple[bool, Any]:
    if text == "":
        return True, 0
    if not _GO_INT.fullmatch(text):
        return False, text
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    digits = digits.replace("_", "")
    base = 10
    if len(digits) > 1 and digits[0] == "0":
        prefix = digits[1].lower()
        base, digits = {"x": (16, digits[2:]), "b": (2, digits[2:]), "o": (8, digits[2:])}.get(prefix, (8, digits[1:]))
    number = sign * int(digits, base)
    return (True, number) if _INT64[0] <= number <= _INT64[1] else (False, text)


def _go_float(value: float) -> str:
    """strconv.FormatFloat(f, 'f', -1, 64): shortest digits, no exponent."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


AccountCheck = Callable[["AccountConfig"], list[str]]


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """What the config loader needs to know about a protocol."""

    name: str
    options: Mapping[str, Option]
    check: AccountCheck | None = None  # problems beyond what the declarations say
    warn: AccountCheck | None = None  # warnings: settings that load but are risky
    # The adapter's traits of the same names (bridge/adapter.py, AdapterTraits).
    fixed_channel: str | None = None
    relays_other_events: bool = False


class DeclaresOptions(Protocol):
    """An adapter class, as far as the config layer knows one."""

    options: Mapping[str, Option]

    def check_account(self, account: AccountConfig) -> list[str]: ...

    # optional: ``warn_account(account) -> list[str]``, warnings (see ProtocolSpec.warn),
    # and ``traits`` (bridge/adapter.py AdapterTraits: fixed_channel, relays_other_events)


# Typed sections -------------------------------------------------------------------
# A top-level section (``[bus]``, a feature's ``[instagram]``) is declared as a
# frozen dataclass whose fields are its keys: ``setting("StreamMaxLen",
# Option(...))`` names the key as the file spells it and declares it. The
# loader checks the file against ``section_options`` and builds the object
# once (``build_section``); the rest of the program reads attributes
# (``config.bus.stream_max_len``), never key strings.
SectionT = TypeVar("SectionT")


def setting(key: str, option: Option) -> Any:
    """A typed section's field: the key it is read from and its declaration
    (a secret one stays out of the object's repr)."""
    return field(default=option.default, repr=not option.secret, metadata={"key": key, "option": option})


def section_options(section: type) -> dict[str, Option]:
    """The keys a typed section declares, in declaration order."""
    return {f.metadata["key"]: f.metadata["option"] for f in fields(section)}


def build_section(section: type[SectionT], values: Mapping[str, Any]) -> SectionT:
    """The typed section from checked values by key (every declared key present)."""
    return section(**{f.name: values[f.metadata["key"]] for f in fields(section)})


def section_values(section: Any) -> dict[str, Any]:
    """A typed section's values by key, as the file spells them."""
    return {f.metadata["key"]: getattr(section, f.name) for f in fields(section)}


# what a feature checks once the config is built: one line per problem (or
# warning), each naming its key
FeatureCheck = Callable[["Config"], list[str]]
# a feature's table as the program reads it, made from its checked values:
# (the table's NAME, its values by key, the config file's directory) -> the
# values, and problems as "Key: what is wrong" (the loader prefixes the table)
TableLoad = Callable[[str, dict[str, Any], "Path"], tuple[dict[str, Any], list[str]]]


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A feature's ``[KIND.NAME]`` tables (the llm's ``[persona.NAME]``):
    their keys, and what the feature makes of a table once its keys are
    checked (defaults that depend on NAME, files read, checks a declaration
    cannot say)."""

    options: Mapping[str, Option]
    load: TableLoad | None = None


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """What the config loader needs to know about a worker feature, as
    ``ProtocolSpec`` is for a protocol: the top-level sections it owns
    (typed sections, see ``setting``), the switches it adds to every account
    (and ``[general]``) and to a ``[[gateway]]`` or a channel entry's
    ``options`` (resolved for a room by ``Config.room_values``), its
    ``[KIND.NAME]`` tables, and what it checks once the config is built.
    The features declare theirs in workers/ (workers/feature_settings.py);
    the composition root hands them to ``load_config``, so the core never
    imports a feature, and a config loaded without them knows none of it."""

    name: str
    sections: Mapping[str, type] = field(default_factory=dict)
    account_options: Mapping[str, Option] = field(default_factory=dict)
    room_options: Mapping[str, Option] = field(default_factory=dict)
    tables: Mapping[str, TableSpec] = field(default_factory=dict)
    check: FeatureCheck | None = None  # problems (exit 2)
    warn: FeatureCheck | None = None  # warnings: settings that load but do not fit together
    describe: FeatureCheck | None = None  # lines ``check-config`` prints about its settings (never a secret)


def protocol_specs(adapters: Mapping[str, DeclaresOptions]) -> dict[str, ProtocolSpec]:
    """The loader's view of the adapter classes, by protocol name."""
    specs = {}
    for name, cls in adapters.items():
        traits = getattr(cls, "traits", None)  # an Adapter's AdapterTraits; None: the ordinary adapter's
        specs[name] = ProtocolSpec(
            name,
            cls.options,
            cls.check_account,
            warn=getattr(cls, "warn_account", None),
            fixed_channel=traits.fixed_channel if traits is not None else None,
            relays_other_events=traits.relays_other_events if traits is not None else False,
        )
    return specs
