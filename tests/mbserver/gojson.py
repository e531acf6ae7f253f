"""config.Message as Go's encoding/json reads and writes it, for the test
Matterbridge (tests/mbserver).

- bridge/config/config.go @ 9989a7c6 (the nearest stored version to
  e68ddcf5): ``type Message struct`` -- the JSON names and their order
  (text, channel, username, userid, avatar, account, event, protocol,
  gateway, parent_id, timestamp, id, Extra: no tag, its field name);
  ``type FileInfo struct`` (Name, Data *[]byte, Comment, URL, Size int64,
  Avatar bool, SHA, NativeID; no tags).
- Go's encoding/json (Go 1.19/1.20, what 1.26 was built with): a key
  matches a field without regard to case; each key is assigned in turn (the
  last of a string field wins, a second ``Extra`` object adds to the first
  map); ``null`` leaves a field as it was; the first type error is returned
  after the whole value was read; numbers in ``interface{}`` are float64;
  maps marshal with sorted keys; strings escape ``<``, ``>``, ``&``,
  U+2028/2029 and control characters (``\\u00XX``, no ``\\b``/``\\f`` before
  Go 1.22); ``time.Time`` as RFC 3339 with nanoseconds, trailing zeros cut.
- labstack/echo v4.10.2 json.go ``DefaultJSONSerializer.Deserialize``: a
  ``json.Decoder`` reads the first value only (what follows is never read);
  an UnmarshalTypeError becomes ``Unmarshal type error: expected=%v,
  got=%v, field=%v, offset=%v``, a SyntaxError ``Syntax error: offset=%v,
  error=%v``, anything else its own text (bind.go ``BindBody`` makes each a
  400).

Limits (guesses, said in the package docstring): offsets and syntax-error
wording are Python's json module's, not Go's scanner's; a type error inside
``Extra`` names the field ``Extra`` (whether Go 1.20 adds the map key is not
checked).
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

MESSAGE_FIELDS = (
    "text", "channel", "username", "userid", "avatar", "account", "event", "protocol", "gateway", "parent_id",
    "timestamp", "id", "Extra",
)  # fmt: skip
FILE_FIELDS = ("Name", "Data", "Comment", "URL", "Size", "Avatar", "SHA", "NativeID")


class GoError(Exception):
    """An error as echo answers it: status and message ({"message": ...})."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class FileInfo:
    """config.FileInfo."""

    Name: str = ""
    Data: bytes | None = None
    Comment: str = ""
    URL: str = ""
    Size: int = 0
    Avatar: bool = False
    SHA: str = ""
    NativeID: str = ""


@dataclass
class Message:
    """config.Message; ``timestamp`` in nanoseconds since the epoch (0: Go's
    zero time), ``Extra`` None when nil."""

    text: str = ""
    channel: str = ""
    username: str = ""
    userid: str = ""
    avatar: str = ""
    account: str = ""
    event: str = ""
    protocol: str = ""
    gateway: str = ""
    parent_id: str = ""
    timestamp: int = 0
    id: str = ""
    Extra: dict[str, list[Any] | None] | None = field(default=None)

    def copy(self) -> Message:
        """Go copies the struct by value; the Extra map is shared, as in Go."""
        return Message(**{name: getattr(self, name) for name in MESSAGE_FIELDS})


def now_ns() -> int:
    return time.time_ns()


# --- marshal ---------------------------------------------------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "<": "\\u003c", ">": "\\u003e",
            "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}  # fmt: skip
_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _ESCAPES:
        return _ESCAPES[char]
    if "\ud800" <= char <= "\udfff":
        return "\\ufffd"  # invalid UTF-8 (a lone surrogate here) marshals as U+FFFD
    return f"\\u{ord(char):04x}"


def go_string(text: str) -> str:
    """encoding/json encodeState.string with escapeHTML (Go 1.20)."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def go_float(value: float) -> str:
    """encoding/json floatEncoder for float64: 'f' format, or 'e' below 1e-6
    and from 1e21, the shortest digits that read back the same; ``e-07`` is
    cleaned to ``e-7``."""
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    shortest = repr(value)
    if abs(value) < 1e-6 or abs(value) >= 1e21:
        digits = Decimal(shortest)
        sign, ds, exponent = digits.as_tuple()
        text = "".join(map(str, ds)).rstrip("0") or "0"
        exp10 = int(exponent) + len(ds) - 1
        mant = text[0] + ("." + text[1:] if len(text) > 1 else "")
        out = ("-" if sign else "") + mant + "e" + ("-" if exp10 < 0 else "+") + f"{abs(exp10):02d}"
        if exp10 < 0 and abs(exp10) < 10:
            out = out[:-2] + out[-1]  # e-07 -> e-7
        return out
    text = format(Decimal(shortest), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def go_time(ns: int) -> str:
    """time.Time.MarshalJSON: RFC3339Nano (trailing zeros of the fraction
    cut, no fraction when it is zero), in UTC (the server's zone here)."""
    if ns == 0:
        return "0001-01-01T00:00:00Z"  # Go's zero time
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{frac:09d}".rstrip("0")
    return stamp + ("." + fraction if fraction else "") + "Z"


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(go_string(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(go_float(value))
    elif isinstance(value, Message):
        out.append("{")
        for i, name in enumerate(MESSAGE_FIELDS):
            out.append(("," if i else "") + go_string(name) + ":")
            item = getattr(value, name)
            out.append(go_string(go_time(item))) if name == "timestamp" else _encode(item, out)
        out.append("}")
    elif isinstance(value, FileInfo):
        out.append("{")
        for i, name in enumerate(FILE_FIELDS):
            out.append(("," if i else "") + go_string(name) + ":")
            item = getattr(value, name)
            if name == "Data":  # *[]byte: base64, null for a nil pointer
                out.append("null" if item is None else '"' + base64.b64encode(item).decode() + '"')
            else:
                _encode(item, out)
        out.append("}")
    elif isinstance(value, dict):  # Go marshals map keys sorted
        out.append("{")
        for i, key in enumerate(sorted(value)):
            out.append(("," if i else "") + go_string(key) + ":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot marshal {type(value).__name__}")


def marshal(value: Any) -> bytes:
    """json.Marshal."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode()


def indent(data: bytes, prefix: str) -> bytes:
    """json.Indent(dst, src, "", prefix) over compact JSON, as echo's
    JSONPretty and ``?pretty`` get it from an Encoder with SetIndent: the
    escapes are kept as marshalled, ``[]`` and ``{}`` stay empty, ``": "``
    after keys."""
    out: list[str] = []
    text = data.decode()
    depth = 0
    in_string = escaped = False
    for i, char in enumerate(text):
        if in_string:
            out.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
            out.append(char)
        elif char in "[{":
            out.append(char)
            if i + 1 < len(text) and text[i + 1] in "]}":
                continue  # Go's Indent keeps an empty array or object on one line
            depth += 1
            out.append("\n" + prefix * depth)
        elif char in "]}":
            if text[i - 1] not in "[{":
                depth -= 1
                out.append("\n" + prefix * depth)
            out.append(char)
        elif char == ",":
            out.append(",\n" + prefix * depth)
        elif char == ":":
            out.append(": ")
        else:
            out.append(char)
    return "".join(out).encode()


def to_plain(value: Any) -> Any:
    """A message (or what it holds) as the JSON value Go would send: what
    control routes answer and tests compare against."""
    return json.loads(marshal(value))


# --- unmarshal -------------------------------------------------------------------------------------------------------


class _Reject(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Reject(f"invalid character '{name[0]}' looking for beginning of value")


def _go_number(text: str) -> float:
    """A number read into interface{}: float64, or Go's convertNumber error."""
    number = float(text)
    if math.isinf(number):
        raise _Reject("number " + text)
    return number


_DECODER = json.JSONDecoder(
    object_pairs_hook=lambda pairs: ("object", pairs),
    parse_constant=_no_constant,
    parse_float=_go_number,
    parse_int=_go_number,
)
_GO_SPACE = " \t\r\n"


def _kind(value: Any) -> str:
    if isinstance(value, tuple):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float):
        return "number"
    return "string"


def _fold(key: str) -> str:
    # Go's foldName: ASCII case, and the Kelvin sign and long s fold to k and s
    return key.translate({0x212A: "k", 0x17F: "s"}).lower()


_BY_FOLD = {_fold(name): name for name in MESSAGE_FIELDS}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _go_str(text: str) -> str:
    """A JSON string as Go unquotes it: a lone surrogate escape is U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def _plain(value: Any) -> Any:
    """A parsed value for interface{}: objects become dicts (a repeated key:
    the last wins, as in a Go map)."""
    if isinstance(value, tuple):
        return {_go_str(key): _plain(item) for key, item in value[1]}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return _go_str(value) if isinstance(value, str) else value


_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})\Z")


def _check_time(value: Any) -> str | None:
    """time.Time.UnmarshalJSON (Go 1.20): null is nothing; else a string in
    RFC 3339 (fields in range). Returns the error text, or None."""
    if value is None:
        return None
    if not isinstance(value, str):
        return "Time.UnmarshalJSON: input is not a JSON string"
    m = _RFC3339.match(value)
    if m:
        try:
            datetime(*(int(m.group(i)) for i in range(1, 4)), int(m.group(4)), int(m.group(5)), int(m.group(6)))
            return None
        except ValueError:
            pass
    return f'parsing time "{json.dumps(value)}" as "\\"2006-01-02T15:04:05Z07:00\\"": cannot parse'


def decode_message(raw: bytes, message: Message | None = None, *, stream: bool = True) -> Message:
    """Read ``raw`` into a config.Message as echo's Bind (``stream``: a
    json.Decoder, the first value only) or melody's handler (json.Unmarshal:
    the whole text) does; raise GoError (400) as echo words it."""
    message = message if message is not None else Message()
    text = raw.decode("utf-8", "replace")  # Go reads invalid UTF-8 in strings as U+FFFD
    start = 0
    while start < len(text) and text[start] in _GO_SPACE:
        start += 1
    if start == len(text):
        raise GoError(400, "EOF" if not raw.strip(b" \t\r\n") else "unexpected EOF")
    try:
        value, end = _DECODER.raw_decode(text, start)
    except _Reject as exc:
        if str(exc).startswith("number "):
            raise GoError(
                400, f"Unmarshal type error: expected=float64, got={exc}, field=Extra, offset={start}"
            ) from None
        raise GoError(400, f"Syntax error: offset={start + 1}, error={exc}") from None
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text):
            raise GoError(400, "unexpected EOF") from None
        raise GoError(400, f"Syntax error: offset={exc.pos + 1}, error={exc.msg}") from None
    if not stream and text[end:].strip(_GO_SPACE):
        raise GoError(400, "Syntax error: invalid character after top-level value")
    if value is None:
        return message  # null into a struct: nothing
    if not isinstance(value, tuple):
        raise GoError(400, f"Unmarshal type error: expected=config.Message, got={_kind(value)}, field=, offset={end}")
    first_error: str | None = None
    for key, item in value[1]:
        name = key if key in MESSAGE_FIELDS else _BY_FOLD.get(_fold(key))
        if name is None:
            continue  # Go ignores keys that name no field
        error = _assign(message, name, item)
        if error is not None and first_error is None:
            first_error = error
    if first_error is not None:
        raise GoError(400, first_error)
    return message


def _type_error(expected: str, got: Any, name: str) -> str:
    return f"Unmarshal type error: expected={expected}, got={_kind(got)}, field={name}, offset=0"


def _assign(message: Message, name: str, item: Any) -> str | None:
    if item is None:
        if name == "Extra":
            message.Extra = None
        return None  # null leaves a string (and the time) as it was
    if name == "timestamp":
        return _check_time(item)  # the value itself is overwritten by every handler
    if name != "Extra":
        if not isinstance(item, str):
            return _type_error("string", item, name)
        setattr(message, name, _go_str(item))
        return None
    if not isinstance(item, tuple):
        return _type_error("map[string][]interface {}", item, "Extra")
    if message.Extra is None:
        message.Extra = {}
    error = None
    for raw_key, values in item[1]:
        key = _go_str(raw_key)
        if values is None:
            message.Extra[key] = None
        elif isinstance(values, list):
            message.Extra[key] = [_plain(v) for v in values]
        elif error is None:
            error = _type_error("[]interface {}", values, "Extra")
    return error
