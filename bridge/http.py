"""The daemon's one HTTP server: webhooks, ``/metrics``, ``/healthz``, ``/readyz``.

Webhook routes come from the adapters (``Adapter.ingress_routes``) and are
served by every instance: they only verify and publish, so any instance
behind a load balancer can take them. The app is served by a
``bridge.listener.Listener`` (timeouts, connection cap, malformed requests).

**Who may read what.** The listener is often public (Talk must reach the
webhooks: ``BindAddress = "0.0.0.0:4280"``), while ``/metrics`` names the
accounts and streams with their volumes, and ``/readyz``'s detail every
account's state, the instance holding it (host and pid) and Redis's error
text. ``StatusAccess`` (``[http] MetricsFrom``, ``MetricsToken``) decides who
is *trusted* with them:

- a request with ``Authorization: Bearer <MetricsToken>``, from anywhere;
- without a bearer token, a client whose address is in ``MetricsFrom``
  (default: loopback only, ``127.0.0.0/8`` and ``::1``) — unless the request
  carries ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP``: a proxy on the
  same host relayed it for someone else, whose address is unknown.

``/metrics`` answers a client not trusted ``403`` (no token, ``401`` for a
wrong one) with the reason and nothing else. ``/readyz`` answers everyone its
status (200 ready, 503 not) — load balancers and health checks elsewhere need
it — but only ``{"ready": true|false}`` to a client not trusted: one bit,
no account, host or error text. ``/healthz`` says ``ok`` to anyone. Refused
requests are counted (``talkbridge_ingress_rejected{account="http",reason}``)
and logged in summary (``bridge.rejections``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from bridge.addresses import parse_networks
from bridge.config_keys import HttpSection
from bridge.metrics import Metrics
from bridge.rejections import RejectionLog

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER = "http"  # the listener's name in the rejected metric and the refusal log
LOOPBACK = ("127.0.0.0/8", "::1")  # [http] MetricsFrom's default
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")  # a proxy relayed the request


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    cause: str  # the rejected metric's reason label
    reason: str  # for the client and the log


@dataclass(frozen=True, slots=True)
class StatusAccess:
    """Who is trusted with ``/metrics`` and ``/readyz``'s detail (see the module's docstring)."""

    networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in LOOPBACK)
    token: str = ""

    @classmethod
    def from_section(cls, http: HttpSection) -> StatusAccess:
        return cls(parse_networks(http.metrics_from), http.metrics_token)

    def refusal(self, remote: str | None, headers: Mapping[str, str]) -> Refusal | None:
        """None when the client is trusted; else why not."""
        header = headers.get(hdrs.AUTHORIZATION, "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip(" \t").encode("utf-8", "surrogateescape")  # bytes as sent, not UTF-8 ones too
            if self.token and hmac.compare_digest(given, self.token.encode("utf-8", "surrogateescape")):
                return None
            return Refusal(401, "bad_token", "the bearer token is not [http] MetricsToken")
        if any(name in headers for name in FORWARDING_HEADERS):
            return Refusal(403, "forwarded", f"{self._who()}; a forwarded request must carry the token")
        if self._local(remote):
            return None
        return Refusal(403, "not_allowed", self._who())

    def _local(self, remote: str | None) -> bool:
        if not remote or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:  # a Unix socket's "", anything else odd: not trusted
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener's IPv4 clients
        return any(address in network for network in self.networks)

    def _who(self) -> str:
        allowed = "clients in [http] MetricsFrom" if self.networks else "no client by its address"
        token = " or with the bearer token [http] MetricsToken" if self.token else ""
        return f"served to {allowed}{token}"


def build_app(
    metrics: Metrics,
    readiness: Readiness,
    refresh_metrics: Callable[[], Awaitable[None]],
    ingress: Iterable[web.RouteDef],
    max_body: int,
    log: logging.Logger | None = None,
    access: StatusAccess | None = None,
    rejections: RejectionLog | None = None,
) -> web.Application:
    log = log or logging.getLogger("talkbridge.http")
    access = access or StatusAccess()
    rejections = rejections or RejectionLog(log)
    app = web.Application(client_max_size=max_body)

    def refused(request: web.Request) -> Refusal | None:
        return access.refusal(request.remote, request.headers)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})  # the process answers: alive

    async def readyz(request: web.Request) -> web.Response:
        try:
            ready, detail = await readiness()
        except (RedisError, OSError) as exc:  # Redis went away between two questions
            ready, detail = False, {"redis": f"unreachable: {exc}"}
        shown = {"ready": ready} if refused(request) else {"ready": ready, **detail}  # strangers: one bit
        return web.json_response(shown, status=200 if ready else 503)

    async def prometheus(request: web.Request) -> web.Response:
        refusal = refused(request)
        if refusal is not None:
            metrics.rejected.labels(LISTENER, refusal.cause).inc()
            rejections.note(LISTENER, "metrics request", refusal.cause, refusal.reason, request.remote)
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            return web.json_response({"error": f"/metrics: {refusal.reason}"}, status=refusal.status, headers=headers)
        try:
            await refresh_metrics()  # stream gauges are read from Redis on demand
        except Exception as exc:  # answer with what we have: the other metrics still count
            log.warning("metrics: stream gauges not refreshed (%s: %s)", type(exc).__name__, exc)
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", prometheus)])
    app.add_routes(list(ingress))
    return app
