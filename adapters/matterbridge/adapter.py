"""``MatterbridgeClient``: the account, its keys, connecting and sending.
Receiving is the ``Receiving`` mixin (adapters/matterbridge/receiving.py);
the module docstring of the package says what crosses and what does not."""

from __future__ import annotations

import asyncio
import os
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp

from adapters.checks import url_problems
from adapters.matterbridge.messages import Formats, post_body, synthetic_id
from adapters.matterbridge.receiving import MODES, Receiving
from adapters.matterbridge.sessions import read_at_most, wants_token
from bridge.adapter import (
    AccountFailed,
    Adapter,
    AdapterContext,
    Option,
    PermanentError,
    ServerUnavailable,
    TransientError,
    error_for_status,
    retry_after_header,
)
from bridge.config import AccountConfig
from bridge.events import Delivery
from bridge.keys import installation_mark_key

PROTOCOL = "matterbridge"
STABLE_SECONDS = 5.0  # a connection that holds this long (or hands something over) is made


class MatterbridgeClient(Receiving, Adapter):
    protocol = PROTOCOL
    options: ClassVar[dict[str, Option]] = {
        "URL": Option(str, required=True, help="base URL of a Matterbridge api account, e.g. http://127.0.0.1:4242"),
        "Token": Option(str, default="", secret=True, help="the api account's Token (empty: it has none)"),
        "Receive": Option(
            str,
            default="auto",
            choices=MODES,
            help="how to receive: auto (websocket, else stream, else poll), websocket, stream or poll",
        ),
        "SkipTLSVerify": Option(bool, default=False, help="do not verify the server's certificate (https)"),
        "PollSeconds": Option((int, float), default=1, above=0, help="poll mode: seconds between reads"),
        "Timeout": Option((int, float), default=15, above=0, help="seconds per request (not a stream's silence)"),
        "ReconnectMinSeconds": Option((int, float), default=1, above=0, help="first wait after a lost connection"),
        "ReconnectMaxSeconds": Option((int, float), default=60, above=0, help="longest wait between reconnects"),
        "MaxAnswerBytes": Option(int, default=64 << 20, min=1 << 16, help="largest message or answer read"),
        "ReplayWindow": Option(
            int,
            default=10000,
            min=100,
            help="received messages remembered to recognise one handed over again (keep above the api Buffer)",
        ),
        "EditFormat": Option(
            str, default="{TEXT} (edited)", help="an edit is posted as a new message so ({TEXT}); empty: dropped"
        ),
        "ReactionFormat": Option(str, default="", help="a reaction is posted so ({EMOJI}); empty: dropped"),
        "DeleteFormat": Option(str, default="", help="a deletion is posted as this text; empty: dropped"),
    }

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        acct = ctx.account
        self.name = acct.name
        self.url = str(acct.get("URL", "")).rstrip("/")
        self.token = str(acct.get("Token", ""))
        self.mode = str(acct.get("Receive", "auto"))
        self.poll_seconds = float(acct.get("PollSeconds", 1))
        self.skip_tls_verify = bool(acct.get("SkipTLSVerify", False))
        self.timeout = float(acct.get("Timeout", 15))
        self.reconnect_min = float(acct.get("ReconnectMinSeconds", 1))
        self.reconnect_max = max(self.reconnect_min, float(acct.get("ReconnectMaxSeconds", 60)))
        self.max_answer = int(acct.get("MaxAnswerBytes", 64 << 20))
        self.max_file = int(acct.get("MediaDownloadSize", 1_000_000))
        self.replay_window = int(acct.get("ReplayWindow", 10000))
        self.formats = Formats(
            edit=str(acct.get("EditFormat", "{TEXT} (edited)")),
            reaction=str(acct.get("ReactionFormat", "")),
            delete=str(acct.get("DeleteFormat", "")),
        )
        self.gateways = frozenset(ctx.channels)
        self.seen_key = ctx.key("mb-seen")  # digests of what was received: one script with the events
        # the installation's mark on its posts (Extra.talkbridge), read at connect: a post of any
        # account of ours that comes back through a Matterbridge is an echo, never relayed again
        self.mark_key = installation_mark_key(ctx.key_prefix)
        self.mark = ""
        self.http: aiohttp.ClientSession | None = None
        self.pause = asyncio.sleep  # how the receive loop waits (a test records the waits instead)
        self.stable_seconds = STABLE_SECONDS
        self.unsaved: list[Any] = []  # what Matterbridge handed over and Redis did not take yet

    # config ------------------------------------------------------------------------
    @classmethod
    def check_account(cls, account: AccountConfig) -> list[str]:
        problems = url_problems(account, "URL")
        parts = urlsplit(str(account.get("URL", "")))
        if not problems and (parts.query or parts.fragment or parts.path.rstrip("/").endswith("/api")):
            problems.append(
                f'{account.name}.URL: "{account.get("URL")}" must be the base URL (the server, without /api or a query)'
            )
        return problems

    @classmethod
    def warn_account(cls, account: AccountConfig) -> list[str]:
        if not account.get("Token"):
            return [f"{account.name}: no Token: the Matterbridge api account must have none either (anyone may post)"]
        return []

    @classmethod
    def describe_account(cls, account: AccountConfig) -> str:
        base = str(account.get("URL", "")).rstrip("/")
        mode = str(account.get("Receive", "auto"))
        receives = {
            "auto": f"{base}/api/websocket, else /api/stream, else polls /api/messages",
            "websocket": f"{base}/api/websocket",
            "stream": f"{base}/api/stream",
            "poll": f"polls {base}/api/messages",
        }[mode]
        return f"receives {receives}; posts to {base}/api/message"

    # lifecycle -----------------------------------------------------------------------
    async def connect(self) -> None:
        await self.disconnect()
        redis = self.ctx.redis
        await redis.set(self.mark_key, os.urandom(8).hex(), nx=True)  # one mark for the installation's life
        self.mark = (await redis.get(self.mark_key) or b"").decode()
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=not self.skip_tls_verify),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout),
            headers={"Authorization": f"Bearer {self.token}"} if self.token else {},
        )

    async def disconnect(self) -> None:
        http, self.http = self.http, None
        if http is not None:
            await http.close()

    def _http(self) -> aiohttp.ClientSession:
        if self.http is None:
            raise TransientError("not connected")
        return self.http

    # sending -------------------------------------------------------------------------
    async def send(self, delivery: Delivery) -> str | None:
        body = post_body(delivery, self.mark, self.formats)
        if body is None:
            self.ctx.metrics.skipped.labels(self.name, f"matterbridge_{delivery.event.kind.value}").inc()
            return None
        what = f"POST /api/message into gateway {delivery.channel}"
        try:
            async with self._http().post(
                self.url + "/api/message", json=body, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as answer:  # fmt: skip
                status = answer.status
                detail = (await read_at_most(answer.content, 512)).decode("utf-8", "replace").strip()
                wait = retry_after_header(answer.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientConnectionError, OSError) as exc:
            # Matterbridge away (restarting, down): the delivery waits for it
            raise ServerUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None
        except aiohttp.ClientError as exc:  # an answer that is not HTTP (URL names another service): retried
            raise TransientError(f"{what}: the answer is not HTTP: {exc}") from None
        if status == 200:
            return synthetic_id(delivery)
        if wants_token(status, detail):
            raise AccountFailed(f"{what}: Matterbridge wants a Token (400 {detail})")
        if 300 <= status < 400:  # a post is not sent on to another URL: it may not be Matterbridge's
            raise PermanentError(f"{what}: {status}, a redirect (set URL to where it points)")
        raise error_for_status(status, f"{what}: {status} {detail}", wait)
