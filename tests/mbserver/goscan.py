"""Go's encoding/json scanner (src/encoding/json/scanner.go, stream.go,
decode.go, Go 1.20) as ``json.Decoder.Decode`` meets a request body: the
first value is read; a byte that cannot continue it is a SyntaxError
``invalid character 'x' <context>`` at the offset of the bytes read so far
(that byte included, leading whitespace too); the body ending inside the
value is ``unexpected EOF`` (io.ErrUnexpectedEOF), an empty or blank body
``EOF``; what follows a complete value is never read. Strings are unquoted
as Go does (an invalid UTF-8 byte or a lone surrogate escape is U+FFFD).

Nodes keep the offsets decode.go puts in an UnmarshalTypeError: for an
array or object the offset just past its ``[``/``{`` (``d.off``), for a
literal the offset just past it (``d.readIndex()``).

Limit: nesting deeper than ``MAX_DEPTH`` here (Python's recursion) is
refused as ``exceeded max depth``; Go allows 10,000 levels.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 400
SPACE = b" \t\r\n"


def _go_replace(exc: UnicodeError) -> tuple[str, int]:
    """utf8.DecodeRune: each invalid byte is one U+FFFD."""
    assert isinstance(exc, UnicodeDecodeError)
    return "\ufffd", exc.start + 1


codecs.register_error("go-replace", _go_replace)


class SyntaxErr(Exception):
    def __init__(self, msg: str, offset: int) -> None:
        super().__init__(msg)
        self.msg = msg
        self.offset = offset


class UnexpectedEOF(Exception):
    pass


@dataclass
class Node:
    kind: str  # object, array, string, number, bool, null
    value: Any  # [(key, Node)], [Node], str, the number's text, bool, None
    off: int


def quote_char(c: int) -> str:
    """scanner.go quoteChar."""
    if c == ord("'"):
        return "'\\''"
    if c == ord('"'):
        return "'\"'"
    char = chr(c)
    if char.isprintable():
        return f"'{char}'"
    if c < 0x20 or c == 0x7F:
        named = {0x07: "\\a", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x0B: "\\v"}
        return "'" + named.get(c, f"\\x{c:02x}") + "'"
    return f"'\\u{c:04x}'"


class Scanner:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0

    def fail(self, context: str) -> SyntaxErr:
        return SyntaxErr(f"invalid character {quote_char(self.data[self.i])} {context}", self.i + 1)

    def peek(self) -> int:
        if self.i >= len(self.data):
            raise UnexpectedEOF
        return self.data[self.i]

    def space(self) -> None:
        while self.i < len(self.data) and self.data[self.i] in SPACE:
            self.i += 1

    def value(self, depth: int = 0) -> Node:
        self.space()
        c = self.peek()
        if c in b"{[" and depth >= MAX_DEPTH:
            raise SyntaxErr("exceeded max depth", self.i + 1)
        if c == ord("{"):
            return self.object(depth + 1)
        if c == ord("["):
            return self.array(depth + 1)
        if c == ord('"'):
            return Node("string", self.string(), self.i)
        if c == ord("-") or ord("0") <= c <= ord("9"):
            return self.number()
        for word, kind, value in ((b"true", "bool", True), (b"false", "bool", False), (b"null", "null", None)):
            if c == word[0]:
                self.literal(word)
                return Node(kind, value, self.i)
        raise self.fail("looking for beginning of value")

    def object(self, depth: int) -> Node:
        self.i += 1
        node = Node("object", [], self.i)
        self.space()
        if self.peek() == ord("}"):
            self.i += 1
            return node
        while True:
            if self.peek() != ord('"'):
                raise self.fail("looking for beginning of object key string")
            key = self.string()
            self.space()
            if self.peek() != ord(":"):
                raise self.fail("after object key")
            self.i += 1
            node.value.append((key, self.value(depth)))
            self.space()
            c = self.peek()
            if c == ord("}"):
                self.i += 1
                return node
            if c != ord(","):
                raise self.fail("after object key:value pair")
            self.i += 1
            self.space()

    def array(self, depth: int) -> Node:
        self.i += 1
        node = Node("array", [], self.i)
        self.space()
        if self.peek() == ord("]"):
            self.i += 1
            return node
        while True:
            node.value.append(self.value(depth))
            self.space()
            c = self.peek()
            if c == ord("]"):
                self.i += 1
                return node
            if c != ord(","):
                raise self.fail("after array element")
            self.i += 1

    def string(self) -> str:
        self.i += 1
        start = self.i
        while True:
            c = self.peek()
            if c == ord('"'):
                raw = self.data[start : self.i]
                self.i += 1
                return unquote(raw)
            if c == ord("\\"):
                self.i += 1
                e = self.peek()
                if e == ord("u"):
                    self.i += 1
                    for _ in range(4):
                        if self.peek() not in b"0123456789abcdefABCDEF":
                            raise self.fail("in \\u hexadecimal character escape")
                        self.i += 1
                    continue
                if e not in b'bfnrt\\/"':
                    raise self.fail("in string escape code")
            elif c < 0x20:
                raise self.fail("in string literal")
            self.i += 1

    def digits(self) -> None:
        while self.i < len(self.data) and self.data[self.i] in b"0123456789":
            self.i += 1

    def number(self) -> Node:
        start = self.i
        if self.data[self.i] == ord("-"):
            self.i += 1
            if not ord("0") <= self.peek() <= ord("9"):
                raise self.fail("in numeric literal")
        if self.data[self.i] == ord("0"):
            self.i += 1
        else:
            self.digits()
        if self.i < len(self.data) and self.data[self.i] == ord("."):
            self.i += 1
            if not ord("0") <= self.peek() <= ord("9"):
                raise self.fail("after decimal point in numeric literal")
            self.digits()
        if self.i < len(self.data) and self.data[self.i] in b"eE":
            self.i += 1
            if self.peek() in b"+-":
                self.i += 1
            if not ord("0") <= self.peek() <= ord("9"):
                raise self.fail("in exponent of numeric literal")
            self.digits()
        return Node("number", self.data[start : self.i].decode(), self.i)

    def literal(self, word: bytes) -> None:
        self.i += 1
        for expected in word[1:]:
            if self.peek() != expected:
                name = word.decode()
                raise self.fail(f"in literal {name} (expecting {quote_char(expected)})")
            self.i += 1


_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "\\": "\\", "/": "/", '"': '"'}


def unquote(raw: bytes) -> str:
    """decode.go unquoteBytes: escapes, surrogate pairs; a lone surrogate and
    each invalid UTF-8 byte become U+FFFD."""
    text = raw.decode("utf-8", "go-replace")
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        e = text[i + 1]
        if e != "u":
            out.append(_ESCAPES[e])
            i += 2
            continue
        code = int(text[i + 2 : i + 6], 16)
        i += 6
        if 0xD800 <= code < 0xDC00 and text[i : i + 2] == "\\u":
            low = int(text[i + 2 : i + 6], 16)
            if 0xDC00 <= low < 0xE000:
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                i += 6
                continue
        out.append("\ufffd" if 0xD800 <= code < 0xE000 else chr(code))
    return "".join(out)


def decode_first(data: bytes) -> Node:
    """Decoder.Decode's first value; raise SyntaxErr, UnexpectedEOF, or
    EOFError for a blank body."""
    scanner = Scanner(data)
    scanner.space()
    if scanner.i == len(data):
        raise EOFError
    return scanner.value()


def decode_whole(data: bytes) -> Node:
    """json.Unmarshal: the whole text is one value (checkValid first)."""
    scanner = Scanner(data)
    node = scanner.value()
    scanner.space()
    if scanner.i < len(data):
        raise scanner.fail("after top-level value")
    return node
