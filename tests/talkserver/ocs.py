"""What every OCS route shares: the envelope, parameter decoding, CSRF and
brute-force protection — as Nextcloud's AppFramework does them.

- ``V2Response``: the HTTP status is the DataResponse's; the body is
  ``{"ocs":{"meta":{status,statuscode,message},"data":…}}`` in JSON when the
  client asks for it (``Accept: application/json`` or ``format=json``), XML
  otherwise.
- ``Request``: a JSON body (``Content-Type: application/json``) becomes the
  parameters for every method; form bodies too; the query string is merged.
- CSRF: an OCS call without ``OCS-APIRequest: true`` fails with 412.
- ``BruteForceMiddleware`` + ``Throttler``: before the controller, sleep the
  IP's delay or answer 429 once the maximum is reached; a throttled response
  (a 401) registers an attempt and is itself turned into a 429 when that
  attempt crosses the maximum.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from aiohttp import web

from tests.talkserver.phpjson import php_ocs_json
from tests.talkserver.state import TalkState


def wants_json(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt:
        return fmt == "json"
    return "application/json" in request.headers.get("Accept", "")


def ocs_response(request: web.Request, status: int, data: Any = None, message: str | None = None) -> web.Response:
    ok = 200 <= status < 300
    meta = {"status": "ok" if ok else "failure", "statuscode": status, "message": "OK" if ok else (message or "")}
    envelope = {"ocs": {"meta": meta, "data": data}}
    if wants_json(request):
        return web.Response(
            status=status, body=php_ocs_json(envelope).encode(), content_type="application/json", charset="utf-8"
        )
    return web.Response(status=status, body=_xml(envelope).encode(), content_type="application/xml", charset="utf-8")


def _xml(envelope: dict[str, Any]) -> str:
    def walk(value: Any) -> str:
        if isinstance(value, dict):
            return "".join(f"<{k}>{walk(v)}</{k}>" if v is not None else f"<{k}/>" for k, v in value.items())
        if isinstance(value, list):
            return "".join(f"<element>{walk(v)}</element>" for v in value)
        if isinstance(value, bool):
            return "1" if value else ""
        return escape(str(value))

    return '<?xml version="1.0"?>\n' + walk(envelope) + "\n"


async def params(request: web.Request) -> dict[str, Any]:
    """Request::decodeContent + getParams: query, then body."""
    out: dict[str, Any] = dict(request.query)
    ctype = request.headers.get("Content-Type", "")
    raw = await request.read()
    if "application/json" in ctype:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if isinstance(body, dict) and body:
            out.update(body)
    elif "application/x-www-form-urlencoded" in ctype:
        out.update(dict(parse_qsl(raw.decode(errors="replace"), keep_blank_values=True)))
    return out


def php_string(value: Any) -> str | None:
    """A scalar passed to a ``string`` parameter (non-strict PHP call); None: TypeError."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else ""
    if isinstance(value, int | float):
        return str(value)
    return None


def php_int(value: Any) -> int:
    """``settype($value, 'integer')`` as the Dispatcher does for ``int`` parameters."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        digits = ""
        for i, ch in enumerate(value.strip()):
            if ch.isdigit() or (i == 0 and ch in "+-"):
                digits += ch
            else:
                break
        try:
            return int(digits)
        except ValueError:
            return 0
    return 0


def php_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value not in ("", "0")
    return bool(value)


def csrf_ok(request: web.Request) -> bool:
    return request.headers.get("OCS-APIRequest", "").lower() == "true"


def client_ip(request: web.Request) -> str:
    return request.remote or ""


class BruteForce:
    """The throttle around one protected action (``#[BruteForceProtection(action: 'bot')]``)."""

    def __init__(self, state: TalkState, action: str, delay_scale: float) -> None:
        self.state = state
        self.action = action
        self.delay_scale = delay_scale  # 1.0: Nextcloud's real sleeps; tests may shrink them

    async def before(self, request: web.Request) -> web.Response | None:
        ip = client_ip(request)
        if self.state.blocked(ip, self.action):
            return ocs_response(request, 429, None, "Reached maximum delay")
        await self._sleep(self.state.delay(ip, self.action))
        return None

    async def throttled(self, request: web.Request, response: web.Response) -> web.Response:
        ip = client_ip(request)
        self.state.register_attempt(ip, self.action)
        if self.state.blocked(ip, self.action):
            return ocs_response(request, 429, None, "Reached maximum delay")
        await self._sleep(self.state.delay(ip, self.action))
        return response

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self.delay_scale > 0:
            await asyncio.sleep(seconds * self.delay_scale)
