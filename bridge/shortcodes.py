"""Emoji shortcodes (``:smile:``, ``:+1:``) become emoji, as Matterbridge's
gateway turns them in every message's text (gateway/gateway.go
``modifyMessage``: ``emoji.ReplacePadding = ""; msg.Text =
emoji.Sprint(msg.Text)``, with kyokomi/emoji v2.2.11).

The scan is kyokomi's (emoji.go ``compile`` and ``replaseEmoji``), written
out without its recursion: from a ``:``, read up to the next ``:`` — a space
(Go's ``unicode.IsSpace``) or the end of the text first leaves it as it was;
``::`` leaves the first ``:`` and starts again at the second; a closing ``:``
that names no emoji is consumed with the rest (so in ``:nope:smile:``
nothing is replaced). ``:flag-xx:`` for any two lowercase letters gives the two regional
indicators.

The table is the ``emoji`` package's (Unicode's CLDR names and the GitHub
aliases kyokomi's table also comes from), plus the other spellings kyokomi's
generator adds for the same emoji: ``:flag_de:`` and ``:flag_Germany:`` for
flags, ``:name_tone1:`` … ``:name_tone5:`` for skin tones. What still differs
is said in the README ("Differences from Matterbridge").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from types import MappingProxyType

from emoji import EMOJI_DATA, STATUS

from bridge.goregex import GO_SPACE

_FLAG = re.compile(r":flag-([a-z]{2}):")
_TONES = ("\U0001f3fb", "\U0001f3fc", "\U0001f3fd", "\U0001f3fe", "\U0001f3ff")
_REGIONAL_A = 0x1F1E6


@functools.cache
def table() -> Mapping[str, str]:
    """Shortcode (with its colons) -> emoji; built once, on first use."""
    out: dict[str, str] = {}
    # fully-qualified first: a name shared with an unqualified form gets the qualified one
    ordered = sorted(EMOJI_DATA.items(), key=lambda item: item[1]["status"] != STATUS["fully_qualified"])
    for emoji, data in ordered:
        names = [data["en"], *data.get("alias", ())]
        for name in names:
            out.setdefault(name, emoji)
        if len(emoji) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in emoji):  # a country flag
            code = "".join(chr(ord(c) - _REGIONAL_A + ord("a")) for c in emoji)
            out.setdefault(f":flag_{code}:", emoji)
            out.setdefault(f":flag_{data['en'][1:]}", emoji)
        elif emoji.startswith("\U0001f3f4") and "\U000e007f" in emoji:  # England, Scotland, Wales
            out.setdefault(f":flag_{data['en'][1:]}", emoji)
    for emoji, data in ordered:  # skin tones by kyokomi's emojione-style names
        if data["status"] != STATUS["fully_qualified"]:
            continue
        base = emoji.replace("\ufe0f", "")
        for n, tone in enumerate(_TONES, 1):
            toned = _toned(emoji, base, tone)
            if toned is None:
                continue
            for name in (data["en"], *data.get("alias", ())):
                out.setdefault(f"{name[:-1]}_tone{n}:", toned)
    return MappingProxyType(out)


def _toned(emoji: str, base: str, tone: str) -> str | None:
    """The emoji with a skin tone after its first character, if Unicode has it."""
    for candidate in (base[:1] + tone + base[1:], emoji[:1] + tone + emoji[1:]):
        if candidate in EMOJI_DATA and candidate != emoji:
            return candidate
    return None


def _emojize(token: str) -> str:
    found = table().get(token)
    if found is not None:
        return found  # ReplacePadding = "": nothing after it
    flag = _FLAG.fullmatch(token)
    if flag:
        return "".join(chr(_REGIONAL_A + ord(c) - ord("a")) for c in flag.group(1))
    return token


def emojize(text: str) -> str:
    """kyokomi/emoji ``Sprint`` with an empty padding."""
    start = text.find(":")
    if start < 0:
        return text  # the common case: no work
    out = [text[:start]]
    i, n = start, len(text)
    while i < n:
        if text[i] != ":":
            nxt = text.find(":", i)
            stop = n if nxt < 0 else nxt
            out.append(text[i:stop])
            i = stop
            continue
        token = i  # the shortcode being read starts at this ':'
        i += 1
        while True:
            if i >= n:  # the end: as it was
                out.append(text[token:])
                break
            c = text[i]
            if c == ":" and i == token + 1:  # "::": the first stays, the second starts over
                out.append(":")
                token = i
                i += 1
                continue
            i += 1
            if c in GO_SPACE:
                out.append(text[token:i])
                break
            if c == ":":
                out.append(_emojize(text[token:i]))
                break
    return "".join(out)
