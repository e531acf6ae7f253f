"""Matterbridge parity, point 6 of issue 8: emoji shortcodes become emoji as
Matterbridge's gateway turns them (gateway/gateway.go @
4ab72acec656dafd304f88359b509b1f27c06604, ``modifyMessage``:
``emoji.ReplacePadding = ""; msg.Text = emoji.Sprint(msg.Text)``).

kyokomi/emoji v2.2.11 is the library (go.mod @
7e3a452701b09d8b10a2912d5c19628b3efa8edd); its scan is emoji.go ``compile``
and ``replaseEmoji`` (kyokomi/emoji @ e1592c07f599b02a22c2fce04bdd8669e7e9b148,
unchanged in v2), its table Matterbridge's vendored
vendor/github.com/kyokomi/emoji/v2/emoji_codemap.go @
b3be2e208cb373207d6199cac5a9fc92be073e7a, whose entries the spot checks below
are taken from.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.shortcodes import emojize


@pytest.mark.parametrize(
    "text, expected",
    [
        (":smile: :+1:", "\U0001f604 \U0001f44d"),
        ("no colon at all", "no colon at all"),
        ("12:30:00", "12:30:00"),  # ":30:" names nothing: left as it was
        (":smile", ":smile"),  # the end of the text before a closing colon
        (": smile:", ": smile:"),  # a space ends a shortcode
        ("::smile:", ":\U0001f604"),  # "::": the first stays, the second starts over
        ("::::", "::::"),
        (":nope:smile:", ":nope:smile:"),  # the closing colon of a miss is used up
        (":smile::+1:", "\U0001f604\U0001f44d"),
        (":flag-de: :flag-zz:", "\U0001f1e9\U0001f1ea \U0001f1ff\U0001f1ff"),  # any two letters
        (":Smile:", ":Smile:"),  # shortcodes are case-sensitive
        (":smile:\u00a0x", "\U0001f604\u00a0x"),
        (":a\u2003b:", ":a\u2003b:"),  # Go's unicode.IsSpace: an em space ends it too
    ],
)
def test_the_scan_is_kyokomis(text: str, expected: str) -> None:
    assert emojize(text) == expected


@pytest.mark.parametrize(
    "code, emoji",
    [
        (":+1:", "\U0001f44d"),
        (":1st_place_medal:", "\U0001f947"),
        (":Japanese_acceptable_button:", "\U0001f251"),
        (":Mrs._Claus:", "\U0001f936"),
        (":T-Rex:", "\U0001f996"),
        (":abacus:", "\U0001f9ee"),
        (":afghanistan:", "\U0001f1e6\U0001f1eb"),
        (":flag_af:", "\U0001f1e6\U0001f1eb"),
        (":flag_Afghanistan:", "\U0001f1e6\U0001f1eb"),
        (":adult_tone1:", "\U0001f9d1\U0001f3fb"),
        (":woman_teacher_tone3:", "\U0001f469\U0001f3fd\u200d\U0001f3eb"),
        (":writing_hand_tone1:", "\u270d\U0001f3fb"),
        (":woman’s_hat:", "\U0001f452"),
        (":yo-yo:", "\U0001fa80"),
        (":zipper-mouth_face:", "\U0001f910"),
        (":zombie_woman:", "\U0001f9df\u200d\u2640\ufe0f"),
        (":beans:", "\U0001fad8"),
    ],
)
def test_shortcodes_from_kyokomis_table(code: str, emoji: str) -> None:
    assert emojize(code) == emoji


def test_the_residual_differences_are_the_documented_ones() -> None:
    """What the README's "Differences from Matterbridge" says: names kyokomi
    has only from emojione's list stay text here; CLDR names that kyokomi maps
    without U+FE0F get the fully-qualified emoji here."""
    assert emojize(":atom:") == ":atom:"  # kyokomi: U+269B
    assert emojize(":A_button_(blood_type):") == "\U0001f170\ufe0f"  # kyokomi: U+1F170 alone


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(":smile+1 _-\u00a0\n\U0001f604ab"), max_size=40) | st.text(max_size=40))
def test_any_text_converts_without_an_error(text: str) -> None:
    out = emojize(text)
    assert isinstance(out, str)
    if ":" not in text:
        assert out == text
