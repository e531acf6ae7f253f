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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bridge.config import AccountConfig


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


AccountCheck = Callable[["AccountConfig"], list[str]]


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """What the config loader needs to know about a protocol."""

    name: str
    options: Mapping[str, Option]
    check: AccountCheck | None = None  # problems beyond what the declarations say


class DeclaresOptions(Protocol):
    """An adapter class, as far as the config layer knows one."""

    options: Mapping[str, Option]

    def check_account(self, account: AccountConfig) -> list[str]: ...


def protocol_specs(adapters: Mapping[str, DeclaresOptions]) -> dict[str, ProtocolSpec]:
    """The loader's view of the adapter classes, by protocol name."""
    return {name: ProtocolSpec(name, cls.options, cls.check_account) for name, cls in adapters.items()}
