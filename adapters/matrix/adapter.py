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

Encrypted rooms (``Encryption``, on by default) are bridged like others:
events decrypted, sends encrypted, the device's keys kept in Redis so a
restart or a takeover is the same device (crypto.py, docs/matrix.md).
With ``Encryption = false`` an encrypted room shows as failed (log, metric,
``status``), each encrypted event is relayed as a visible notice, and sends
into it are refused (dead-lettered with the reason) — never silently lost.

The class is split along its seams into mixins: session.py (login, the
refused token, every request, the configured rooms), receiving.py (the
sync loop), inbound.py (Matrix event -> events) and sending.py; common.py
holds what they share.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

import aiohttp
from nio import AsyncClient, AsyncClientConfig, WhoamiResponse

from adapters.checks import url_problems
from adapters.matrix.common import PROTOCOL, check_response, txn_id
from adapters.matrix.crypto import Crypto
from adapters.matrix.inbound import Inbound
from adapters.matrix.receiving import Receiving
from adapters.matrix.sending import Sending
from adapters.matrix.session import Session
from bridge.adapter import AccountFailed, Adapter, AdapterContext, CliCommand, Option, TransientError
from bridge.config import AccountConfig
from bridge.keys import inbound_key


class Matrix(Session, Receiving, Inbound, Sending, Adapter):
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
        "Encryption": Option(bool, default=True, help="decrypt and encrypt in end-to-end encrypted rooms"),
        "BlacklistDevices": Option(
            list, default=(), help='devices never given room keys: "@user:server" (all theirs) or "@user:server DEVICE"'
        ),
        "UndecryptableSeconds": Option(
            (int, float), default=60, above=0, help="how long an event waits for its room key before it is a notice"
        ),
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
        self.encryption = bool(acct.get("Encryption", True))
        self.undecryptable_after = float(acct.get("UndecryptableSeconds", 60))
        self.blacklist = tuple(str(entry).split() for entry in acct.get("BlacklistDevices", ()) or ())
        self.client: AsyncClient | None = None
        self.media: aiohttp.ClientSession | None = None
        self.user_id = self.mxid
        # Redis: the sync token and the joined rooms sit in the inbound stream's slot (one script with the events)
        self.stream = inbound_key(ctx.key_prefix, self.name)
        self.sync_key = ctx.key("matrix-sync")  # committed with the events: the stream's Cluster slot
        self.joined_key = ctx.key("matrix-joined")
        self.session_key = ctx.key("matrix-session")
        self.aliases_key = ctx.key("matrix-aliases")
        self.reactions_key = ctx.key("matrix-reactions")  # inbound reaction event -> (target, key)
        self.sent_reactions_key = ctx.key("matrix-sent-reactions")  # (room, target, key) -> our reaction event
        # the device's Olm account and sessions, and events waiting for their keys (crypto.py): fenced writes
        self.crypto = Crypto(self.name, ctx.key("matrix-crypto"), ctx.key("matrix-undecrypted"))
        self.channels: list[str] = []
        self.room_of: dict[str, str] = {}  # configured channel -> room id
        self.channel_of: dict[str, str] = {}  # room id -> configured channel
        self.encrypted: set[str] = set()
        self.rotation: dict[str, tuple[int | None, int | None]] = {}  # room -> its Megolm rotation (ms, messages)
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
        for entry in account.get("BlacklistDevices", ()) or ():
            parts = str(entry).split()
            if not parts or len(parts) > 2 or not parts[0].startswith("@") or ":" not in parts[0]:
                problems.append(
                    f'{account.name}.BlacklistDevices: "{entry}" is not "@user:server" or "@user:server DEVICE"'
                )
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
            encryption_enabled=self.encryption,  # the store is ours (crypto.py): no store_path, no file
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
            # not restore_login: with nio's e2e extra it wants a device id, which a Token may not have
            self.client.user_id, self.client.device_id, self.client.access_token = self.mxid, device, self.token
            self.user_id = self.mxid
            return  # the crypto store when receiving or sending starts (_ensure_crypto): whoami is a request
        session = await self._stored_session()
        if session.get("login") == self.login and session.get("server") == self.server and session.get("access_token"):
            self.client.restore_login(session["user_id"], session["device_id"], session["access_token"])
            self.user_id = session["user_id"]
        else:
            await self._login(session.get("device_id") if session.get("login") == self.login else None)
        await self._load_crypto()

    async def _ensure_crypto(self) -> None:
        """The device's Olm machine, before anything is decrypted or sent:
        loaded at connect after a login, here for a Token (its device, by whoami)."""
        client = self._client()
        if not self.encryption or client.olm is not None:
            return
        if self.token:
            await self._token_device()
        await self._load_crypto()

    async def _token_device(self) -> None:
        """The device of a configured Token (whoami), kept like a login's."""
        client = self._client()
        resp = await self._call("whoami", client.whoami)
        device = getattr(resp, "device_id", None)
        if not isinstance(resp, WhoamiResponse) or not device:
            raise AccountFailed(f"{self.name}: encryption needs the Token's device id, which whoami does not say")
        client.device_id = device
        await self.ctx.redis.hset(self.session_key, mapping={"user_id": self.mxid, "device_id": device})

    async def _load_crypto(self) -> None:
        """The device's Olm account from Redis (or a new one, the first time)."""
        client = self.client
        if not self.encryption or client is None or self._refused is not None or not client.device_id:
            return
        raw, waiting = await self.ctx.redis.mget(self.crypto.snapshot_key, self.crypto.pending_key)
        try:
            new = self.crypto.load(client, raw)
        except AccountFailed as exc:  # connect fails (and is retried, never with a new device): say it loudly
            self.ctx.log.critical("%s: ALERT: %s", self.name, exc)
            await self.disconnect()
            raise
        self.crypto.restore_pending(waiting)
        what = "a new Olm account (kept in Redis)" if new else "its Olm account restored from Redis"
        self.ctx.log.info("%s: device %s, %s", self.name, client.device_id, what)

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


__all__ = ["Matrix", "WhoamiResponse", "check_response", "txn_id"]
