"""Instagram links in a message: which post, reel, IGTV video or profile they name.

``find_targets(text)`` is run by the daemon's route loop on every message of a
room with previews enabled, so it is a plain function over one compiled
regular expression (no I/O, no state) and bounded: at most
``MAX_TARGETS`` links per message are previewed, the first ones, each once.

What counts as a link (seed 004: posts, reels, IGTV, profiles):

- hosts ``instagram.com``, ``www.``/``m.instagram.com`` and ``instagr.am``, with
  or without ``https://`` or ``http://``; any case;
- ``/p/CODE``, ``/reel/CODE``, ``/reels/CODE``, ``/tv/CODE``, also behind a
  username (``/natgeo/p/CODE``, as Instagram's own share links have them);
- ``/USERNAME`` alone: a profile; the site's own paths (``/explore``,
  ``/accounts`` ...) are not usernames;
- ``/stories/USERNAME/...``: recognised so the room gets a clear "not
  supported" instead of silence (yt-dlp cannot read stories without a login);
- query strings and fragments are ignored, and so is trailing punctuation.

A link must start a word: one inside another URL (``https://x.example/?u=
https://instagram.com/p/CODE``) is somebody else's link, not an Instagram one.

Nothing here is ever fetched: the worker fetches the canonical URL built from
the shortcode or username (``Target.url``), never the text the user wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["post", "reel", "tv", "profile", "story"]

MAX_TARGETS = 5  # links previewed from one message: a pasted list is not a flood of jobs

# First path segments that are Instagram's own pages, not usernames.
RESERVED = frozenset(
    """p reel reels tv stories explore accounts about developer developers legal direct web api graphql static
    emails challenge privacy terms session oauth share s ar lite download press blog help directory topics
    locations nametag your_activity archive threads invites push sitemap.xml robots.txt favicon.ico data
    ads business creators api-docs contact safety instagram-lite reels-audio audio""".split()
)

_HOST = r"(?:(?:www\.|m\.)?instagram\.com|(?:www\.)?instagr\.am)"
_CODE = r"[A-Za-z0-9_-]{5,64}"  # 11 characters usually; a private post's shortcode carries 28 more
# Instagram usernames: letters, digits, "_" and "."; 30 at most. A trailing "."
# is the sentence's full stop, not the name's.
_USER = r"[A-Za-z0-9_](?:[A-Za-z0-9._]{0,28}[A-Za-z0-9_])?"

LINK = re.compile(
    r"(?<![^\s(<\[{\"'*_~>|,;])"  # starts a word (or follows an opening bracket, quote or markup)
    r"(?:https?://)?" + _HOST + r"(?:"
    r"(?:/" + _USER + r")?/(?P<media>p|reels?|tv)/(?P<code>" + _CODE + r")(?![A-Za-z0-9_-])"
    r"|/stories/(?P<story>" + _USER + r")(?![A-Za-z0-9_.]*[A-Za-z0-9_])"
    r"|/(?P<user>" + _USER + r")(?![A-Za-z0-9_.]*[A-Za-z0-9_])/?(?=$|[\s?#)\]}>\"'!,;:.*_~|])"
    r")",
    re.IGNORECASE,
)
_QUICK = re.compile("instagr", re.IGNORECASE)  # most messages: one scan, no regex backtracking


@dataclass(frozen=True, slots=True)
class Target:
    """What one link names. ``ident`` is the shortcode (case matters) or the
    lower-cased username (Instagram's usernames are not case sensitive)."""

    kind: Kind
    ident: str

    @property
    def url(self) -> str:
        """The canonical URL the worker fetches (never the user's text)."""
        if self.kind == "profile":
            return f"https://www.instagram.com/{self.ident}/"
        if self.kind == "story":
            return f"https://www.instagram.com/stories/{self.ident}/"
        path = {"post": "p", "reel": "reel", "tv": "tv"}[self.kind]
        return f"https://www.instagram.com/{path}/{self.ident}/"

    @property
    def cache_key(self) -> str:
        """One cache entry per media: /p/, /reel/ and /tv/ of one shortcode are one post."""
        if self.kind in ("post", "reel", "tv"):
            return f"media:{self.ident}"
        return f"{self.kind}:{self.ident}"


def _target(match: re.Match[str]) -> Target | None:
    if match["code"]:
        media = match["media"].lower()
        kind: Kind = "post" if media == "p" else "tv" if media == "tv" else "reel"
        return Target(kind, match["code"])
    if match["story"]:
        return Target("story", match["story"].lower())
    user = match["user"]
    if user.lower() in RESERVED or ".." in user:
        return None
    return Target("profile", user.lower())


def find_targets(text: str, limit: int = MAX_TARGETS) -> list[Target]:
    """The Instagram links in ``text``, in order, each once, at most ``limit``."""
    if not _QUICK.search(text):
        return []
    found: list[Target] = []
    seen: set[str] = set()
    for match in LINK.finditer(text):
        target = _target(match)
        if target is None or target.cache_key in seen:
            continue
        seen.add(target.cache_key)
        found.append(target)
        if len(found) >= limit:
            break
    return found
