"""Hypothesis properties over the Matrix adapter's parsers: a raw event ->
the normalized one, HTML -> Markdown, Markdown -> HTML, image headers."""

from __future__ import annotations

import html
import re
import struct
from html.parser import HTMLParser
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.matrix.convert import html_to_markdown, markdown_to_html
from adapters.matrix.media import image_size
from adapters.matrix.parse import MAX_TEXT, Incoming, Skip, parse_event, strip_reply_fallback
from bridge.events import EventKind

ME = "@bot:test.local"
WORD = r"[^\W_]+"  # letters and digits: the markers (_ * ~) are not words
json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=12), inner, max_size=4), max_leaves=20)  # fmt: skip
keys = st.sampled_from(["type", "event_id", "sender", "content", "redacts", "state_key", "origin_server_ts",
                        "unsigned", "body", "msgtype", "m.relates_to", "m.new_content", "url", "info", "format",
                        "formatted_body", "rel_type", "key", "m.in_reply_to", "filename"])  # fmt: skip
likely = st.sampled_from(["m.room.message", "m.reaction", "m.room.redaction", "m.room.encrypted", "m.text",
                          "m.image", "m.notice", "m.emote", "m.replace", "m.annotation", "$ev:x", "@a:x", ME,
                          "mxc://x/abc", "org.matrix.custom.html", "<b>x</b>", ""])  # fmt: skip
event_like = st.recursive(
    json_leaf | likely,
    lambda inner: st.dictionaries(keys | st.text(max_size=8), inner, max_size=6) | st.lists(inner, max_size=3),
    max_leaves=30,
)


@given(event_like)
@settings(max_examples=400)
def test_any_event_parses_or_is_skipped(source: Any) -> None:
    result = parse_event(source, ME)
    assert isinstance(result, Incoming | Skip)
    if isinstance(result, Incoming):
        assert result.event_id.startswith("$") and result.sender.startswith("@") and result.sender != ME
        assert len(result.text) <= 4 * MAX_TEXT
        if result.kind in (EventKind.EDIT, EventKind.DELETE, EventKind.REACTION):
            assert result.target_id and result.target_id.startswith("$")


@given(
    body=st.text(max_size=200),
    msgtype=st.sampled_from(["m.text", "m.notice", "m.emote"]),
    sender=st.from_regex(r"@[a-z]{1,8}:[a-z]{1,8}\.local", fullmatch=True),
)
def test_a_plain_text_message_keeps_its_body(body: str, msgtype: str, sender: str) -> None:
    source = {"type": "m.room.message", "event_id": "$e", "sender": sender, "origin_server_ts": 1,
              "content": {"msgtype": msgtype, "body": body}}  # fmt: skip
    result = parse_event(source, ME)
    assert isinstance(result, Incoming)
    assert (result.kind, result.text, result.msgtype, result.sender) == (EventKind.MESSAGE, body, msgtype, sender)
    assert isinstance(parse_event(source, sender), Skip)  # our own: never relayed


@given(st.text(max_size=100), st.text(max_size=100))
def test_an_edit_carries_the_new_content_and_its_target(old: str, new: str) -> None:
    source = {"type": "m.room.message", "event_id": "$e", "sender": "@a:x",
              "content": {"msgtype": "m.text", "body": "* " + old, "m.new_content": {"msgtype": "m.text", "body": new},
                          "m.relates_to": {"rel_type": "m.replace", "event_id": "$t"}}}  # fmt: skip
    result = parse_event(source, ME)
    assert isinstance(result, Incoming)
    assert (result.kind, result.text, result.target_id) == (EventKind.EDIT, new, "$t")


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=20), max_size=4),
       st.text(max_size=100))  # fmt: skip
def test_the_reply_fallback_is_stripped(quoted: list[str], answer: str) -> None:
    fallback = "\n".join("> " + line for line in ["<@a:x> q", *quoted])
    assert strip_reply_fallback(f"{fallback}\n\n{answer}") == answer
    if not answer.startswith("> "):
        assert strip_reply_fallback(answer) == answer


@given(st.text(max_size=300))
@settings(max_examples=300)
def test_html_to_markdown_is_total(body: str) -> None:
    assert isinstance(html_to_markdown(body), str)


tags = st.sampled_from(["b", "strong", "i", "em", "del", "code", "pre", "p", "div", "blockquote", "ul", "ol", "li",
                        "h1", "h3", "a", "span", "mx-reply", "font", "table", "tr", "td"])  # fmt: skip
fragment = st.recursive(
    # no "." in the text: every "N." at a line's start in the Markdown is then an ordered list's marker
    st.text(alphabet=st.characters(blacklist_characters="<>&."), max_size=15),
    lambda inner: (
        st.builds(lambda t, c: f"<{t}>{c}</{t}>", tags, inner)
        | st.lists(inner, max_size=3).map("".join)
        | st.builds(lambda c: f"{c}<br>", inner)
    ),
    max_leaves=15,
)


@given(fragment)
@settings(max_examples=300)
def test_html_to_markdown_keeps_the_words_outside_the_reply_fallback(body: str) -> None:
    md = html_to_markdown(body)
    without_reply = re.sub(r"<mx-reply>.*?</mx-reply>", "", body, flags=re.S) if "<mx-reply>" in body else body
    if "<mx-reply>" in without_reply:
        return  # nested fallbacks: the outer one goes, with what it holds
    words = re.findall(WORD, re.sub(r"<[^>]*>", "", without_reply))
    numbered = re.sub(r"(?m)^ *\d+\.(?= |$)", "", md)  # an <ol>'s item numbers are the Markdown's, not words
    assert "".join(re.findall(WORD, numbered)) == "".join(words)


@given(st.text(alphabet=st.characters(blacklist_characters="<>&\r"), max_size=100))
def test_escaped_text_comes_back_as_it_was(text: str) -> None:
    assert html_to_markdown(html.escape(text, quote=False)) == text.strip()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.seen: set[str] = set()
        self.text: list[str] = []
        self.balanced = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.add(tag)
        if tag != "br":
            self.stack.append(tag)
        href = dict(attrs).get("href")
        if href:
            self.text.append(" " + href + " ")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.balanced = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)


md_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["*", "**", "_", "~~", "`", "```", "[", "](", "https://x.org/a", ")", "> ", "\n", "<", "&", '"']
)


@given(st.lists(md_text, max_size=12).map("".join))
@settings(max_examples=400)
def test_markdown_to_html_is_safe_balanced_and_loses_no_word(text: str) -> None:
    out = markdown_to_html(text)
    if out is None:
        return
    parser = _Tags()
    parser.feed(out)
    parser.close()
    assert parser.seen <= {"strong", "em", "del", "code", "pre", "a", "blockquote", "br"}
    assert parser.balanced and not parser.stack
    assert "".join(re.findall(WORD, "".join(parser.text))) == "".join(re.findall(WORD, fence_info_dropped(text)))


def fence_info_dropped(text: str) -> str:
    """The text without its fenced blocks' info strings (```python): the
    language goes into the code element's class, not into the text."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if re.fullmatch(r"```+[ \t]*", lines[j])), None)
            if end is not None:
                out += ["```", *lines[i + 1 : end + 1]]
                i = end + 1
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


@given(st.text(alphabet=st.characters(blacklist_characters="*_~`[]>\n<&\"'", codec="utf-8"), max_size=80))
def test_text_without_markup_has_no_formatted_body(text: str) -> None:
    assert markdown_to_html(text) is None


@given(st.binary(max_size=64))
def test_image_size_is_total(data: bytes) -> None:
    size = image_size(data)
    assert size is None or (0 < size[0] <= 65536 and 0 < size[1] <= 65536)


@given(st.integers(1, 65535), st.integers(1, 65535))
def test_image_size_reads_png_and_gif(w: int, h: int) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + struct.pack(">II", w, h) + b"\x08\x02\x00\x00\x00"
    assert image_size(png) == (w, h)
    assert image_size(b"GIF89a" + struct.pack("<HH", w, h)) == (w, h)
    jpeg = b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", h, w) + b"\x03"
    assert image_size(jpeg) == (w, h)
