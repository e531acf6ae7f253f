"""What the modules of adapters/matrix/ share: the protocol's constants,
the failures a request raises, reading nio's error answers, and the ids
they make."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
from nio import ErrorResponse

from bridge.adapter import PermanentError

PROTOCOL = "matrix"
MEDIA_API = "/_matrix/client/v1/media"
REACTIONS_TTL = 7 * 86400
PAGE = 100  # events per /messages page when paging back
DEVICE_NAME = "talkbridge"
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError, OSError)


class Unavailable(Exception):
    """The homeserver cannot serve this now (network, 5xx, 429): retry later."""

    def __init__(self, what: str, retry_after: float | None = None, unreachable: bool = False) -> None:
        super().__init__(what)
        self.retry_after = retry_after
        self.unreachable = unreachable  # the homeserver itself is away (network, 5xx): not this request's fault


class TokenRefused(Exception):
    """The homeserver does not know the access token (M_UNKNOWN_TOKEN)."""


def event_id(*parts: object) -> str:
    """A stable event id per Matrix event: a sync published again yields the same ids."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def txn_id(key: str, part: int | str) -> str:
    """The transaction id of one request of a delivery: the same at every redelivery."""
    return f"tb{hashlib.sha256(key.encode()).hexdigest()[:40]}.{part}"


def status_of(resp: Any) -> int:
    transport = getattr(resp, "transport_response", None)
    return int(getattr(transport, "status", 0) or 0)


def errcode_of(resp: Any) -> str:
    return str(getattr(resp, "status_code", "") or "")


def describe(resp: Any) -> str:
    return f"{status_of(resp) or '?'} {errcode_of(resp)} {str(getattr(resp, 'message', ''))[:200]}".strip()


def retry_after_of(resp: Any) -> float | None:
    ms = getattr(resp, "retry_after_ms", None)
    return ms / 1000 if isinstance(ms, int | float) and ms >= 0 else None


def check_response(resp: Any, what: str) -> None:
    """Raise what an error answer means; return for a success."""
    if not isinstance(resp, ErrorResponse):
        return
    code, status = errcode_of(resp), status_of(resp)
    if code == "M_UNKNOWN_TOKEN" or (status == 401 and code in ("", "M_MISSING_TOKEN")):
        raise TokenRefused(f"{what}: {describe(resp)}")
    if code == "M_LIMIT_EXCEEDED" or status == 429:
        raise Unavailable(f"{what}: rate limited ({describe(resp)})", retry_after_of(resp) or 5.0)
    if status >= 500 or status == 0:
        raise Unavailable(f"{what}: {describe(resp)}", unreachable=True)
    raise PermanentError(f"{what}: the homeserver answered {describe(resp)}")
