"""Matrix as a (bot) user account over matrix-nio: ``[matrix.NAME]``.

Matterbridge's ``matrix`` keys (``Server``, ``Login`` + ``Password`` or
``MxID`` + ``Token``, ``HTMLDisable``, ``NoHomeServerSuffix``,
``UseUserName``, ``KeepQuotedReply``…); the channel is a room id
(``!id:server``) or an alias (``#name:server``, resolved once and
remembered in Redis). See docs/matrix.md.

Login: once. The device id and access token live in Redis and are restored
at every start (``restore_login``), so a restart never adds a device. A
revoked token (``M_UNKNOWN_TOKEN``) logs in again with the same device id
when a password is configured — at most once per ``RetryMaxSeconds`` — and
otherwise (or when the password is refused too) fails the account: the
runner pauses it (``AccountFailed``), ``status`` says why, and the account
makes no request meanwhile.

Receiving: one ``/sync`` long poll. Its ``next_batch`` is written to Redis
*in the same script* as the events of that sync (beside the inbound stream,
in its Cluster slot; ``AdapterContext.commit_inbound``, fenced by the lease
token), so a restart resumes exactly after the last published sync. Where
a room's timeline is ``limited`` (more happened than a sync carries: the
bridge was down), the rest is paged back with ``/messages`` down to the
previous sync position, so everything arrives in order and once. The first
start skips history; a room joined later starts at the bridge's own join.
Invites are accepted for configured rooms only. The homeserver away
(network, 5xx, 429) is retried with capped, jittered backoff and shown as
degraded; nothing is lost because the token only moves with published
events.

Sending: ``m.room.message`` with Markdown as ``org.matrix.custom.html``
(unless ``HTMLDisable``), replies (``m.in_reply_to``), edits (``m.replace``
+ ``m.new_content``), redactions, reactions (``m.annotation``), and files
uploaded to the content repository and sent as ``m.image``/``m.video``/
``m.audio``/``m.file`` with ``info``. The transaction id of every request
is derived from the delivery's key, so a redelivery after a crash is the
same request and the homeserver drops the duplicate. ``M_LIMIT_EXCEEDED``
becomes ``RateLimited`` with the server's ``retry_after_ms``: the core parks
that room only.

Encrypted rooms are not decrypted: the room shows as failed (log, metric,
``status``), each encrypted event is relayed as a visible notice, and sends
into it are refused (dead-lettered with the reason) — never silently lost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import io
import logging
import mimetypes
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
import orjson
from nio import (
    AsyncClient,
    AsyncClientConfig,
    ErrorResponse,
    JoinError,
    LoginResponse,
    RoomMessagesResponse,
    RoomResolveAliasResponse,
    RoomSendResponse,
    SyncResponse,
    UploadResponse,
    WhoamiResponse,
)
from nio.api import MessageDirection

from adapters.checks import url_problems
from adapters.matrix.convert import markdown_to_html
from adapters.matrix.media import image_size, msgtype_for
from adapters.matrix.parse import HTML, Incoming, Media, Skip, parse_event
from bridge.adapter import (
    AccountFailed,
    Adapter,
    AdapterContext,
    CliCommand,
    Option,
    PermanentError,
    RateLimited,
    TransientError,
)
from bridge.bus import Write, inbound_key
from bridge.config import AccountConfig
from bridge.events import Attachment, Delivery, Event, EventKind
from bridge.receiver import Backoff, Receiver

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


def _event_id(*parts: object) -> str:
    """A stable event id per Matrix event: a sync published again yields the same ids."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def txn_id(key: str, part: int | str) -> str:
    """The transaction id of one request of a delivery: the same at every redelivery."""
    return f"tb{hashlib.sha256(key.encode()).hexdigest()[:40]}.{part}"


def _status(resp: Any) -> int:
    transport = getattr(resp, "transport_response", None)
    return int(getattr(transport, "status", 0) or 0)


def _errcode(resp: Any) -> str:
    return str(getattr(resp, "status_code", "") or "")


def _describe(resp: Any) -> str:
    return f"{_status(resp) or '?'} {_errcode(resp)} {str(getattr(resp, 'message', ''))[:200]}".strip()


def _retry_after(resp: Any) -> float | None:
    ms = getattr(resp, "retry_after_ms", None)
    return ms / 1000 if isinstance(ms, int | float) and ms >= 0 else None


def check_response(resp: Any, what: str) -> None:
    """Raise what an error answer means; return for a success."""
    if not isinstance(resp, ErrorResponse):
        return
    code, status = _errcode(resp), _status(resp)
    if code == "M_UNKNOWN_TOKEN" or (status == 401 and code in ("", "M_MISSING_TOKEN")):
        raise TokenRefused(f"{what}: {_describe(resp)}")
    if code == "M_LIMIT_EXCEEDED" or status == 429:
        raise Unavailable(f"{what}: rate limited ({_describe(resp)})", _retry_after(resp) or 5.0)
    if status >= 500 or status == 0:
        raise Unavailable(f"{what}: {_describe(resp)}", unreachable=True)
    raise PermanentError(f"{what}: the homeserver answered {_describe(resp)}")


class Matrix(Adapter):
    protocol = PROTOCOL
    options: ClassVar[dict[str, Option]] = {
        "Server": Option(str, required=True, help="the homeserver's client URL, e.g. https://matrix.example.org"),
        "Login": Option(str, default="", help="the bot's user name (with Password)"),
        "Password": Option(str, default="", secret=True, help="Login's password; used once, then the token"),
        "MxID": Option(str, default="", help="the bot's Matrix id, @bot:example.org (with Token)"),
        "Token": Option(str, default="", secret=True, help="an access token of MxID (instead of Login/Password)"),
        "HTMLDisable": Option(bool, default=False, help="send body only, no org.matrix.custom.html"),
        "NoHomeServerSuffix": Option(bool, default=False, help="show @alice:server as @alice"),
        "UseUserName": Option(bool, default=False, help="show senders by user id, not display name"),
        "KeepQuotedReply": Option(bool, default=False, help="keep the quoted reply fallback in relayed replies"),
        "SkipTLSVerify": Option(bool, default=False, help="do not verify the homeserver's certificate"),
        "Timeout": Option((int, float), default=30, above=0, help="seconds per request (a sync waits longer)"),
        "SyncTimeoutSeconds": Option(int, default=30, min=1, max=120, help="seconds the homeserver holds a sync"),
        "SyncTimelineLimit": Option(int, default=20, min=1, max=100, help="events per room in one sync"),
        "RetryMaxSeconds": Option((int, float), default=60, above=0, help="longest backoff while the server is away"),
        "BackfillLimit": Option(
            int, default=10000, min=0, help="events paged back per room after a gap (a longer gap is cut, loudly)"
        ),
    }

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        acct = ctx.account
        self.name = acct.name
        self.server = str(acct.get("Server", "")).rstrip("/")
        self.login = str(acct.get("Login", ""))
        self.password = str(acct.get("Password", ""))
        self.mxid = str(acct.get("MxID", ""))
        self.token = str(acct.get("Token", ""))
        self.html_disable = bool(acct.get("HTMLDisable", False))
        self.no_suffix = bool(acct.get("NoHomeServerSuffix", False))
        self.use_username = bool(acct.get("UseUserName", False))
        self.keep_quoted = bool(acct.get("KeepQuotedReply", False))
        self.verify = not bool(acct.get("SkipTLSVerify", False))
        self.timeout = float(acct.get("Timeout", 30))
        self.sync_timeout = int(acct.get("SyncTimeoutSeconds", 30))
        self.timeline_limit = int(acct.get("SyncTimelineLimit", 20))
        self.retry_max = float(acct.get("RetryMaxSeconds", 60))
        self.backfill_limit = int(acct.get("BackfillLimit", 10000))
        self.max_file = int(acct.get("MediaDownloadSize", 1_000_000))
        self.client: AsyncClient | None = None
        self.media: aiohttp.ClientSession | None = None
        self.user_id = self.mxid
        # Redis: the sync token and the joined rooms sit in the inbound stream's slot (one script with the events)
        self.stream = inbound_key(ctx.key_prefix, self.name)
        self.sync_key = "{" + self.stream + "}:matrix-sync"
        self.joined_key = "{" + self.stream + "}:matrix-joined"
        self.session_key = ctx.key("matrix-session")
        self.aliases_key = ctx.key("matrix-aliases")
        self.reactions_key = ctx.key("matrix-reactions")  # inbound reaction event -> (target, key)
        self.sent_reactions_key = ctx.key("matrix-sent-reactions")  # (room, target, key) -> our reaction event
        self.channels: list[str] = []
        self.room_of: dict[str, str] = {}  # configured channel -> room id
        self.channel_of: dict[str, str] = {}  # room id -> configured channel
        self.encrypted: set[str] = set()
        self._refused: str | None = None
        self._relogin_lock = asyncio.Lock()
        self._configured_joined = False  # the configured rooms joined since receive started
        self._last_login = -1e9  # monotonic time of the last login after a refused token
        self._rng = random.Random()
        # Cleared while the homeserver is away (the sync loop sets it again):
        # sends wait for it instead of spending their delivery attempts.
        self._reachable = asyncio.Event()
        self._reachable.set()
        self.pause: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._events_in = ctx.metrics.events_in.labels(self.name)

    # config ------------------------------------------------------------------------
    @classmethod
    def check_account(cls, account: AccountConfig) -> list[str]:
        problems = url_problems(account, "Server")
        login, password = account.get("Login", ""), account.get("Password", "")
        mxid, token = account.get("MxID", ""), account.get("Token", "")
        if token and not mxid:
            problems.append(f"{account.name}.MxID: is required with Token (the token's user, @bot:server)")
        if mxid and not (mxid.startswith("@") and ":" in mxid):
            problems.append(f'{account.name}.MxID: "{mxid}" is not a Matrix id like @bot:example.org')
        if login and not password:
            problems.append(f"{account.name}.Password: is required with Login")
        if not token and not login:
            problems.append(f"{account.name}: needs Login and Password, or MxID and Token")
        return problems

    @classmethod
    def cli_commands(cls) -> Sequence[CliCommand]:
        from adapters.matrix.register import COMMAND

        return (COMMAND,)

    # lifecycle -----------------------------------------------------------------------
    async def connect(self) -> None:
        nio_log = logging.getLogger("nio")
        if nio_log.level == logging.NOTSET:  # nio logs every event it handles at INFO
            nio_log.setLevel(logging.WARNING)
        config = AsyncClientConfig(
            max_limit_exceeded=0,  # a 429 comes back to us: the core parks that room only
            max_timeouts=0,  # network trouble too: our own capped backoff, not nio's loop
            request_timeout=self.timeout,
            encryption_enabled=False,
            store_sync_tokens=False,
        )
        user = self.mxid or self.login
        self.client = AsyncClient(self.server, user, config=config, ssl=None if self.verify else False)
        ctx = None if self.verify else ssl.create_default_context()
        if ctx is not None:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self.media = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
            connector=aiohttp.TCPConnector(ssl=ctx if ctx is not None else True),
        )
        self._refused = None
        if self.token:
            session = await self._stored_session()
            device = session.get("device_id", "") if session.get("user_id") == self.mxid else ""
            self.client.restore_login(self.mxid, device, self.token)
            self.user_id = self.mxid
            return
        session = await self._stored_session()
        if session.get("login") == self.login and session.get("server") == self.server and session.get("access_token"):
            self.client.restore_login(session["user_id"], session["device_id"], session["access_token"])
            self.user_id = session["user_id"]
            return
        await self._login(session.get("device_id") if session.get("login") == self.login else None)

    async def join(self, channel: str) -> None:
        if channel not in self.channels:
            self.channels.append(channel)
        await self.ctx.rooms.add(channel)

    async def disconnect(self) -> None:
        client, self.client = self.client, None
        media, self.media = self.media, None
        if client is not None:
            await client.close()
        if media is not None:
            await media.close()

    def _client(self) -> AsyncClient:
        if self.client is None:
            raise TransientError("not connected")
        return self.client

    # the session -----------------------------------------------------------------------
    async def _stored_session(self) -> dict[str, str]:
        raw = await self.ctx.redis.hgetall(self.session_key)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def _login(self, device_id: str | None) -> None:
        """Password login, once (with the device id we had, so it stays one device)."""
        client = self._client()
        if device_id:
            client.device_id = device_id
        try:
            resp = await client.login(self.password, device_name=DEVICE_NAME)
        except TRANSPORT_ERRORS as exc:
            raise ConnectionError(f"login: homeserver unreachable: {exc}") from exc
        if not isinstance(resp, LoginResponse):
            status, code = _status(resp), _errcode(resp)
            if status in (0, 429) or status >= 500 or code == "M_LIMIT_EXCEEDED":
                raise ConnectionError(f"login: {_describe(resp)}")
            await self._refuse(f"login of {self.login} refused: {_describe(resp)}")
            return
        self.user_id = resp.user_id
        await self.ctx.redis.hset(
            self.session_key,
            mapping={"user_id": resp.user_id, "device_id": resp.device_id, "access_token": resp.access_token,
                     "login": self.login, "server": self.server},
        )  # fmt: skip
        self.ctx.log.info("%s: logged in as %s, device %s (kept in Redis)", self.name, resp.user_id, resp.device_id)

    async def _refuse(self, why: str) -> None:
        if self._refused is None:
            self.ctx.log.critical("%s: ALERT: credentials refused: %s; the account stops", self.name, why)
        self._refused = why
        await self.ctx.credentials_refused(why)  # no probe of its own: AccountFailed, the runner pauses

    async def _token_refused(self, why: str) -> None:
        """M_UNKNOWN_TOKEN: log in again (same device) when we can and have
        not just done so; otherwise the account fails (no request loop)."""
        async with self._relogin_lock:
            if self._refused is not None:
                raise AccountFailed(self._refused)
            if self.token or not self.password:
                await self._refuse(f"{why}; the configured Token is no longer valid: set a new one")
                raise AccountFailed(self._refused or why)
            if time.monotonic() - self._last_login < self.retry_max:
                await self._refuse(f"{why}, again right after logging in")
                raise AccountFailed(self._refused or why)
            self.ctx.log.error("%s: access token refused (%s); logging in again (same device)", self.name, why)
            session = await self._stored_session()
            await self.ctx.redis.hdel(self.session_key, "access_token")
            self._last_login = time.monotonic()
            try:
                await self._login(session.get("device_id"))
            except ConnectionError as exc:
                self._last_login = -1e9  # not refused: the next refusal may try again
                raise Unavailable(str(exc)) from None
            if self._refused is not None:
                raise AccountFailed(self._refused)

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """One nio request: a refused token logs in again and repeats it once;
        the network and error answers become Unavailable/PermanentError."""
        for attempt in (0, 1):
            if self._refused is not None:
                raise AccountFailed(self._refused)
            token = self._client().access_token
            try:
                resp = await call()
            except TRANSPORT_ERRORS as exc:
                raise Unavailable(
                    f"{what}: homeserver unreachable: {type(exc).__name__}: {exc}", unreachable=True
                ) from None
            try:
                check_response(resp, what)
                return resp
            except TokenRefused as exc:
                if attempt == 0 and self._client().access_token != token:
                    continue  # another request logged in again meanwhile
                if attempt == 1:
                    await self._refuse(f"{exc}, with the token just obtained")
                    raise AccountFailed(self._refused or str(exc)) from None
                await self._token_refused(str(exc))
        raise AccountFailed(f"{what}: the homeserver refused the new token too")

    # rooms ------------------------------------------------------------------------------
    async def _room_id(self, channel: str) -> str:
        """The room id of a configured channel (an alias is resolved once, then remembered)."""
        room = self.room_of.get(channel)
        if room is not None:
            return room
        if channel.startswith("!"):
            room = channel
        elif channel.startswith("#"):
            raw = await self.ctx.redis.hget(self.aliases_key, channel)
            if raw is not None:
                room = raw.decode()
            else:
                resp = await self._call(f"resolve {channel}", lambda: self._client().room_resolve_alias(channel))
                if not isinstance(resp, RoomResolveAliasResponse):
                    raise PermanentError(f"alias {channel} did not resolve")
                room = resp.room_id
                await self.ctx.redis.hset(self.aliases_key, channel, room)
                self.ctx.log.info("%s: alias %s is room %s (remembered)", self.name, channel, room)
        else:
            raise PermanentError(f"channel {channel!r} is neither a room id (!…) nor an alias (#…)")
        self.room_of[channel] = room
        self.channel_of[room] = channel
        return room

    async def _resolve_rooms(self) -> None:
        for channel in self.channels:
            try:
                await self._room_id(channel)
            except (Unavailable, PermanentError) as exc:
                self.ctx.log.error("%s: ALERT: room %s: %s", self.name, channel, exc)
                await self.ctx.room_failed(channel, str(exc), self.retry_max)  # tried again at the next start
            else:
                await self.ctx.room_recovered(channel)

    async def _join_configured(self, joined: set[str]) -> None:
        for room in list(self.channel_of):
            if room in joined:
                continue
            try:
                resp = await self._call(f"join {room}", lambda room=room: self._client().join(room))
            except (Unavailable, PermanentError) as exc:
                self.ctx.log.warning(
                    "%s: not in room %s (%s); it is joined when the bot is invited", self.name, room, exc
                )
                continue
            if not isinstance(resp, JoinError):
                self.ctx.log.info("%s: joined room %s", self.name, room)

    # receiving --------------------------------------------------------------------------
    def _filter(self) -> dict[str, Any]:
        return {
            "presence": {"types": []},
            "account_data": {"types": []},
            "room": {
                "timeline": {"limit": self.timeline_limit},
                "state": {"lazy_load_members": True},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
            },
        }

    async def receive(self) -> None:
        """The sync loop: ``bridge.receiver.Receiver`` keeps the backoff while
        the homeserver is away (network, 5xx, 429) and reports it."""
        if self._refused is not None:
            raise AccountFailed(self._refused)
        await self._resolve_rooms()
        self._configured_joined = False
        receiver = Receiver(
            self.ctx, "sync", room=None, transient=(Unavailable,),
            backoff=Backoff(1.0, self.retry_max, self._rng),
            pause=lambda seconds: self.pause(seconds),  # looked up at each wait: a test swaps it
            retry_after=lambda exc: exc.retry_after if isinstance(exc, Unavailable) else None,
        )  # fmt: skip
        await receiver.run(self._sync_once)

    async def _sync_once(self) -> None:
        """One sync, its events committed with its next_batch; the
        homeserver away clears ``_reachable`` (sends wait for it), an answer sets it."""
        try:
            since = await self.ctx.redis.get(self.sync_key)
            if since is None:
                await self._first_sync()
                return
            known = {m.decode() for m in await self.ctx.redis.smembers(self.joined_key)}
            if not self._configured_joined:
                await self._join_configured(known)
                self._configured_joined = True
            resp = await self._sync(since.decode(), self.sync_timeout * 1000)
            events, joined = await self._collect(resp, since.decode(), known)
            await self._commit(events, resp.next_batch, joined - known)
            await self._invites(resp)
        except Unavailable as exc:
            if exc.unreachable:
                self._reachable.clear()
            raise
        self._reachable.set()

    async def _sync(self, since: str | None, wait_ms: int) -> SyncResponse:
        client = self._client()
        resp = await self._call(
            "sync", lambda: client.sync(timeout=wait_ms, since=since, sync_filter=self._filter(), full_state=False)
        )
        if not isinstance(resp, SyncResponse):
            raise Unavailable(f"sync: not a sync answer: {_describe(resp)}")
        for room_id, room in client.rooms.items():
            if room.encrypted and room_id not in self.encrypted:
                self.encrypted.add(room_id)
                if room_id in self.channel_of:
                    await self._encrypted_room(room_id)
        return resp

    async def _encrypted_room(self, room_id: str) -> None:
        why = "end-to-end encrypted: talkbridge does not decrypt (relayed as notices) and does not send into it"
        self.ctx.log.error("%s: ALERT: room %s (%s) is %s", self.name, self.channel_of[room_id], room_id, why)
        await self.ctx.room_failed(self.channel_of[room_id], why, 3600)

    async def _first_sync(self) -> None:
        """First start: where the rooms are now, without their history."""
        resp = await self._sync(None, 0)
        joined = set(resp.rooms.join)
        writes = [Write.setnx(self.sync_key, resp.next_batch)]
        if joined:
            writes.append(Write.sadd(self.joined_key, *joined))
        await self.ctx.commit_inbound([], writes)
        self.ctx.log.info("%s: first start: relaying from now on (history skipped)", self.name)
        await self._join_configured(joined)
        await self._invites(resp)

    async def _invites(self, resp: SyncResponse) -> None:
        for room_id in resp.rooms.invite:
            if room_id in self.channel_of:
                try:
                    await self._call(f"join {room_id}", lambda r=room_id: self._client().join(r))
                except (Unavailable, PermanentError) as exc:
                    self.ctx.log.error("%s: invited to room %s but could not join: %s", self.name, room_id, exc)
                    continue
                self.ctx.log.info("%s: invited to room %s: joined", self.name, room_id)
            else:
                self.ctx.log.info("%s: invited to room %s, which no gateway names: not joined", self.name, room_id)

    async def _collect(self, resp: SyncResponse, since: str, known: set[str]) -> tuple[list[Event], set[str]]:
        events: list[Event] = []
        local_reactions: dict[str, tuple[str, str]] = {}
        for room_id, info in resp.rooms.join.items():
            channel = self.channel_of.get(room_id)
            if channel is None:
                continue
            sources = [getattr(e, "source", None) for e in info.timeline.events]
            if room_id not in known:
                # newly joined: only what happened after our own join
                for i in range(len(sources) - 1, -1, -1):
                    src = sources[i]
                    if (
                        isinstance(src, dict)
                        and src.get("type") == "m.room.member"
                        and src.get("state_key") == self.user_id
                    ):
                        sources = sources[i + 1 :]
                        break
                else:
                    sources = sources if not info.timeline.limited else []
            elif info.timeline.limited and info.timeline.prev_batch:
                sources = await self._page_back(room_id, info.timeline.prev_batch, since) + sources
            for src in sources:
                events.extend(await self._events(channel, room_id, src, local_reactions))
        if local_reactions:
            pipe = self.ctx.redis.pipeline(transaction=False)
            for rid, (target, key) in local_reactions.items():
                pipe.hset(self.reactions_key, rid, orjson.dumps([target, key]))
            pipe.expire(self.reactions_key, REACTIONS_TTL)
            await pipe.execute()
        return events, set(resp.rooms.join)

    async def _page_back(self, room_id: str, start: str, until: str) -> list[Any]:
        """What a limited timeline left out: /messages backwards from the
        sync's prev_batch to the previous sync position, oldest first."""
        chunks: list[Any] = []
        token = start
        while len(chunks) < self.backfill_limit:
            resp = await self._call(
                f"messages of {room_id}",
                lambda t=token: self._client().room_messages(
                    room_id, start=t, end=until, direction=MessageDirection.back, limit=PAGE
                ),
            )
            if not isinstance(resp, RoomMessagesResponse):
                raise Unavailable(f"messages of {room_id}: {_describe(resp)}")
            chunks.extend(getattr(e, "source", None) for e in resp.chunk)
            if not resp.chunk or not resp.end or resp.end == token:
                break
            token = resp.end
        else:
            self.ctx.log.error(
                "%s: ALERT: room %s: more than BackfillLimit (%d) events while away; the oldest are not relayed",
                self.name, room_id, self.backfill_limit,
            )  # fmt: skip
        if chunks:
            self.ctx.log.info("%s: room %s: %d events paged back after a gap", self.name, room_id, len(chunks))
        chunks.reverse()
        return chunks

    def _display(self, room_id: str, sender: str) -> str:
        name = sender[1:]
        if not self.use_username and self.client is not None:
            room = self.client.rooms.get(room_id)
            user = room.users.get(sender) if room is not None else None
            display = getattr(user, "display_name", None) if user is not None else None
            if isinstance(display, str) and display.strip():
                name = display.strip()[:255]
        if self.no_suffix and ":" in name:
            name = name.split(":", 1)[0]
        return name

    async def _events(
        self, channel: str, room_id: str, source: Any, local_reactions: dict[str, tuple[str, str]]
    ) -> list[Event]:
        parsed = parse_event(source, self.user_id, keep_quoted=self.keep_quoted)
        if isinstance(parsed, Skip):
            if parsed.bad:
                eid = source.get("event_id") if isinstance(source, dict) else None
                self.ctx.log.warning("%s: room %s: event %.80r not relayed: %s", self.name, channel, eid, parsed.reason)
                self.ctx.metrics.skipped.labels(self.name, "bad_event").inc()
            return []
        p: Incoming = parsed
        name = self._display(room_id, p.sender)
        base: dict[str, Any] = {
            "account": self.name, "channel": channel, "sender_id": p.sender, "sender_name": name,
            "origin": [f"{self.name}/{channel}"], "timestamp": p.timestamp or time.time(),
            "id": _event_id(self.name, room_id, p.event_id),
        }  # fmt: skip
        if p.kind == EventKind.REACTION:
            local_reactions[p.event_id] = (p.target_id or "", p.reaction or "")
            return [Event(kind=EventKind.REACTION, target_id=p.target_id, reaction=p.reaction, **base)]
        if p.kind == EventKind.DELETE:
            target = p.target_id or ""
            reacted = local_reactions.get(target)
            if reacted is None:
                raw = await self.ctx.redis.hget(self.reactions_key, target)
                if raw:
                    with contextlib.suppress(ValueError, TypeError):
                        t, k = orjson.loads(raw)
                        reacted = (str(t), str(k))
            if reacted is not None:
                return [Event(kind=EventKind.UNREACTION, target_id=reacted[0], reaction=reacted[1], **base)]
            return [Event(kind=EventKind.DELETE, target_id=target, **base)]
        if p.kind == EventKind.EDIT:
            return [Event(kind=EventKind.EDIT, text=p.text, target_id=p.target_id, **base)]
        event = Event(kind=EventKind.MESSAGE, text=p.text, native_id=p.event_id, reply_to=p.reply_to, **base)
        if p.msgtype == "m.emote":
            event.action = True
        if p.encrypted:
            self.ctx.metrics.skipped.labels(self.name, "encrypted").inc()
            self.ctx.log.error("%s: room %s: encrypted event %s from %s relayed as a notice (not decrypted)",
                               self.name, channel, p.event_id, p.sender)  # fmt: skip
            if room_id not in self.encrypted:
                self.encrypted.add(room_id)
                await self._encrypted_room(room_id)
        if p.media is not None:
            event.attachments.append(await self._download(p.media))
        return [event]

    async def _download(self, media: Media) -> Attachment:
        """The file through the authenticated media API, within MediaDownloadSize."""
        att = Attachment(name=media.name, mime=media.mime, size=media.size)
        if media.size is not None and media.size > self.max_file:
            self.ctx.log.info("%s: file %s (%d bytes) is over MediaDownloadSize: not fetched", self.name, media.name,
                              media.size)  # fmt: skip
            return att
        if self.media is None or self.client is None:
            return att
        url = f"{self.server}{MEDIA_API}/download/{quote(media.server)}/{quote(media.media_id)}"
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        try:
            async with self.media.get(url, headers=headers, params={"allow_redirect": "true"}) as answer:
                if answer.status != 200:
                    self.ctx.log.warning("%s: could not fetch %s (%s): %d", self.name, media.name, media.mxc,
                                         answer.status)  # fmt: skip
                    return att
                data = bytearray()
                async for chunk in answer.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > self.max_file:
                        self.ctx.log.info("%s: file %s is over MediaDownloadSize: not fetched", self.name, media.name)
                        return att
        except TRANSPORT_ERRORS as exc:
            raise Unavailable(f"download {media.mxc}: {exc}") from None
        att.data_b64 = base64.b64encode(bytes(data)).decode()
        att.size = len(data)
        return att

    async def _commit(self, events: list[Event], next_batch: str, new_rooms: set[str]) -> None:
        """The sync's events and its next_batch (and newly joined rooms), together, fenced."""
        writes = [Write.set(self.sync_key, next_batch)]
        if new_rooms:
            writes.append(Write.sadd(self.joined_key, *new_rooms))
        await self.ctx.commit_inbound(events, writes)
        if events:
            self._events_in.inc(len(events))

    # sending -----------------------------------------------------------------------------
    async def send(self, delivery: Delivery) -> str | None:
        """One delivery. While the homeserver is away (a restart) it waits
        for it — the sync loop notices its return; at least one try per
        RetryMaxSeconds — rather than spend the core's delivery attempts and
        dead-letter messages an outage should only delay."""
        while True:
            try:
                return await self._send(delivery)
            except Unavailable as exc:
                if exc.retry_after is not None:
                    raise RateLimited(str(exc), exc.retry_after) from None
                if not exc.unreachable:
                    raise TransientError(str(exc)) from None
                self._reachable.clear()
                self.ctx.log.warning("%s: %s; the delivery waits for the homeserver", self.name, exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.retry_max):
                        await self._reachable.wait()
                await self.ctx.check_fence()  # waited: still the account's owner?

    async def _send(self, delivery: Delivery) -> str | None:
        room = await self._room_id(delivery.channel)
        if room in self.encrypted:
            raise PermanentError(f"room {delivery.channel} is end-to-end encrypted: talkbridge does not send there")
        kind = delivery.event.kind
        if kind == EventKind.EDIT:
            return await self._edit(room, delivery)
        if kind == EventKind.DELETE:
            return await self._redact(room, delivery, delivery.target_id or "", "0")
        if kind in (EventKind.REACTION, EventKind.UNREACTION):
            return await self._react(room, delivery)
        if kind in (EventKind.JOIN, EventKind.LEAVE, EventKind.OTHER):
            return await self._post(room, delivery, notice=True)
        return await self._post(room, delivery)

    def _content(self, delivery: Delivery, text: str, notice: bool = False) -> dict[str, Any]:
        event = delivery.event
        body = delivery.username + text
        msgtype = "m.emote" if event.action else "m.notice" if notice else "m.text"
        content: dict[str, Any] = {"msgtype": msgtype, "body": body}
        if not self.html_disable:
            formatted = markdown_to_html(text)
            if formatted is not None:
                content["format"] = HTML
                content["formatted_body"] = html.escape(delivery.username, quote=False) + formatted
        return content

    async def _room_send(self, room: str, etype: str, content: dict[str, Any], txn: str) -> str:
        client = self._client()
        resp = await self._call(
            f"send to {room}",
            lambda: client.room_send(room, etype, content, tx_id=txn, ignore_unverified_devices=True),
        )
        if not isinstance(resp, RoomSendResponse):
            raise Unavailable(f"send to {room}: {_describe(resp)}")
        return resp.event_id

    async def _post(self, room: str, delivery: Delivery, notice: bool = False) -> str | None:
        text = delivery.text
        files: list[tuple[Attachment, bytes]] = []
        for att in delivery.event.attachments:
            data = _decoded(att)
            if data is not None:
                files.append((att, data))
            else:
                line = f"{att.name}: {att.url}" if att.url else f"[file {att.name}]"
                text += ("\n" if text.strip() else "") + line
        first: str | None = None
        relates = {"m.in_reply_to": {"event_id": delivery.reply_to}} if delivery.reply_to else None
        if text.strip() or not files:
            content = self._content(delivery, text, notice)
            if relates:
                content["m.relates_to"] = relates
            first = await self._room_send(room, "m.room.message", content, txn_id(delivery.key, 0))
        for i, (att, data) in enumerate(files, start=1):
            caption = None if first is not None else delivery.username.strip() or None
            event_id = await self._send_file(room, delivery, i, att, data, caption, relates if first is None else None)
            first = first or event_id
        return first

    async def _send_file(
        self, room: str, delivery: Delivery, part: int, att: Attachment, data: bytes, caption: str | None,
        relates: dict[str, Any] | None,
    ) -> str:  # fmt: skip
        client = self._client()
        name = att.name or "file"
        mime = att.mime or "application/octet-stream"
        if mime == "application/octet-stream":  # an api client's file: its name says more
            mime = mimetypes.guess_type(name, strict=False)[0] or mime
        resp = await self._call(
            f"upload {name}",
            lambda: client.upload(io.BytesIO(data), content_type=mime, filename=name, filesize=len(data)),
        )
        upload = resp[0] if isinstance(resp, tuple) else resp
        check_response(upload, f"upload {name}")
        if not isinstance(upload, UploadResponse):
            raise Unavailable(f"upload {name}: {_describe(upload)}")
        msgtype = msgtype_for(mime)
        info: dict[str, Any] = {"mimetype": mime, "size": len(data)}
        if msgtype == "m.image":
            size = image_size(data)
            if size is not None:
                info["w"], info["h"] = size
        content: dict[str, Any] = {"msgtype": msgtype, "body": name, "filename": name, "url": upload.content_uri,
                                   "info": info}  # fmt: skip
        if caption:
            content["body"] = f"{caption} {name}"
        if relates:
            content["m.relates_to"] = relates
        return await self._room_send(room, "m.room.message", content, txn_id(delivery.key, part))

    async def _edit(self, room: str, delivery: Delivery) -> str | None:
        target = delivery.target_id or ""
        if not target.startswith("$"):
            raise PermanentError(f"edit needs a Matrix event id (got {target!r})")
        new = self._content(delivery, delivery.text)
        content = dict(new)
        content["body"] = "* " + new["body"]
        if "formatted_body" in new:
            content["formatted_body"] = "* " + new["formatted_body"]
        content["m.new_content"] = new
        content["m.relates_to"] = {"rel_type": "m.replace", "event_id": target}
        await self._room_send(room, "m.room.message", content, txn_id(delivery.key, 0))
        return None

    async def _redact(self, room: str, delivery: Delivery, target: str, part: str) -> str | None:
        if not target.startswith("$"):
            raise PermanentError(f"redaction needs a Matrix event id (got {target!r})")
        client = self._client()
        resp = await self._call(
            f"redact in {room}", lambda: client.room_redact(room, target, tx_id=txn_id(delivery.key, part))
        )
        if isinstance(resp, ErrorResponse):
            raise Unavailable(f"redact in {room}: {_describe(resp)}")
        return None

    async def _react(self, room: str, delivery: Delivery) -> str | None:
        target, key = delivery.target_id or "", delivery.event.reaction or ""
        if not target.startswith("$") or not key:
            raise PermanentError(f"reaction needs an emoji and a Matrix event id (got {target!r})")
        field = f"{room}\x1f{target}\x1f{key}"
        if delivery.event.kind == EventKind.UNREACTION:
            raw = await self.ctx.redis.hget(self.sent_reactions_key, field)
            if raw is None:
                self.ctx.metrics.skipped.labels(self.name, "unreaction_unknown").inc()
                return None
            await self._redact(room, delivery, raw.decode(), "0")
            await self.ctx.redis.hdel(self.sent_reactions_key, field)
            return None
        content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}
        try:
            event_id = await self._room_send(room, "m.reaction", content, txn_id(delivery.key, 0))
        except PermanentError as exc:
            if "M_DUPLICATE_ANNOTATION" in str(exc):
                return None  # the bridge already reacted with this emoji
            raise
        pipe = self.ctx.redis.pipeline(transaction=False)
        pipe.hset(self.sent_reactions_key, field, event_id)
        pipe.expire(self.sent_reactions_key, REACTIONS_TTL)
        await pipe.execute()
        return None


def _decoded(att: Attachment) -> bytes | None:
    if not att.data_b64:
        return None
    try:
        return base64.b64decode(att.data_b64, validate=True)
    except ValueError:
        return None


__all__ = ["Matrix", "WhoamiResponse", "check_response", "txn_id"]
