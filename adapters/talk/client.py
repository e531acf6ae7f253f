"""One Nextcloud account's HTTP connection to Talk, as a user or as a guest.

A single ``httpx.AsyncClient`` per account, its pool sized for one long poll
per room plus the sends (500 rooms are 500 sockets and 500 small tasks, no
thread each). Every answer is read with a size cap: what a hostile or broken
server sends past it is refused (``TooLarge``), never buffered whole.

User: Basic auth with an app password and the OCS headers. Guest (no
``Login``, seed 003): the public room's page gives the session cookie (kept
in the client's jar) and ``data-requesttoken`` (sent as ``requesttoken``);
``POST …/v4/room/{token}/participants/active`` joins that session to the room.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from adapters.talk.chat import BadAnswer, ocs_data
from adapters.talk.common import OCS_HEADERS

CAPABILITIES = "/ocs/v2.php/cloud/capabilities"
ROOM_API = "/ocs/v2.php/apps/spreed/api/v4/room"
SHARES = "/ocs/v2.php/apps/files_sharing/api/v1/shares"
DAV_FILES = "/remote.php/dav/files"
_REQUEST_TOKEN = re.compile(r'data-requesttoken="([^"]{1,512})"')


class Unreachable(Exception):
    """The request did not get an answer (network, TLS, timeout)."""


class TooLarge(BadAnswer):
    """An answer longer than the cap."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: httpx.Headers
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
        connections: int,
        verify: bool = True,
    ) -> None:
        self.server = server.rstrip("/")
        self.login = login
        self.guest = not login
        self.max_answer = max_answer
        self.request_token = ""
        self.http = httpx.AsyncClient(
            auth=httpx.BasicAuth(login, password) if login else None,
            headers=OCS_HEADERS,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            verify=verify,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

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
        """One request; the answer's body read up to ``limit`` bytes (else ``TooLarge``)."""
        cap = self.max_answer if limit is None else limit
        extra = dict(headers or {})
        if self.guest and self.request_token:
            extra.setdefault("requesttoken", self.request_token)
        kwargs: dict[str, Any] = {"params": params, "headers": extra}
        if json is not None:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
        if content is not None:
            kwargs["content"] = content
        if seconds is not None:  # a long poll waits longer than a plain request
            kwargs["timeout"] = httpx.Timeout(seconds)
        try:
            async with self.http.stream(method, self.server + path, **kwargs) as resp:
                declared = resp.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > cap:
                    raise TooLarge(f"{method} {path}: answer of {declared} bytes, more than {cap}")
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise TooLarge(f"{method} {path}: answer longer than {cap} bytes")
                    chunks.append(chunk)
                return Answer(resp.status_code, resp.headers, b"".join(chunks))
        except httpx.TimeoutException as exc:
            raise Unreachable(f"{method} {path}: timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
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
