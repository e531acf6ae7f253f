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

The scanner is goscan.py (Go's messages and offsets). Limits: the parse
error of a bad ``timestamp`` is shortened after "cannot parse"; a type
error inside ``Extra`` names the field ``Extra`` (decode.go pushes struct
fields, not map keys, on its FieldStack).
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

from tests.mbserver.goscan import Node, SyntaxErr, UnexpectedEOF, decode_first, decode_whole

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


def _fold(key: str) -> str:
    # Go's foldName: ASCII case, and the Kelvin sign and long s fold to k and s
    return key.translate({0x212A: "k", 0x17F: "s"}).lower()


_BY_FOLD = {_fold(name): name for name in MESSAGE_FIELDS}
_KIND = {"object": "object", "array": "array", "string": "string", "number": "number", "bool": "bool"}


class _Saved:
    """decode.go's savedError: the first type error, kept while decoding goes on."""

    def __init__(self) -> None:
        self.error: str | None = None

    def save(self, error: str) -> None:
        if self.error is None:
            self.error = error


def _type_error(expected: str, node: Node, field: str) -> str:
    return f"Unmarshal type error: expected={expected}, got={_KIND[node.kind]}, field={field}, offset={node.off}"


def _interface(node: Node, saved: _Saved) -> Any:
    """A value into interface{}: objects are map[string]interface{} (a
    repeated key: the last wins), numbers float64 (convertNumber)."""
    if node.kind == "object":
        return {key: _interface(item, saved) for key, item in node.value}
    if node.kind == "array":
        return [_interface(item, saved) for item in node.value]
    if node.kind == "number":
        number = float(node.value)
        if math.isinf(number):
            saved.save(f"Unmarshal type error: expected=float64, got=number {node.value}, field=Extra, "
                       f"offset={node.off + 1}")  # fmt: skip
            return None
        return number
    return node.value


_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})\Z")


def _time_error(node: Node) -> str | None:
    """time.Time.UnmarshalJSON (Go 1.20): null is nothing; else a string in
    RFC 3339 with its fields in range. Returns the error text (the parse
    error's wording is shortened), or None."""
    if node.kind == "null":
        return None
    if node.kind != "string":
        return "Time.UnmarshalJSON: input is not a JSON string"
    m = _RFC3339.match(node.value)
    if m:
        try:
            datetime(*(int(m.group(i)) for i in range(1, 7)))
            return None
        except ValueError:
            pass
    return f'parsing time "{node.value}" as "2006-01-02T15:04:05Z07:00": cannot parse'


def decode_message(raw: bytes, message: Message | None = None, *, stream: bool = True) -> Message:
    """Read ``raw`` into a config.Message as echo's Bind does (``stream``: a
    json.Decoder, the first value only) or melody's handler (json.Unmarshal:
    the whole text); raise GoError (400) worded as echo's
    DefaultJSONSerializer.Deserialize and BindBody word it."""
    message = message if message is not None else Message()
    try:
        node = decode_first(raw) if stream else decode_whole(raw)
    except EOFError:
        raise GoError(400, "EOF") from None
    except UnexpectedEOF:
        raise GoError(400, "unexpected EOF" if stream else "unexpected end of JSON input") from None
    except SyntaxErr as exc:
        raise GoError(400, f"Syntax error: offset={exc.offset}, error={exc.msg}") from None
    if node.kind == "null":
        return message  # null into a struct: nothing
    if node.kind != "object":
        raise GoError(400, _type_error("config.Message", node, ""))
    saved = _Saved()
    for key, item in node.value:
        name = key if key in MESSAGE_FIELDS else _BY_FOLD.get(_fold(key))
        if name is None:
            continue  # Go ignores keys that name no field
        if name == "timestamp":
            error = _time_error(item)
            if error is not None:
                raise GoError(400, error)  # an Unmarshaler's error ends decoding at once
        elif item.kind == "null":
            if name == "Extra":
                message.Extra = None
        elif name != "Extra":
            if item.kind == "string":
                setattr(message, name, item.value)
            else:
                saved.save(_type_error("string", item, name))
        elif item.kind != "object":
            saved.save(_type_error("map[string][]interface {}", item, "Extra"))
        else:
            if message.Extra is None:
                message.Extra = {}
            for extra_key, values in item.value:
                if values.kind == "null":
                    message.Extra[extra_key] = None
                elif values.kind == "array":
                    message.Extra[extra_key] = [_interface(v, saved) for v in values.value]
                else:
                    saved.save(_type_error("[]interface {}", values, "Extra"))
    if saved.error is not None:
        raise GoError(400, saved.error)
    return message
