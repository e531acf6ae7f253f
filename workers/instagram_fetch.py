"""Reading a post, reel, IGTV video or profile from Instagram into a ``Preview``.

Posts, reels and IGTV go through yt-dlp's Python API, its own Instagram
extractor unchanged: a fresh ``YoutubeDL`` per call (it keeps per-instance
state: cookies, the session token), run in a thread (``asyncio.to_thread``:
it is blocking code), limited to that one extractor (``allowed_extractors``:
the generic extractor, which fetches any URL, never runs), with the
configured cookies file read but never written back (several workers on
several machines share it). Only metadata is extracted; the worker downloads
the media itself, through ``instagram_media`` (Instagram's hosts only, capped).

Profiles: yt-dlp has no working profile extractor, so a profile is
Instagram's public profile JSON (``/api/v1/users/web_profile_info/``, the call
the web app makes) fetched with httpx through the same guarded ``get`` as the
media. Not instaloader: it is blocking, keeps its own requests session (no
host allow-list, no byte cap) and, when Instagram rate-limits it, sleeps in
place for minutes, inside a worker slot; one GET does what is needed here.

Network settings come from the environment, as for any client: yt-dlp and
httpx both honour ``HTTPS_PROXY``/``NO_PROXY``, and ``SSL_CERT_FILE`` names the
CA bundle (yt-dlp then uses the system's store instead of certifi's: the
only way it reads ``SSL_CERT_FILE``).

Errors: yt-dlp raises ``DownloadError`` with a message; ``classify`` turns it
into what the room is told and whether the breaker opens (Instagram's rate
limit and login wall: ``FetchError.blocks``).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx
import orjson

from workers.instagram_media import Refused, TooLarge, Unreachable, get
from workers.instagram_urls import Target

ErrorKind = Literal["rate_limited", "login_required", "private", "restricted", "not_found", "unsupported", "failed"]
BLOCKING: frozenset[str] = frozenset({"rate_limited", "login_required"})  # Instagram refuses every fetch: the breaker
APP_ID = "936619743392459"  # Instagram's web app id: the profile API wants it (yt-dlp sends the same)
PROFILE_API = "https://i.instagram.com/api/v1/users/web_profile_info/"
MAX_JSON_BYTES = 4 << 20
RECENT_POSTS = 3  # a profile preview lists this many recent posts


class FetchError(Exception):
    def __init__(self, kind: ErrorKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def blocks(self) -> bool:
        """Instagram refuses us, not just this post: open the breaker."""
        return self.kind in BLOCKING


# Message fragments of yt-dlp's Instagram errors, most specific first. The
# login wall that yt-dlp reports as "rate-limit for accessing posts
# anonymously" is Instagram's anonymous rate limit; a private post's
# "registered users who follow this account" is about that post only.
_CLASSES: tuple[tuple[ErrorKind, tuple[str, ...]], ...] = (
    ("private", ("registered users who follow this account", "this account is private")),
    ("restricted", ("restricted video", "age-restricted", "not available in your country")),
    (
        "rate_limited",
        (
            "http error 429",
            "rate-limit",
            "rate limit",
            "please wait a few minutes",
            "redirected to the login page",
            "too many requests",
        ),
    ),
    (
        "not_found",
        (
            "http error 404",
            "isn't available",
            "is not available",
            "not available",
            "empty media response",
            "media not found",
            "page not found",
            "has been removed",
        ),
    ),
    (
        "login_required",
        (
            "login required",
            "--cookies",
            "requires authentication",
            "http error 401",
            "login_required",
            "checkpoint_required",
        ),
    ),
    ("unsupported", ("unsupported url", "no video formats", "there is no video in this post")),
)


def classify(message: str) -> ErrorKind:
    text = message.lower()
    for kind, needles in _CLASSES:
        if any(needle in text for needle in needles):
            return kind
    return "failed"


@dataclass(slots=True)
class Media:
    kind: Literal["image", "video"]
    url: str  # on Instagram's CDN
    thumbnail: str | None = None  # a video's still
    width: int | None = None
    height: int | None = None
    duration: float | None = None


@dataclass(slots=True)
class Preview:
    kind: str  # Target.kind: post, reel, tv, profile
    ident: str
    link: str  # the canonical URL, for the reply
    author: str | None = None  # the @-name (yt-dlp's ``channel``)
    author_name: str | None = None  # the display name (yt-dlp's ``uploader``)
    caption: str | None = None
    likes: int | None = None
    comments: int | None = None
    duration: float | None = None
    media: list[Media] = field(default_factory=list)
    # profiles
    followers: int | None = None
    following: int | None = None
    posts: int | None = None
    private: bool = False
    recent: list[tuple[str, str]] = field(default_factory=list)  # (shortcode, caption)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Preview:
        data = orjson.loads(raw)
        data["media"] = [Media(**m) for m in data.get("media", [])]
        data["recent"] = [tuple(r) for r in data.get("recent", [])]
        return cls(**data)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _media_of(entry: Mapping[str, Any]) -> Media | None:
    """One image or video of yt-dlp's answer: a video has a chosen format's
    ``url``; an image post has no formats, only its (best-first) thumbnail."""
    url = _str(entry.get("url"))
    thumb = _str(entry.get("thumbnail"))
    width, height = _int(entry.get("width")), _int(entry.get("height"))
    if url and entry.get("vcodec") != "none":
        return Media("video", url, thumb, width, height, _num(entry.get("duration")))
    if thumb:
        return Media("image", thumb)
    return None


def preview_from_info(target: Target, info: Mapping[str, Any], max_media: int) -> Preview:
    """yt-dlp's info dict (a video, an image post, or a carousel playlist) as a Preview."""
    entries = info.get("entries") if info.get("_type") == "playlist" else None
    items = [e for e in (entries or []) if isinstance(e, Mapping)] if entries is not None else [info]
    media = [m for m in (_media_of(e) for e in items) if m is not None][:max_media]
    if not media:
        raise FetchError("unsupported", "no image or video in the answer")
    durations = [m.duration for m in media if m.duration]
    return Preview(
        kind=target.kind,
        ident=target.ident,
        link=target.url,
        author=_str(info.get("channel")) or _str(info.get("uploader_id")),
        author_name=_str(info.get("uploader")),
        caption=_str(info.get("description")),
        likes=_int(info.get("like_count")),
        comments=_int(info.get("comment_count")),
        duration=durations[0] if len(media) == 1 and durations else None,
        media=media,
    )


class _Log:
    """yt-dlp's messages into our log: its errors are ours to report (as one
    line, by the job), so they are debug here."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    def debug(self, msg: str) -> None:
        self.log.debug("yt-dlp: %s", msg)

    info = debug

    def warning(self, msg: str) -> None:
        self.log.debug("yt-dlp warning: %s", msg)

    def error(self, msg: str) -> None:
        self.log.debug("yt-dlp error: %s", msg)


class Fetcher:
    """Reads previews from Instagram. One per job: it holds settings only."""

    def __init__(self, http: httpx.AsyncClient, *, timeout: float, cookies_file: str = "", max_media: int = 10,
                 log: logging.Logger, environ: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.http = http
        self.timeout = timeout
        self.cookies_file = cookies_file
        self.max_media = max_media
        self.log = log
        self.environ = os.environ if environ is None else environ

    # posts, reels, IGTV ------------------------------------------------------------
    def ydl_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "skip_download": True,
            "simulate": True,
            "allowed_extractors": ["instagram"],  # never the generic extractor: it fetches anything
            "ignore_no_formats_error": True,  # an image post has no video formats; its thumbnails are the images
            "format": "best/bestvideo",  # one progressive mp4 when there is one
            "socket_timeout": self.timeout,
            "retries": 0,
            "extractor_retries": 0,
            "noplaylist": False,
            "getcomments": False,
            "cachedir": False,
            "logger": _Log(self.log),
        }
        if self.cookies_file:
            params["cookiefile"] = self.cookies_file
        if self.environ.get("SSL_CERT_FILE"):
            params["compat_opts"] = {"no-certifi"}
        return params

    def _extract(self, url: str) -> dict[str, Any]:
        import yt_dlp  # here, not at the top: the daemon imports this module for its trigger only

        ydl = yt_dlp.YoutubeDL(self.ydl_params())
        try:
            info = ydl.extract_info(url, download=False)
            return ydl.sanitize_info(info)  # type: ignore[no-any-return]
        finally:
            # yt-dlp writes its cookie jar back to the cookies file on close:
            # not here, the file is shared read-only by every worker.
            ydl.params["cookiefile"] = None
            ydl.close()

    async def media_preview(self, target: Target) -> Preview:
        from yt_dlp.utils import DownloadError, YoutubeDLError

        try:
            info = await asyncio.to_thread(self._extract, target.url)
        except DownloadError as exc:
            message = str(exc).removeprefix("ERROR: ")
            raise FetchError(classify(message), message) from exc
        except YoutubeDLError as exc:
            raise FetchError("failed", str(exc)) from exc
        if not isinstance(info, Mapping):
            raise FetchError("failed", "yt-dlp answered no info")
        return preview_from_info(target, info, self.max_media)

    # profiles ----------------------------------------------------------------------
    def _cookie_header(self) -> str:
        """The cookies file's Instagram cookies, for the profile API (logged in, as yt-dlp is)."""
        if not self.cookies_file:
            return ""
        jar = http.cookiejar.MozillaCookieJar(self.cookies_file)
        try:
            jar.load(ignore_discard=True, ignore_expires=True)
        except (OSError, http.cookiejar.LoadError) as exc:
            self.log.warning("instagram: cookies file %s unreadable: %s", self.cookies_file, exc)
            return ""
        return "; ".join(
            f"{c.name}={c.value}" for c in jar if c.domain.lstrip(".").endswith("instagram.com") and c.value is not None
        )

    async def profile_preview(self, target: Target) -> Preview:
        headers = {"X-IG-App-ID": APP_ID, "Accept": "application/json"}
        cookies = await asyncio.to_thread(self._cookie_header)
        if cookies:
            headers["Cookie"] = cookies
        url = str(httpx.URL(PROFILE_API, params={"username": target.ident}))
        try:
            fetched = await get(self.http, url, max_bytes=MAX_JSON_BYTES, deadline=self.timeout, headers=headers)
        except TooLarge as exc:
            raise FetchError("failed", f"profile answer too large: {exc}") from exc
        except Refused as exc:
            raise FetchError("failed", f"profile answer refused: {exc}") from exc
        except Unreachable as exc:
            raise FetchError("failed", str(exc)) from exc
        if "/accounts/login" in fetched.url or "/challenge" in fetched.url:
            raise FetchError("rate_limited", "redirected to the login page")
        try:
            body = orjson.loads(fetched.data) if fetched.mime in ("application/json", "text/javascript") else None
        except orjson.JSONDecodeError:
            body = None
        if fetched.status == 429 or fetched.status in (401, 403):
            raise FetchError("rate_limited" if fetched.status == 429 else "login_required",
                             f"HTTP {fetched.status}: {_message(body)}")  # fmt: skip
        if isinstance(body, dict) and (body.get("require_login") or body.get("message") == "checkpoint_required"):
            raise FetchError("login_required", _message(body))
        if fetched.status == 404:
            raise FetchError("not_found", f"no profile {target.ident}")
        if fetched.status != 200 or not isinstance(body, dict):
            raise FetchError("failed", f"HTTP {fetched.status}, {fetched.mime or 'no type'}")
        user = body.get("data", {}).get("user") if isinstance(body.get("data"), dict) else None
        if not isinstance(user, dict):
            raise FetchError("not_found", f"no profile {target.ident}")
        return preview_from_profile(target, user, self.max_media)


def _message(body: Any) -> str:
    return str(body.get("message", ""))[:200] if isinstance(body, dict) else ""


def preview_from_profile(target: Target, user: Mapping[str, Any], max_media: int) -> Preview:
    """web_profile_info's ``data.user`` as a Preview: the profile picture as
    its one image, the counts, the bio and the recent posts."""
    timeline = user.get("edge_owner_to_timeline_media")
    timeline = timeline if isinstance(timeline, Mapping) else {}
    recent: list[tuple[str, str]] = []
    for edge in timeline.get("edges") or []:
        node = edge.get("node") if isinstance(edge, Mapping) else None
        code = _str(node.get("shortcode")) if isinstance(node, Mapping) else None
        if not code or not code.replace("_", "").replace("-", "").isalnum():
            continue
        captions = node.get("edge_media_to_caption", {}).get("edges") or [{}]
        text = captions[0].get("node", {}).get("text", "") if isinstance(captions[0], Mapping) else ""
        recent.append((code, text if isinstance(text, str) else ""))
        if len(recent) >= RECENT_POSTS:
            break
    picture = _str(user.get("profile_pic_url_hd")) or _str(user.get("profile_pic_url"))

    def count(key: str) -> int | None:
        edge = user.get(key)
        return _int(edge.get("count")) if isinstance(edge, Mapping) else None

    return Preview(
        kind="profile",
        ident=target.ident,
        link=target.url,
        author=_str(user.get("username")) or target.ident,
        author_name=_str(user.get("full_name")),
        caption=_str(user.get("biography")),
        media=[Media("image", picture)][:max_media] if picture else [],
        followers=count("edge_followed_by"),
        following=count("edge_follow"),
        posts=_int(timeline.get("count")),
        private=bool(user.get("is_private")),
        recent=recent,
    )
