"""One Nextcloud account's HTTP connection to Talk, as a user or as a guest.

One ``aiohttp.ClientSession`` per account, its connection pool sized for a
long poll per room plus the sends (500 rooms are 500 sockets and 500 small
tasks, no thread each). aiohttp, not httpx: with httpx (0.28, httpcore 1.0)
bench/poll_rooms.py found 500 idle rooms costing a fifth of a core and 500
busy ones relaying 56 messages/s with the core saturated — httpcore's pool
walks all its connections (for each idle one, all of them again) on every
request and answer, and without sniffio installed retries a failed import
each time; a micro-benchmark put it at 0.6 to 2.6 ms of CPU per request,
aiohttp's client at about 70 µs. With aiohttp the same run idles at 0.4% of
a core and relays 500 messages/s at two thirds of one. Every answer is read
with a size cap: what a hostile or broken server sends past it is refused
(``TooLarge``), never buffered whole.

User: Basic auth with an app password and the OCS headers. Guest (no
``Login``, seed 003): the public room's page gives the session cookie (kept
in the session's jar) and ``data-requesttoken`` (sent as ``requesttoken``);
``POST …/v4/room/{token}/participants/active`` joins that session to the room.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from adapters.talk.chat import BadAnswer, ocs_data
from adapters.talk.common import OCS_HEADERS

CAPABILITIES = "/ocs/v2.php/cloud/capabilities"
ROOM_API = "/ocs/v2.php/apps/spreed/api/v4/room"
SHARES = "/ocs/v2.php/apps/files_sharing/api/v1/shares"
DAV_FILES = "/remote.php/dav/files"
_REQUEST_TOKEN = re.compile(r'data-requesttoken="([^"]{1,512})"')
SEND_CONNECTIONS = 32  # the account's requests other than long polls, at once


class Unreachable(Exception):
    """The request did not get an answer (network, TLS, timeout).
    ``connecting``: no connection was made (refused, DNS, connect timeout),
    so the server never saw the request."""

    def __init__(self, what: str, connecting: bool = False) -> None:
        super().__init__(what)
        self.connecting = connecting


class TooLarge(BadAnswer):
    """An answer longer than the cap."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    body: bytes

    def data(self) -> Any:
        return ocs_data(self.body)


def path_token(token: str) -> str:
    return quote(token, safe="")


def dav_path(login: str, path: str) -> str:
    """``/remote.php/dav/files/LOGIN/PATH``, each segment quoted."""
    parts = [quote(p, safe="") for p in path.strip("/").split("/") if p]
    return f"{DAV_FILES}/{quote(login, safe='')}/" + "/".join(parts)


class TalkClient:
    def __init__(
        self,
        server: str,
        login: str,
        password: str,
        *,
        timeout: float,
        max_answer: int,
        rooms: int | None,
        verify: bool = True,
    ) -> None:
        """Made in a running event loop (``connect``): aiohttp binds the session
        to it. ``rooms``: how many long polls at most (None: not known, as with
        a channel of ``*``: no limit on the pool, a poll per room bounds it)."""
        self.server = server.rstrip("/")
        self.login = login
        self.guest = not login
        self.max_answer = max_answer
        self.timeout = timeout
        self.request_token = ""
        headers = dict(OCS_HEADERS)
        if login:  # Basic auth as httpx and curl send it: UTF-8
            headers["Authorization"] = "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0 if rooms is None else rooms + SEND_CONNECTIONS, limit_per_host=0, ssl=verify
            ),
            headers=headers,
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # a guest's session cookie, also from a server named by IP
        )

    async def aclose(self) -> None:
        await self.http.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        seconds: float | None = None,
        limit: int | None = None,
    ) -> Answer:
        """One request; the answer's body read up to ``limit`` bytes (else
        ``TooLarge``). ``seconds``: how long the answer may take (a long poll
        waits longer than a plain request; otherwise ``timeout`` to connect
        and between two reads)."""
        cap = self.max_answer if limit is None else limit
        extra = dict(headers or {})
        if self.guest and self.request_token:
            extra.setdefault("requesttoken", self.request_token)
        read = self.timeout if seconds is None else seconds
        kwargs: dict[str, Any] = {
            "headers": extra,
            "allow_redirects": False,
            "timeout": aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.timeout, sock_read=read),
        }
        if params:
            kwargs["params"] = {key: str(value) for key, value in params.items()}
        if json is not None:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
        if content is not None:
            kwargs["data"] = content
        try:
            async with self.http.request(method, self.server + path, **kwargs) as resp:
                declared = resp.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > cap:
                    raise TooLarge(f"{method} {path}: answer of {declared} bytes, more than {cap}")
                chunks, size = [], 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > cap:
                        raise TooLarge(f"{method} {path}: answer longer than {cap} bytes")
                    chunks.append(chunk)
                return Answer(resp.status, resp.headers, b"".join(chunks))
        except aiohttp.ConnectionTimeoutError as exc:
            raise Unreachable(f"{method} {path}: connect timed out", connecting=True) from exc
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise Unreachable(f"{method} {path}: timed out ({type(exc).__name__})") from exc
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake
            raise Unreachable(f"{method} {path}: {type(exc).__name__}: {exc}", connecting=True) from exc
        except aiohttp.ClientError as exc:
            raise Unreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    # guests ----------------------------------------------------------------------------
    async def open_public_page(self, token: str) -> None:
        """Load ``/call/{token}``: the session cookie lands in the jar, the CSRF token here."""
        answer = await self.call("GET", f"/call/{path_token(token)}", headers={"Accept": "text/html"}, limit=1 << 20)
        if answer.status != 200:
            raise BadAnswer(f"the public page of room {token} answered {answer.status} (is the room public?)")
        found = _REQUEST_TOKEN.search(answer.body.decode("utf-8", "replace"))
        if found is None:
            raise BadAnswer(f"the public page of room {token} has no data-requesttoken")
        self.request_token = found.group(1)
