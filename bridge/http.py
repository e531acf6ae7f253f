"""The daemon's one HTTP server: webhooks, ``/metrics``, ``/healthz``, ``/readyz``.

Webhook routes come from the adapters (``Adapter.ingress_routes``) and are
served by every instance: they only verify and publish, so any instance
behind a load balancer can take them. The app is served by a
``bridge.listener.Listener`` (timeouts, connection cap, malformed requests).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from bridge.metrics import Metrics

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def build_app(
    metrics: Metrics,
    readiness: Readiness,
    refresh_metrics: Callable[[], Awaitable[None]],
    ingress: Iterable[web.RouteDef],
    max_body: int,
    log: logging.Logger | None = None,
) -> web.Application:
    log = log or logging.getLogger("talkbridge.http")
    app = web.Application(client_max_size=max_body)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})  # the process answers: alive

    async def readyz(request: web.Request) -> web.Response:
        try:
            ready, detail = await readiness()
        except (RedisError, OSError) as exc:  # Redis went away between two questions
            ready, detail = False, {"redis": f"unreachable: {exc}"}
        return web.json_response({"ready": ready, **detail}, status=200 if ready else 503)

    async def prometheus(request: web.Request) -> web.Response:
        try:
            await refresh_metrics()  # stream gauges are read from Redis on demand
        except Exception as exc:  # answer with what we have: the other metrics still count
            log.warning("metrics: stream gauges not refreshed (%s: %s)", type(exc).__name__, exc)
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", prometheus)])
    app.add_routes(list(ingress))
    return app
