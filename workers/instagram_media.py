"""Fetching from Instagram, and from nowhere else.

Every byte the Instagram feature downloads itself (images, videos, thumbnails,
profile JSON) goes through ``get``: the URLs come out of Instagram's answers,
so they are checked before each request, and again at each redirect, against
one rule: ``https``, port 443, no user info, and a host that is Instagram's
own or its CDN's (``ALLOWED_DOMAINS`` and their subdomains). Anything else is
refused before a connection is made (no SSRF through a crafted answer or a
redirect). Answers are streamed with a byte cap (a ``Content-Length`` over it
is refused before the body is read) and a deadline for the whole request, so
a slow-drip server cannot hold a worker.

``download_media`` adds what a file must be: a 200 with an ``image/*`` or
``video/*`` type (Instagram serves media with a precise type; ``text/html``
from a CDN URL is a login or error page, never a picture).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

ALLOWED_DOMAINS = ("instagram.com", "cdninstagram.com", "fbcdn.net")
MAX_REDIRECTS = 3
MEDIA_TYPES = ("image/", "video/")
# Instagram's CDN checks the referrer on some media; yt-dlp sends the same.
HEADERS = {"Referer": "https://www.instagram.com/", "Accept": "*/*"}


class Refused(Exception):
    """Not fetched, or not kept: a URL outside Instagram, a wrong type, too large."""


class TooLarge(Refused):
    pass


class Unreachable(Exception):
    """The request failed (network error, timeout, an answer that is not 200 where one was needed)."""


@dataclass(slots=True)
class Fetched:
    status: int
    mime: str  # the Content-Type's media type, lower-cased, without parameters
    data: bytes
    url: str  # the final URL, after redirects


def refusal(url: str) -> str | None:
    """Why ``url`` may not be fetched, or None when it may."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a URL"
    if parts.scheme != "https":
        return "not https"
    if parts.username is not None or parts.password is not None:
        return "user info in the URL"
    if port not in (None, 443):
        return "a port other than 443"
    host = (parts.hostname or "").rstrip(".").lower()
    if not any(host == domain or host.endswith("." + domain) for domain in ALLOWED_DOMAINS):
        return f"host {host or '(none)'} is not Instagram's"
    return None


async def get(
    http: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int,
    deadline: float,
    headers: Mapping[str, str] | None = None,
) -> Fetched:
    """GET ``url`` within Instagram's hosts, following at most MAX_REDIRECTS
    redirects (each checked), reading at most ``max_bytes`` of body, all
    within ``deadline`` seconds.

    Raises Refused (before any request to a refused URL), TooLarge, or
    Unreachable (network error or timeout)."""
    try:
        async with asyncio.timeout(deadline):
            for _ in range(MAX_REDIRECTS + 1):
                reason = refusal(url)
                if reason is not None:
                    raise Refused(f"{reason}: {_short(url)}")
                async with http.stream("GET", url, headers={**HEADERS, **(headers or {})},
                                       follow_redirects=False, timeout=deadline) as resp:  # fmt: skip
                    if resp.is_redirect:
                        url = urljoin(url, resp.headers.get("location", ""))
                        continue
                    mime = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                    length = resp.headers.get("content-length", "")
                    if length.isdigit() and int(length) > max_bytes:
                        raise TooLarge(f"{int(length)} bytes, more than {max_bytes}")
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise TooLarge(f"more than {max_bytes} bytes")
                    return Fetched(resp.status_code, mime, bytes(body), url)
            raise Refused(f"more than {MAX_REDIRECTS} redirects")
    except TimeoutError as exc:
        raise Unreachable(f"no complete answer within {deadline:g} s") from exc
    except httpx.HTTPError as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}") from exc


async def download_media(
    http: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int,
    deadline: float,
    types: Sequence[str] = MEDIA_TYPES,
) -> Fetched:
    """A media file: a 200 whose type starts with one of ``types``."""
    fetched = await get(http, url, max_bytes=max_bytes, deadline=deadline)
    if fetched.status != 200:
        raise Unreachable(f"HTTP {fetched.status} for {_short(url)}")
    if not fetched.mime.startswith(tuple(types)):
        raise Refused(f"content type {fetched.mime or '(none)'} is not {' or '.join(t + '*' for t in types)}")
    return fetched


def _short(url: str) -> str:
    """A URL for a log line: CDN URLs carry long signatures, worth nothing there."""
    return url.split("?", 1)[0][:200]
