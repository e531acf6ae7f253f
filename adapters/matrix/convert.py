"""Matrix message formats <-> the Markdown talkbridge carries.

Inbound, a Matrix ``formatted_body`` (``org.matrix.custom.html``) becomes
Markdown that Talk renders (``html_to_markdown``); the reply fallback
(``<mx-reply>``) is dropped. Outbound, Markdown becomes the HTML Matrix
clients render (``markdown_to_html``), or None when the text has no
formatting (the event then carries ``body`` only, as Matterbridge does).

Both are total: any input gives a string (or None), never an exception,
and ``markdown_to_html`` escapes everything it does not produce itself, so
no text can inject markup.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

# -- HTML -> Markdown ---------------------------------------------------------------

_INLINE = {"b": "**", "strong": "**", "i": "_", "em": "_", "del": "~~", "s": "~~", "strike": "~~"}
_BLOCKS = {"p", "div", "ul", "ol", "table", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "details"}
_SKIP = {"mx-reply", "script", "style", "head", "title"}
_VOID = {"br", "hr", "img", "area", "base", "col", "embed", "input", "link", "meta", "source", "track", "wbr"}
MAX_DEPTH = 64  # nesting beyond this is treated as text: a hostile body cannot blow the stack

_CLOSING_FENCE = re.compile(r"```+[ \t]*")


class _ToMarkdown(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.stack: list[tuple[str, int, str]] = []  # tag, where its output starts, what closes it
        self.skip = 0  # inside <mx-reply> and the like
        self.pre = 0
        self.lists: list[list[int]] = []  # one counter per open list; [-1] for <ul>

    # helpers
    def _newline(self, blank: bool = False) -> None:
        text = "".join(self.out)
        if not text:
            return
        want = "\n\n" if blank else "\n"
        tail = len(text) - len(text.rstrip("\n"))
        if tail < len(want):
            self.out.append("\n" * (len(want) - tail))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            self.handle_startendtag(tag, attrs)
            return
        if self.skip or tag in _SKIP:
            self.skip += 1
            self.stack.append((tag, len(self.out), ""))
            return
        if len(self.stack) >= MAX_DEPTH:
            self.stack.append((tag, len(self.out), ""))
            return
        close = ""
        a = dict(attrs)
        if tag in _INLINE and not self.pre:
            self.out.append(_INLINE[tag])
            close = _INLINE[tag]
        elif tag == "code" and not self.pre:
            self.out.append("`")
            close = "`"
        elif tag == "pre":
            self._newline()
            self.out.append("```\n")
            self.pre += 1
            close = "\n```\n"
        elif tag == "a":
            close = "\x00a" + (a.get("href") or "")
        elif tag == "blockquote":
            self._newline()
            close = "\x00q"
        elif tag in ("ul", "ol"):
            self._newline()
            self.lists.append([-1] if tag == "ul" else [_int(a.get("start"), 1)])
            close = "\x00l"
        elif tag == "li":
            self._newline()
            depth = max(0, len(self.lists) - 1)
            counter = self.lists[-1] if self.lists else [-1]
            if counter[0] < 0:
                self.out.append("  " * depth + "- ")
            else:
                self.out.append("  " * depth + f"{counter[0]}. ")
                counter[0] += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self._newline(blank=True)
            self.out.append("#" * int(tag[1]) + " ")
            close = "\x00b"
        elif tag in _BLOCKS:
            self._newline(blank=tag == "p")
            close = "\x00b"
        self.stack.append((tag, len(self.out), close))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip:
            return
        if tag == "br":
            self.out.append("\n")
        elif tag == "hr":
            self._newline()
            self.out.append("---\n")
        elif tag == "img":
            a = dict(attrs)
            self.out.append(a.get("alt") or a.get("title") or "")

    def handle_endtag(self, tag: str) -> None:
        # close up to the matching open tag (HTML in the wild is not always balanced)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                while len(self.stack) > i:
                    self._close(*self.stack.pop())
                return

    def _close(self, tag: str, start: int, close: str) -> None:
        if self.skip:
            self.skip -= 1
            if self.skip == 0:
                del self.out[start:]
            return
        if not close:
            return
        if close.startswith("\x00a"):
            href = close[2:]
            text = "".join(self.out[start:])
            if href and text.strip() and text != href and _safe_url(href):
                self.out[start:] = ["[", text, "](", href, ")"]
        elif close == "\x00q":
            text = "".join(self.out[start:]).strip("\n")
            self.out[start:] = ["\n".join("> " + line if line else ">" for line in text.split("\n")), "\n"]
        elif close == "\x00l":
            if self.lists:
                self.lists.pop()
            self._newline()
        elif close == "\x00b":
            self._newline(blank=tag != "tr")
        else:
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
                text = "".join(self.out[start:])
                if text.endswith("\n"):
                    self.out[start:] = [text.rstrip("\n")]
            if "".join(self.out[start:]).strip() == "" and close != "\n```\n":
                del self.out[start - 1 : start]  # an empty <b></b>: drop the opening marker
                return
            self.out.append(close)

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(data)

    def finish(self) -> str:
        self.close()
        while self.stack:
            self._close(*self.stack.pop())
        text = "".join(self.out)
        return re.sub(r"\n{3,}", "\n\n", text).strip()


def _int(value: str | None, default: int) -> int:
    try:
        return max(0, min(int(value or default), 1_000_000))
    except ValueError:
        return default


def _safe_url(url: str) -> bool:
    return url.startswith(("http://", "https://", "mailto:", "matrix:")) and not any(c.isspace() for c in url)


def html_to_markdown(body: str) -> str:
    """A ``formatted_body`` as Markdown: emphasis, code, links, quotes, lists
    and headings kept; the reply fallback and unknown markup dropped."""
    parser = _ToMarkdown()
    try:
        parser.feed(body)
        return parser.finish()
    except (AssertionError, ValueError, IndexError, RecursionError):  # html.parser on hostile input
        return re.sub(r"<[^>]*>", "", body).strip()


# -- Markdown -> HTML ---------------------------------------------------------------

_SPAN = re.compile(
    r"`(?P<code>[^`\n]+)`"
    r"|\*\*(?=\S)(?P<bold>.+?)(?<=\S)\*\*"
    r"|~~(?=\S)(?P<strike>.+?)(?<=\S)~~"
    r"|(?<![\w*])\*(?=[^\s*])(?P<em>[^*\n]+?)(?<=[^\s*])\*(?![\w*])"
    r"|(?<![\w_])_(?=[^\s_])(?P<em2>[^_\n]+?)(?<=[^\s_])_(?![\w_])"
    r"|\[(?P<label>[^\]\n]+)\]\((?P<url>(?:https?://|mailto:)[^\s()<>\"]+)\)"
)


def _inline(escaped: str, depth: int = 0) -> str:
    if depth > 8:
        return escaped

    def one(m: re.Match[str]) -> str:
        if m["code"] is not None:
            return f"<code>{m['code']}</code>"
        if m["bold"] is not None:
            return f"<strong>{_inline(m['bold'], depth + 1)}</strong>"
        if m["strike"] is not None:
            return f"<del>{_inline(m['strike'], depth + 1)}</del>"
        if m["em"] is not None or m["em2"] is not None:
            return f"<em>{_inline(m['em'] or m['em2'], depth + 1)}</em>"
        return f'<a href="{m["url"]}">{_inline(m["label"], depth + 1)}</a>'

    return _SPAN.sub(one, escaped)


def markdown_to_html(text: str) -> str | None:
    """Markdown (the subset chat clients write: emphasis, strike, code spans
    and fenced blocks, links, quotes) as Matrix HTML; None when the text has
    no formatting, so the event carries only ``body``."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    quote: list[str] = []

    def flush_quote() -> None:
        if quote:
            out.append("<blockquote>" + "<br>".join(quote) + "</blockquote>")
            quote.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            # a closing fence is backticks alone (CommonMark): "```bar" opens no block's end,
            # so no word after it is lost with the fence line
            end = next((j for j in range(i + 1, len(lines)) if _CLOSING_FENCE.fullmatch(lines[j])), None)
            if end is not None:
                flush_quote()
                lang = line[3:].strip()
                code = html.escape("\n".join(lines[i + 1 : end]))
                cls = f' class="language-{html.escape(lang)}"' if re.fullmatch(r"[\w+-]{1,32}", lang) else ""
                out.append(f"<pre><code{cls}>{code}\n</code></pre>")
                i = end + 1
                continue
        if line.startswith(">"):
            quote.append(_inline(html.escape(line[1:].removeprefix(" "))))
            i += 1
            continue
        flush_quote()
        out.append(_inline(html.escape(line)))
        i += 1
    flush_quote()
    # join lines with <br>, but not around block elements
    result = ""
    for n, piece in enumerate(out):
        blocks = ("<pre>", "<blockquote>")
        if n and not piece.startswith(blocks) and not out[n - 1].startswith(blocks):
            result += "<br>"
        result += piece
    plain = "<br>".join(html.escape(line) for line in lines)
    return None if result == plain else result
