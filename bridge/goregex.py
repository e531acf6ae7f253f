"""Go's ``regexp``, as Matterbridge's rules use it (``IgnoreNicks``,
``IgnoreMessages``, ``ReplaceMessages``, ``ReplaceNicks``).

Syntax and matching are RE2's: the ``google-re2`` package is RE2 itself, of
which Go's ``regexp`` is a port (``\\p{Lu}``, ``\\z``, ``[[:digit:]]``,
``(?U)``, ``\\Q…\\E``; leftmost-first; ``$`` only at the end of the text
without ``(?m)``). RE2 runs in time linear in the text, so no rule can hang
the router. Replacement is Go's ``Regexp.ReplaceAllString`` with
``Regexp.Expand``'s template rules, written out below from Go's
``src/regexp/regexp.go`` (``replaceAll``, ``expand``, ``extract``): RE2's own
rewrite and Python's ``re.sub`` differ from Go on ``$1x`` (the group named
``1x``), ``$$``, unknown groups (empty in Go) and empty matches (``x*`` over
``abd`` with ``-`` gives ``-a-b-d-``).

Where RE2 and Go still differ: RE2 accepts ``(?<name>…)`` (Go does from 1.22;
Matterbridge 1.26 was built with an older Go that refused it) and its Unicode
tables may be a release apart from Go's. ``\\C`` (any byte), which RE2 has and
Go refuses, is refused here as in Go: it could split a character.

Matching runs on UTF-8 bytes, as Go's does; callers encode a text once for
all of an account's rules (``encode``/``decode``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import re2

# Go's unicode.IsSpace (White_Space): strings.Fields splits on these.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
GO_SPACE = frozenset(_GO_SPACE)
_FIELDS = re.compile(f"[^{re.escape(_GO_SPACE)}]+")


def go_fields(text: str) -> list[str]:
    """Go's ``strings.Fields``: ``IgnoreNicks = "a b"`` is two patterns
    (Python's ``str.split`` also splits on the ASCII separators \\x1c-\\x1f)."""
    return _FIELDS.findall(text)


def encode(text: str) -> bytes:
    # surrogatepass: a lone surrogate cannot make a rule raise; it matches as Go's invalid UTF-8 would not
    return text.encode("utf-8", "surrogatepass")


def decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


class GoRegexError(ValueError):
    """A pattern Go's ``regexp.Compile`` refuses; the message is the reason."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern to stderr
    return options


@dataclass(frozen=True, slots=True)
class Template:
    """A replacement parsed once by Go's ``Expand`` rules: literal bytes and
    group references. A reference is the groups it may take its text from:
    Go takes the first *participating* group of that name, and a number names
    one group; an unknown name or number was dropped (it expands to nothing)."""

    parts: tuple[bytes | tuple[int, ...], ...]
    literal: bytes | None  # the whole replacement when it has no reference

    @classmethod
    def parse(cls, template: str, names: Sequence[str]) -> Template:
        """``names``: Go's ``SubexpNames`` (index 0 is the whole match, "")."""
        parts: list[bytes | tuple[int, ...]] = []
        text: list[str] = []
        for piece in _pieces(template):
            if isinstance(piece, str):
                text.append(piece)
                continue
            groups = piece.groups(names)
            if groups:
                if text:
                    parts.append(encode("".join(text)))
                    text = []
                parts.append(groups)
        tail = encode("".join(text))
        if tail:
            parts.append(tail)
        if all(isinstance(p, bytes) for p in parts):
            return cls(tuple(parts), b"".join(p for p in parts if isinstance(p, bytes)))
        return cls(tuple(parts), None)


@dataclass(frozen=True, slots=True)
class Reference:
    """A ``$name`` / ``${name}`` in a replacement."""

    written: str  # as in the replacement: "$1x", "${1}"
    name: str
    num: int  # -1: a name, not a number

    def groups(self, names: Sequence[str]) -> tuple[int, ...]:
        """The groups it takes its text from, first that matched; none: empty."""
        if self.num >= 0:
            return (self.num,) if self.num < len(names) else ()
        return tuple(i for i, n in enumerate(names) if n == self.name)


def _pieces(template: str) -> list[str | Reference]:
    """Go's ``expand`` loop: text and references, in order."""
    out: list[str | Reference] = []
    rest = template
    while rest:
        before, dollar, after = rest.partition("$")
        if not dollar:
            break
        out.append(before)
        rest = after
        if rest.startswith("$"):  # $$ is $
            out.append("$")
            rest = rest[1:]
            continue
        found = _extract(rest)
        if found is None:  # malformed: the $ is text
            out.append("$")
            continue
        name, num, after_name = found
        out.append(Reference("$" + rest[: len(rest) - len(after_name)], name, num))
        rest = after_name
    out.append(rest)
    return out


def unknown_references(template: str, regexp: GoRegexp) -> list[str]:
    """What a replacement refers to that its pattern lacks: valid Go (it
    expands to nothing), but most likely a mistake worth a warning."""
    notes = []
    for piece in _pieces(template):
        if isinstance(piece, str) or piece.groups(regexp.names):
            continue
        what = f"group {piece.num}" if piece.num >= 0 else f"no group named {piece.name!r}"
        note = f"{piece.written} expands to nothing: {regexp.pattern!r} has " + (
            f"no {what}" if piece.num >= 0 else what
        )
        digits = len(piece.name) - len(piece.name.lstrip("0123456789"))
        if piece.num < 0 and 0 < digits < len(piece.name) and int(piece.name[:digits]) < len(regexp.names):
            note += f" (Go reads ${piece.name} as one name; for group {piece.name[:digits]} then "
            note += f"{piece.name[digits:]!r} write ${{{piece.name[:digits]}}}{piece.name[digits:]})"
        notes.append(note)
    return notes


def _extract(text: str) -> tuple[str, int, str] | None:
    """Go's ``extract``: the name of a leading ``name`` or ``{name}`` (the $
    already taken), its number (-1 when not a number) and what follows."""
    brace = text.startswith("{")
    body = text[1:] if brace else text
    i = 0
    # unicode.IsLetter (category L*), unicode.IsDigit (Nd), '_'
    while i < len(body) and (body[i].isalpha() or body[i].isdecimal() or body[i] == "_"):
        i += 1
    if i == 0:
        return None
    name = body[:i]
    if brace:
        if i >= len(body) or body[i] != "}":
            return None
        i += 1
    num = 0
    for ch in name:
        if not "0" <= ch <= "9" or num >= 100_000_000:
            num = -1
            break
        num = num * 10 + ord(ch) - 48
    if name[0] == "0" and len(name) > 1:  # no leading zeros
        num = -1
    return name, num, body[i:]


@dataclass(frozen=True, slots=True, eq=False)
class GoRegexp:
    """One compiled rule pattern."""

    pattern: str
    _re: Any  # re2's compiled pattern (the package ships no type hints)
    names: tuple[str, ...]  # Go's SubexpNames

    @classmethod
    def compile(cls, pattern: str) -> GoRegexp:
        names = _capture_names(pattern)
        try:
            compiled = re2.compile(encode(pattern), _options())
        except re2.error as exc:
            raise GoRegexError(_reason(exc)) from None
        if len(names) != compiled.groups + 1:  # our scan misread the pattern: trust RE2's names
            by_index = {index: name.decode() for name, index in compiled.groupindex.items()}
            names = ["", *(by_index.get(i, "") for i in range(1, compiled.groups + 1))]
        return cls(pattern, compiled, tuple(names))

    def template(self, replacement: str) -> Template:
        return Template.parse(replacement, self.names)

    def search(self, data: bytes) -> bool:
        """Go's ``MatchString``."""
        return self._re.search(data) is not None

    def replace_all(self, src: bytes, template: Template) -> bytes:
        """Go's ``ReplaceAllString`` (regexp.go ``replaceAll``), on UTF-8."""
        search = self._re.search
        end = len(src)
        last = 0  # end of the most recent match
        pos = 0  # where the next search starts
        out: list[bytes] = []
        while pos <= end:
            m = search(src, pos)
            if m is None:
                break
            start, stop = m.span()
            out.append(src[last:start])
            # no replacement for an empty match right after a match
            if stop > last or start == 0:
                if template.literal is not None:
                    out.append(template.literal)
                else:
                    out.extend(_expand(template, m, src))
            last = stop
            width = _rune_width(src, pos)  # always advance at least one character
            if pos + width > stop:
                pos += width
            elif pos + 1 > stop:
                pos += 1  # at the end of the input, where the width is 0
            else:
                pos = stop
        out.append(src[last:])
        return b"".join(out)


def _expand(template: Template, m: Any, src: bytes) -> list[bytes]:
    out: list[bytes] = []
    for part in template.parts:
        if isinstance(part, bytes):
            out.append(part)
            continue
        for group in part:
            start, stop = m.span(group)
            if start >= 0:
                out.append(src[start:stop])
                break
    return out


def _rune_width(data: bytes, pos: int) -> int:
    """utf8.DecodeRune's width at ``pos`` (0 at the end, 1 for a stray byte)."""
    if pos >= len(data):
        return 0
    lead = data[pos]
    if lead < 0xC0:
        return 1
    return 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def _reason(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _capture_names(pattern: str) -> list[str]:
    """Go's ``SubexpNames`` read off the pattern (RE2 keeps only the first
    group of a repeated name; Go keeps them all and ``Expand`` takes the first
    that matched). Refuses ``\\C`` as Go does. What RE2 refuses anyway needs
    no care here: RE2 is asked next."""
    names = [""]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt == "Q":  # literal text up to \E
                close = pattern.find("\\E", i + 2)
                i = n if close < 0 else close + 2
                continue
            if nxt == "C":
                raise GoRegexError("invalid escape sequence: \\C")
            i += 2
        elif c == "[":
            i = _class_end(pattern, i)
        elif c == "(":
            named = 4 if pattern.startswith("(?P<", i) else 3 if pattern.startswith("(?<", i) else 0
            if named and pattern[i + named : i + named + 1] not in ("=", "!"):
                close = pattern.find(">", i + named)
                if close < 0:
                    return names
                names.append(pattern[i + named : close])
                i = close + 1
                continue
            if not pattern.startswith("(?", i):
                names.append("")
            i += 1
        else:
            i += 1
    return names


def _class_end(pattern: str, i: int) -> int:
    """Past the ``]`` closing the class opened at ``i`` (Go's parseClass: a
    ``]`` first in the class is a member, ``[:name:]`` is one item)."""
    j = i + 1
    if pattern.startswith("^", j):
        j += 1
    first = True
    while j < len(pattern):
        c = pattern[j]
        if c == "]" and not first:
            return j + 1
        first = False
        if c == "\\":
            if pattern.startswith("C", j + 1):
                raise GoRegexError("invalid escape sequence: \\C")
            j += 2
        elif pattern.startswith("[:", j) and (close := pattern.find(":]", j + 2)) >= 0:
            j = close + 2
        else:
            j += 1
    return len(pattern)
