"""Nextcloud Talk as a user account (or a guest): ``[nctalk.NAME]``.

Matterbridge's ``nctalk`` keys (``Server``, ``Login``, ``Password``,
``GuestSuffix``, ``SeparateDisplayName``, ``SkipTLSVerify``…); the channel is
the room token, or ``*``: every group and public conversation the user is
in, read from Talk's room list every ``RoomsRefreshSeconds`` (rooms joined
are polled and delivered to, rooms left dropped). See docs/talk-user.md.

Receiving: one long poll per room (``GET chat/{token}?lookIntoFuture=1``).
The room's cursor (``X-Chat-Last-Given``) lives in Redis beside the account's
inbound stream and is written *in the same script* as the events of the page
(``AdapterContext.commit_inbound``, fenced by the lease token): a page is
published and passed together or not at all, so a restart resumes exactly
where the last page ended. A room seen for the first time
starts at its newest message (or ``Backfill`` messages before it). A room
that fails (401 aside: 403, 404, 429, 5xx, the network, an answer that is
not Talk's) is retried with capped, jittered exponential backoff — a 429's
``Retry-After`` honoured — and shown as failed (log, metric, ``status``),
never given up; the other rooms are untouched. A refused password (401)
stops every poll and send of the account at once, so Nextcloud's
brute-force counter sees one burst (at most a request per room and send in
flight), not a loop. The account then makes one request per
``RefusedRetrySeconds`` (``GET capabilities``) and resumes polling and
sending as soon as one is accepted: a password fixed on the server is
picked up by the next probe, a fixed config by a restart. (It does not raise
``AccountFailed`` for the runner to pause on: the runner's pause is fixed and
would hold the sends for it even after the receive side came back.)

Sending: ``POST chat/{token}`` with ``replyTo`` and a ``referenceId`` per
piece; Talk answers with the message, so every copy's id is recorded and
replies, edits (``PUT``), deletions (``DELETE``) and reactions find it. What
the server cannot do (an edit before Talk 19 or past 24 h, a deletion past
Talk 18's 6 h) becomes a short visible reply instead of nothing. Files are
uploaded over WebDAV into the account's ``Talk/`` folder and shared into the
room (``shareType=10``). After a restart, the first delivery to each room
(and any retry) first looks for its ``referenceId`` in the room's recent
messages, so a post Talk stored just before a crash is not made twice.

Modelled on Talk 19 (Nextcloud 29, ../shared/reference/protocols.md) and
spreed's sources for Talk 17 to 22 (capabilities decide edits, deletions and
captions).

The class is split along its seams into mixins: credentials.py (the
refused password), polling.py (receiving), inbound.py (Talk message ->
events) and sending.py; common.py holds what they share.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import ClassVar

from adapters.checks import url_problems
from adapters.nctalk.common import PROTOCOL, WILDCARD, Refused
from adapters.nctalk.credentials import Credentials
from adapters.nctalk.inbound import Inbound
from adapters.nctalk.polling import Polling
from adapters.nctalk.sending import Sending
from adapters.talk.chat import Capabilities
from adapters.talk.client import TalkClient
from adapters.talk.common import MAX_CHAT_LENGTH
from bridge.adapter import Adapter, AdapterContext, Option, TransientError
from bridge.config import AccountConfig
from bridge.keys import inbound_key


class TalkUser(Credentials, Polling, Inbound, Sending, Adapter):
    protocol = PROTOCOL
    options: ClassVar[dict[str, Option]] = {
        "Server": Option(str, required=True, help="Nextcloud base URL, e.g. https://cloud.example.com"),
        "Login": Option(str, default="", help="the account's user; empty: join public rooms as a guest"),
        "Password": Option(str, default="", secret=True, help="an app password of Login"),
        "GuestSuffix": Option(str, default=" (Guest)", help="appended to the names of Talk guests"),
        "SeparateDisplayName": Option(
            bool, default=False, help="send the nick as actorDisplayName only (guests, Talk's bridge-bot user)"
        ),
        "SkipTLSVerify": Option(bool, default=False, help="do not verify the server's certificate"),
        "Timeout": Option((int, float), default=15, above=0, help="seconds per request (a long poll waits longer)"),
        "PollTimeout": Option(int, default=30, min=1, max=30, help="seconds Talk holds a long poll (at most 30)"),
        "Backfill": Option(
            int, default=0, min=0, max=200, help="messages a room seen for the first time relays from before"
        ),
        "RoomRetryMinSeconds": Option((int, float), default=1, above=0, help="first backoff of a failing room"),
        "RoomRetryMaxSeconds": Option((int, float), default=300, above=0, help="longest backoff of a failing room"),
        "MaxAnswerBytes": Option(int, default=64 << 20, min=1 << 16, help="largest answer read from Talk"),
        "RoomsRefreshSeconds": Option(
            (int, float), default=300, above=0, help="with a channel of *: seconds between reads of the room list"
        ),
        "RefusedRetrySeconds": Option(
            (int, float), default=900, above=0, help="after a 401: seconds between the account's probes (one request)"
        ),
    }

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        acct = ctx.account
        self.name = acct.name
        self.server = str(acct.get("Server", "")).rstrip("/")
        self.login = str(acct.get("Login", ""))
        self.password = str(acct.get("Password", ""))
        self.guest = not self.login
        self.guest_suffix = str(acct.get("GuestSuffix", " (Guest)"))
        self.separate_name = bool(acct.get("SeparateDisplayName", False))
        self.verify = not bool(acct.get("SkipTLSVerify", False))
        self.timeout = float(acct.get("Timeout", 15))
        self.poll_timeout = int(acct.get("PollTimeout", 30))
        self.backfill = int(acct.get("Backfill", 0))
        self.retry_min = float(acct.get("RoomRetryMinSeconds", 1))
        self.retry_max = max(self.retry_min, float(acct.get("RoomRetryMaxSeconds", 300)))
        self.max_answer = int(acct.get("MaxAnswerBytes", 64 << 20))
        self.max_file = int(acct.get("MediaDownloadSize", 1_000_000))
        self.rooms: list[str] = []  # the configured rooms
        # A channel of "*": every group and public conversation the user is in, read from Talk
        self.all_rooms = WILDCARD in ctx.sends_into.values()
        self.rooms_refresh = float(acct.get("RoomsRefreshSeconds", 300))
        self._followed: set[str] = set()  # the rooms "*" added (beside the configured ones)
        self.caps = Capabilities(max_length=MAX_CHAT_LENGTH)
        self.client: TalkClient | None = None
        # Redis: the cursors sit in the inbound stream's cluster slot (one script with the events)
        self.stream = inbound_key(ctx.key_prefix, self.name)
        self.cursor_key = ctx.key("talk-cursors")  # committed with the events: the stream's Cluster slot
        self.guests_key = ctx.key("own-guests")  # every guest actor this account has been (never relayed)
        self._own: set[str] = set() if self.guest else {f"users/{self.login}"}
        self._refused: str | None = None  # why Talk refused the credentials (401), until a probe passes
        self._refused_event = asyncio.Event()  # set while refused: the polls stop
        self._accepted = asyncio.Event()  # set while not refused: receive and sends wait on it
        self._accepted.set()
        self._probe_lock = asyncio.Lock()  # one probe at a time for the whole account
        self._next_probe = 0.0  # monotonic time of the next probe while refused
        self.refused_pause = float(acct.get("RefusedRetrySeconds", 900))
        self._sent_since_connect: set[str] = set()  # rooms posted to by this connection
        self._attempted: OrderedDict[str, None] = OrderedDict()  # delivery keys sent here before
        self._rejoin = asyncio.Lock()
        self._rng = random.Random()
        # How a failing room waits before its next try (a test records the delays instead).
        self.pause: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._events_in = ctx.metrics.events_in.labels(self.name)

    # config ------------------------------------------------------------------------
    @classmethod
    def check_account(cls, account: AccountConfig) -> list[str]:
        problems = url_problems(account, "Server")
        if account.get("Login") and not account.get("Password"):
            problems.append(f"{account.name}.Password: is required with Login (an app password)")
        if account.get("Password") and not account.get("Login"):
            problems.append(f"{account.name}.Login: is required with Password (empty Login means a guest)")
        return problems

    # lifecycle -----------------------------------------------------------------------
    async def connect(self) -> None:
        await self.disconnect()  # connected again without a disconnect: the old session is not left open
        rooms = None if self.all_rooms and not self.guest else max(1, len(self.ctx.channels))
        self.client = TalkClient(
            self.server, self.login, self.password,
            timeout=self.timeout, max_answer=self.max_answer, rooms=rooms, verify=self.verify,
        )  # fmt: skip
        if self.all_rooms and self.guest:
            self.ctx.log.error("%s: a guest cannot list rooms: channel * ignored (list the public rooms)", self.name)
        self._sent_since_connect.clear()
        if self.guest:
            self._own |= {m.decode() for m in await self.ctx.redis.smembers(self.guests_key)}
            return  # capabilities and the session come with the first join
        try:
            await self._load_capabilities()
        except Refused as exc:
            # Do not fail connect (the runner would retry it every minute, each
            # a brute-force attempt): receive and send stop the account instead.
            await self._refuse(str(exc))

    async def join(self, channel: str) -> None:
        if channel not in self.rooms:
            self.rooms.append(channel)
        await self.ctx.rooms.add(channel)

    async def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    def _client(self) -> TalkClient:
        if self.client is None:
            raise TransientError("not connected")
        return self.client
