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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import random
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from redis.exceptions import RedisError

from adapters.checks import url_problems
from adapters.talk.chat import (
    GROUP,
    PUBLIC,
    WRITTEN_TYPES,
    BadAnswer,
    Capabilities,
    ChatMessage,
    parse_capabilities,
    parse_message,
    parse_page,
    parse_reactions,
    parse_rooms,
)
from adapters.talk.chat import (
    last_given as parse_last_given,
)
from adapters.talk.client import (
    CAPABILITIES,
    ROOM_API,
    SHARES,
    Answer,
    TalkClient,
    Unreachable,
    dav_path,
    path_token,
)
from adapters.talk.common import (
    MAX_CHAT_LENGTH,
    OCS_API,
    php_trim,
    reference_id,
    render,
    retry_after,
    split_message,
)
from bridge.adapter import (
    UNAVAILABLE_STATUSES,
    Adapter,
    AdapterContext,
    Option,
    PermanentError,
    RateLimited,
    ServerUnavailable,
    TransientError,
)
from bridge.bus import Write, inbound_key
from bridge.config import AccountConfig
from bridge.events import Attachment, Delivery, Event, EventKind
from bridge.health import clear_degraded, mark_degraded

PROTOCOL = "nctalk"
CHAT_API = OCS_API + "/chat"
REACTION_API = OCS_API + "/reaction"
EDIT_MARK = " (edited)"  # a visible edit where Talk cannot edit
DELETE_NOTE = "(deleted their message)"
REACTIONS_TTL = 7 * 86400  # how long who-reacted-with-what is remembered (for revocations)
RECENT_WINDOW = 200  # messages looked at for a referenceId (Talk's largest page)
ATTEMPTED_KEEP = 4096  # delivery keys remembered as attempted in this process
THROTTLE_SLACK = 55.0  # seconds Nextcloud's brute-force throttle may add to an answer (2 x 25 s, and some)
WILDCARD = "*"  # a gateway channel: every group and public conversation the account is in
FOLLOWED_TYPES = frozenset({GROUP, PUBLIC})  # not one-to-one (private), changelog or note-to-self
JOIN_PART = {"user_added": EventKind.JOIN, "user_removed": EventKind.LEAVE,
             "federated_user_added": EventKind.JOIN, "federated_user_removed": EventKind.LEAVE}  # fmt: skip


class RoomFailure(Exception):
    """One room cannot be polled or posted to now: retried, never given up."""

    def __init__(self, what: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after
        self.status = status


class Refused(Exception):
    """Talk refused the account's credentials (401)."""


@dataclass(slots=True)
class _RoomState:
    failures: int = 0
    reason: str = ""
    since: float = 0.0


def _event_id(*parts: object) -> str:
    """A stable event id per Talk message (and reaction): a page published
    again (a stale owner) yields the same ids, so deliveries dedupe."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def safe_name(name: str) -> str:
    """A file name WebDAV and Talk accept: no path, no control characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    if base in ("", ".", "..") or (base.startswith(".") and set(base) == {"."}):
        base = "file"
    return base[:200]


class TalkUser(Adapter):
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
        self.cursor_key = "{" + self.stream + "}:talk-cursors"
        self.guests_key = ctx.key("own-guests")  # every guest actor this account has been (never relayed)
        self._own: set[str] = set() if self.guest else {f"users/{self.login}"}
        self._refused: str | None = None  # why Talk refused the credentials (401), until a probe passes
        self._refused_event = asyncio.Event()  # set while refused: the polls stop
        self._accepted = asyncio.Event()  # set while not refused: receive and sends wait on it
        self._accepted.set()
        self._probe_lock = asyncio.Lock()  # one probe at a time for the whole account
        self._next_probe = 0.0  # monotonic time of the next probe while refused
        self.refused_pause = float(acct.get("RefusedRetrySeconds", 900))
        self._room_state: dict[str, _RoomState] = {}
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
            self._refuse(str(exc))

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

    async def _load_capabilities(self) -> None:
        answer = await self._client().call("GET", CAPABILITIES, seconds=self.timeout + THROTTLE_SLACK)
        if answer.status == 401:
            raise Refused(f"GET capabilities: Talk answered 401 for {self.login} (app password wrong or revoked)")
        if answer.status != 200:
            raise ConnectionError(f"GET capabilities: Talk answered {answer.status}")
        self.caps = parse_capabilities(answer.body)

    def _refuse(self, why: str) -> None:
        """Talk answered 401: every poll and send of the account stops until a probe is accepted."""
        if self._refused is None:
            self._next_probe = time.monotonic() + self.refused_pause
            self.ctx.log.critical(
                "%s: ALERT: credentials refused: %s; every room stops polling and sending; "
                "one request every %.0fs until Talk accepts them again", self.name, why, self.refused_pause,
            )  # fmt: skip
        self._refused = why
        self._refused_event.set()
        self._accepted.clear()
        self.ctx.metrics.account_failed.labels(self.name).set(1)

    async def _await_accepted(self) -> None:
        """While Talk refuses the credentials: one probe (``GET capabilities``)
        per ``RefusedRetrySeconds`` for the whole account — receive and every
        send wait here — until one is accepted. Nextcloud counts each refused
        probe towards its brute-force lockout: one per pause, never a loop."""
        while self._refused is not None:
            wait = self._next_probe - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._accepted.wait()
                continue
            async with self._probe_lock:
                if self._refused is not None and time.monotonic() >= self._next_probe:
                    await self._probe()

    async def _probe(self) -> None:
        try:
            await self._load_capabilities()
        except Refused as exc:
            self._refused = str(exc)
            why = "still refused"
        except (Unreachable, BadAnswer, ConnectionError, TransientError) as exc:
            why = f"not answered ({exc})"  # Talk away, or its brute-force block's 429: no news of the password
        else:
            self.ctx.log.warning("%s: credentials accepted again; polling and sending resume", self.name)
            self._refused = None
            self._refused_event.clear()
            self._accepted.set()
            self.ctx.metrics.account_failed.labels(self.name).set(0)
            await self._mark_health(0)
            return
        self._next_probe = time.monotonic() + self.refused_pause
        self.ctx.log.error("%s: credentials %s; next probe in %.0fs", self.name, why, self.refused_pause)
        await self._mark_health(self.refused_pause)

    # receiving -----------------------------------------------------------------------
    async def receive(self) -> None:
        while True:
            if self._refused is not None:
                await self._mark_health(self.refused_pause)
                await self._await_accepted()  # the probe that passed read the capabilities
            elif not self.guest:
                try:
                    await self._load_capabilities()
                except Refused as exc:
                    self._refuse(str(exc))
                    continue
                except (Unreachable, BadAnswer, ConnectionError) as exc:
                    self.ctx.log.warning("%s: capabilities not read (%s); assuming Talk 17", self.name, exc)
            if self.guest:
                await self._guest_setup()
                try:  # public: a guest reads them with its session
                    await self._load_capabilities()
                except (Refused, Unreachable, BadAnswer, ConnectionError) as exc:
                    self.ctx.log.warning("%s: capabilities not read (%s); assuming Talk 17", self.name, exc)
            await self._poll_rooms()  # until the credentials are refused

    async def _poll_rooms(self) -> None:
        """Every room's long poll (with ``*``, the rooms come and go), until a
        401 stops them all. A poller that raised — Redis away, a bug — is
        raised: the runner restarts receive."""
        failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        pollers: dict[str, asyncio.Task[None]] = {}

        def watch(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None and not failed.done():
                failed.set_result(task.exception())  # type: ignore[arg-type]

        def start(token: str) -> None:
            task = asyncio.create_task(self._poll_room(token), name=f"poll:{self.name}:{token}")
            task.add_done_callback(watch)
            pollers[token] = task

        def stop(token: str) -> asyncio.Task[None] | None:
            task = pollers.pop(token, None)
            if task is not None:
                task.cancel()
            return task

        for token in [*self.rooms, *sorted(self._followed - set(self.rooms))]:
            start(token)
        refused = asyncio.create_task(self._refused_event.wait())
        helpers = [refused]
        if self.all_rooms and not self.guest:
            follow = asyncio.create_task(self._follow_rooms(start, stop), name=f"rooms:{self.name}")
            follow.add_done_callback(watch)
            helpers.append(follow)
        try:
            await asyncio.wait([refused, failed], return_when=asyncio.FIRST_COMPLETED)
            if failed.done():
                raise failed.result()
        finally:
            tasks = [*helpers, *pollers.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_rooms(
        self, start: Callable[[str], None], stop: Callable[[str], asyncio.Task[None] | None]
    ) -> None:
        """Channel ``*``: the account's group and public conversations (not
        one-to-one: those are private), read every ``RoomsRefreshSeconds``
        (Talk's own advice is a full read every 5 minutes). A new one is
        polled (from its newest message) and added to the account's rooms, so
        ``*`` destinations deliver there too; one the account left is dropped,
        its cursor with it (if it comes back, it starts at its newest message)."""
        while True:
            try:
                answer = await self._client().call(
                    "GET", ROOM_API, params={"noStatusUpdate": 1}, seconds=self.timeout + THROTTLE_SLACK
                )
                if answer.status == 401:
                    raise Refused(f"GET room list: Talk answered 401 (app password of {self.login} wrong or revoked)")
                if answer.status != 200:
                    raise BadAnswer(f"the room list answered {answer.status}")
                listed = parse_rooms(answer.body)
            except Refused as exc:
                self._refuse(str(exc))
                return
            except (Unreachable, BadAnswer) as exc:
                self.ctx.log.warning("%s: room list not read (%s); the rooms stay as they are", self.name, exc)
            else:
                configured = set(self.rooms)
                wanted = {c.token for c in listed if c.type in FOLLOWED_TYPES} - configured
                new, gone = wanted - self._followed, self._followed - wanted
                if new:
                    await self.ctx.rooms.add(*sorted(new))
                    self._followed |= new
                    for token in sorted(new):
                        start(token)
                    self.ctx.log.info("%s: channel *: now in room(s) %s", self.name, ", ".join(sorted(new)))
                if gone:
                    await self._drop_rooms(sorted(gone), stop)
            await asyncio.sleep(self.rooms_refresh)

    async def _drop_rooms(self, tokens: list[str], stop: Callable[[str], asyncio.Task[None] | None]) -> None:
        stopped = [task for task in map(stop, tokens) if task is not None]
        await asyncio.gather(*stopped, return_exceptions=True)  # no page of theirs is committed after this
        await self.ctx.rooms.remove(*tokens)
        await self.ctx.redis.hdel(self.cursor_key, *tokens)
        self._followed -= set(tokens)  # once Redis forgot them, as a new room is followed once Redis has it
        for token in tokens:
            if self._room_state.pop(token, _RoomState()).failures:
                self.ctx.metrics.room_failed.labels(self.name, token).set(0)
        await self._mark_health(0)
        self.ctx.log.info("%s: channel *: no longer in room(s) %s", self.name, ", ".join(tokens))

    async def _poll_room(self, token: str) -> None:
        state = self._room_state.setdefault(token, _RoomState())
        while self._refused is None:
            try:
                await self._poll_once(token)
            except Refused as exc:
                self._refuse(str(exc))
                return
            except (RoomFailure, Unreachable, BadAnswer) as exc:
                hint = exc.retry_after if isinstance(exc, RoomFailure) else None
                state.failures += 1
                delay = self._backoff(state.failures, hint)
                await self._room_failed(token, state, str(exc), delay)
                await self.pause(delay)
                continue
            if state.failures:
                await self._room_recovered(token, state)

    def _backoff(self, failures: int, hint: float | None) -> float:
        if hint is not None:  # the server said how long: honour it
            return max(0.0, hint)
        step = min(self.retry_min * 2 ** (failures - 1), self.retry_max)
        return step / 2 + self._rng.uniform(0, step / 2)  # jitter: rooms of a fleet do not return in step

    async def _poll_once(self, token: str) -> None:
        cursor = await self._cursor(token)
        params = {
            "lookIntoFuture": 1, "timeout": self.poll_timeout, "lastKnownMessageId": cursor,
            "limit": 100, "setReadMarker": 0, "markNotificationsAsRead": 0, "includeLastKnown": 0,
        }  # fmt: skip
        answer = await self._room_call(
            token, "GET", f"{CHAT_API}/{path_token(token)}", params=params,
            seconds=self.poll_timeout + self.timeout + THROTTLE_SLACK,
        )  # fmt: skip
        if answer.status == 304:
            return
        if answer.status != 200:
            raise self._room_failure(token, "poll", answer)
        page = parse_page(answer.body)
        given = parse_last_given(answer.headers.get("X-Chat-Last-Given"))
        newest = max((m.id for m in page), default=cursor)
        if given is None and not page:
            raise BadAnswer("200 with no messages and no X-Chat-Last-Given")
        after = max(given or 0, newest)
        if after <= cursor:
            raise BadAnswer(f"X-Chat-Last-Given {after} does not move past the cursor {cursor}")
        events: list[Event] = []
        for msg in page:
            events.extend(await self._events(token, msg))
        await self._commit(token, events, after)

    async def _room_call(self, token: str, method: str, path: str, **kw: Any) -> Answer:
        """A request for a room; a guest whose session ended joins again once."""
        client = self._client()
        answer = await client.call(method, path, **kw)
        if answer.status == 401:
            raise Refused(f"{method} {path}: Talk answered 401 (app password of {self.login} wrong or revoked)")
        if self.guest and answer.status == 404:
            async with self._rejoin:
                await self._guest_join(token)
            answer = await client.call(method, path, **kw)
        return answer

    def _room_failure(self, token: str, what: str, answer: Answer) -> RoomFailure:
        status = answer.status
        wait = retry_after(answer.headers.get("Retry-After")) if status in (429, 503) else None
        meaning = {
            # InjectionMiddleware answers every one of these with an empty 403
            403: "the account is banned there, or may not post: a read-only room or no chat permission",
            404: "no such room, or the account is not in it",
            412: "the room's lobby keeps the account out",
            429: "Talk asks to slow down",
        }.get(status, "server error" if status >= 500 else "unexpected answer")
        return RoomFailure(f"{what} room {token}: Talk answered {status} ({meaning})", wait, status)

    async def _cursor(self, token: str) -> int:
        raw = await self.ctx.redis.hget(self.cursor_key, token)
        if raw is not None:
            return int(raw)
        # first seen: start at the newest message (or Backfill before it)
        params = {"lookIntoFuture": 0, "limit": max(1, self.backfill), "setReadMarker": 0,
                  "markNotificationsAsRead": 0}  # fmt: skip
        answer = await self._room_call(
            token, "GET", f"{CHAT_API}/{path_token(token)}", params=params, seconds=self.timeout + THROTTLE_SLACK
        )
        if answer.status == 304:
            start = 0
        elif answer.status == 200:
            ids = [m.id for m in parse_page(answer.body)]
            if not ids:
                start = parse_last_given(answer.headers.get("X-Chat-Last-Given")) or 0
            else:
                start = min(ids) - 1 if self.backfill else max(ids)
        else:
            raise self._room_failure(token, "first read of", answer)
        # HSETNX: two owners racing on a new room keep the first cursor
        await self.ctx.redis.hsetnx(self.cursor_key, token, start)
        self.ctx.log.info("%s: room %s seen for the first time; relaying after message %d", self.name, token, start)
        return int(await self.ctx.redis.hget(self.cursor_key, token) or start)

    async def _commit(self, token: str, events: list[Event], cursor: int) -> None:
        """The page's events and the room's new cursor, together, fenced: a
        stale owner gets ``Fenced`` and publishes nothing beside its successor."""
        await self.ctx.commit_inbound(events, [Write.hset(self.cursor_key, token, cursor)])
        if events:
            self._events_in.inc(len(events))

    async def _room_failed(self, token: str, state: _RoomState, why: str, delay: float) -> None:
        if state.failures == 1:
            state.since = time.time()
            self.ctx.log.error("%s: ALERT: room %s failing: %s; retrying in %.1fs", self.name, token, why, delay)
        else:
            self.ctx.log.warning(
                "%s: room %s still failing (%d times): %s; retry in %.1fs", self.name, token, state.failures, why, delay
            )
        state.reason = why
        self.ctx.metrics.room_failed.labels(self.name, token).set(1)
        await self._mark_health(delay)

    async def _room_recovered(self, token: str, state: _RoomState) -> None:
        self.ctx.log.warning(
            "%s: room %s recovered after %d failures (%.0fs)",
            self.name,
            token,
            state.failures,
            time.time() - state.since,
        )
        state.failures, state.reason = 0, ""
        self.ctx.metrics.room_failed.labels(self.name, token).set(0)
        await self._mark_health(0)

    async def _mark_health(self, delay: float) -> None:
        """``talkbridge status`` shows an account whose rooms fail (or whose
        credentials Talk refuses) as degraded, naming them."""
        failing = {t: s.reason for t, s in self._room_state.items() if s.failures}
        try:
            if self._refused is not None:
                why = f"credentials refused ({self._refused}); one probe every {self.refused_pause:.0f}s"
                await mark_degraded(self.ctx.redis, self.ctx.key_prefix, self.name, why, self.refused_pause + 60)
            elif failing:
                text = "; ".join(f"room {t}: {why}" for t, why in sorted(failing.items())[:5])
                more = f" (and {len(failing) - 5} more)" if len(failing) > 5 else ""
                await mark_degraded(self.ctx.redis, self.ctx.key_prefix, self.name, text + more, max(60.0, 2 * delay))
            else:
                await clear_degraded(self.ctx.redis, self.ctx.key_prefix, self.name)
        except (RedisError, OSError) as exc:
            self.ctx.log.warning("%s: could not record the rooms' health: %s", self.name, exc)

    # one Talk message -> events ------------------------------------------------------
    def _base(self, token: str, msg: ChatMessage) -> dict[str, Any]:
        name = msg.actor_name
        if msg.actor_type in ("guests", "emails"):
            name = name + self.guest_suffix if name else "Guest"
        return {
            "account": self.name,
            "channel": token,
            "sender_id": msg.actor,
            "sender_name": name or msg.actor_id,
            "origin": [f"{self.name}/{token}"],
            "timestamp": float(msg.timestamp) or time.time(),
        }

    async def _events(self, token: str, msg: ChatMessage) -> list[Event]:
        if msg.actor in self._own:
            return []  # ours: never relayed back
        base = self._base(token, msg)
        parent = msg.parent
        if msg.system == "" and msg.message_type in WRITTEN_TYPES:
            text, files = await self._content(msg.message, msg.parameters)
            event = Event(
                kind=EventKind.MESSAGE, text=text, native_id=str(msg.id), attachments=files,
                id=_event_id(self.name, token, msg.id), **base,
            )  # fmt: skip
            if msg.message_type != "comment":
                event.extra["talkMessageType"] = msg.message_type  # a voice message stays one
            if parent is not None:
                event.reply_to = str(parent.id)
            return [event]
        if parent is None:
            return self._join_part(token, msg, base)
        target = str(parent.id)
        if msg.system == "message_edited" and not parent.deleted:
            text, _files = render(parent.message, parent.parameters)
            if parent.message.strip() == "{file}":
                return []  # a file whose caption was removed: nothing to say elsewhere
            return [Event(kind=EventKind.EDIT, text=text, target_id=target,
                          id=_event_id(self.name, token, msg.id), **base)]  # fmt: skip
        if msg.system == "message_deleted":
            return [Event(kind=EventKind.DELETE, target_id=target, id=_event_id(self.name, token, msg.id), **base)]
        if msg.system == "reaction" and msg.message:
            await self._remember_reaction(token, target, msg.actor, msg.message, add=True)
            return [Event(kind=EventKind.REACTION, target_id=target, reaction=msg.message,
                          id=_event_id(self.name, token, msg.id), **base)]  # fmt: skip
        if msg.system == "reaction_revoked":
            gone = await self._revoked(token, target, msg.actor)
            return [
                Event(
                    kind=EventKind.UNREACTION,
                    target_id=target,
                    reaction=emoji,
                    id=_event_id(self.name, token, msg.id, emoji),
                    **base,
                )
                for emoji in gone
            ]
        return []

    def _join_part(self, token: str, msg: ChatMessage, base: dict[str, Any]) -> list[Event]:
        kind = JOIN_PART.get(msg.system)
        if kind is None:
            return []  # other system messages (calls, renames, polls…) are not bridged
        text, _ = render(msg.message, msg.parameters)
        return [Event(kind=kind, text=text, id=_event_id(self.name, token, msg.id), **base)]

    async def _content(self, message: str, parameters: Any) -> tuple[str, list[Attachment]]:
        """The text, and the files a message shares (fetched within MediaDownloadSize)."""
        text, _ = render(message, parameters)
        params = parameters if isinstance(parameters, dict) else {}
        out: list[Attachment] = []
        for key, obj in params.items():
            if obj.get("type") != "file":
                continue
            if message.strip() == "{" + key + "}":
                text = ""  # only the file, no caption
            out.append(await self._attachment(obj))
        return text, out

    async def _attachment(self, obj: dict[str, Any]) -> Attachment:
        _text, [att] = render("{f}", {"f": obj})
        path = obj.get("path")
        if self.guest or not isinstance(path, str) or not path:
            return att  # a guest has no WebDAV: the link only
        if att.size is not None and att.size > self.max_file:
            self.ctx.log.info("%s: file %s (%d bytes) is over MediaDownloadSize; sent as a link", self.name,
                              att.name, att.size)  # fmt: skip
            return att
        try:
            answer = await self._client().call("GET", dav_path(self.login, path), limit=self.max_file,
                                               headers={"Accept": "*/*"})  # fmt: skip
        except BadAnswer:
            self.ctx.log.info("%s: file %s is over MediaDownloadSize; sent as a link", self.name, att.name)
            return att
        if answer.status != 200:
            self.ctx.log.warning("%s: could not fetch file %s (WebDAV %d); sent as a link", self.name, att.name,
                                 answer.status)  # fmt: skip
            return att
        att.data_b64 = base64.b64encode(answer.body).decode()
        att.size = len(answer.body)
        return att

    # Reactions: Talk's "reaction_revoked" does not say which emoji. Who
    # reacted with what is remembered (7 days) and compared with the
    # message's reactions now, as Talk's own clients reload them.
    def _reactions_key(self, token: str) -> str:
        return self.ctx.key("reactions", token)

    async def _remember_reaction(self, token: str, target: str, actor: str, emoji: str, add: bool) -> None:
        key, field = self._reactions_key(token), f"{target}\x1f{actor}"
        raw = await self.ctx.redis.hget(key, field)
        emojis = set(orjson.loads(raw)) if raw else set()
        emojis = emojis | {emoji} if add else emojis - {emoji}
        pipe = self.ctx.redis.pipeline(transaction=False)
        if emojis:
            pipe.hset(key, field, orjson.dumps(sorted(emojis)))
        else:
            pipe.hdel(key, field)
        pipe.expire(key, REACTIONS_TTL)
        await pipe.execute()

    async def _revoked(self, token: str, target: str, actor: str) -> list[str]:
        raw = await self.ctx.redis.hget(self._reactions_key(token), f"{target}\x1f{actor}")
        had = set(orjson.loads(raw)) if raw else set()
        if not had:
            return []
        answer = await self._room_call(token, "GET", f"{REACTION_API}/{path_token(token)}/{target}")
        if answer.status == 404:
            now: set[str] = set()
        elif answer.status == 200:
            now = {emoji for emoji, who in parse_reactions(answer.body).items() if actor in who}
        else:
            raise self._room_failure(token, "reactions of", answer)
        gone = sorted(had - now)
        for emoji in gone:
            await self._remember_reaction(token, target, actor, emoji, add=False)
        return gone

    # guests --------------------------------------------------------------------------
    async def _guest_setup(self) -> None:
        async with self._rejoin:
            for token in self.rooms:
                try:
                    await self._guest_join(token)
                except (RoomFailure, Unreachable, BadAnswer) as exc:
                    self.ctx.log.error("%s: ALERT: cannot join public room %s as a guest: %s", self.name, token, exc)

    async def _guest_join(self, token: str) -> None:
        """The room's page (session cookie, requesttoken), then join the session to the room."""
        client = self._client()
        await client.open_public_page(token)
        answer = await client.call("POST", f"{ROOM_API}/{path_token(token)}/participants/active", json={"force": True})
        if answer.status != 200:
            raise self._room_failure(token, "join", answer)
        data = answer.data()
        if not isinstance(data, dict) or not isinstance(data.get("actorId"), str):
            raise BadAnswer("the join answer has no actorId")
        me = f"{data.get('actorType', 'guests')}/{data['actorId']}"
        if me not in self._own:
            self._own.add(me)
            await self.ctx.redis.sadd(self.guests_key, me)
        self.ctx.log.info("%s: joined public room %s as guest %s", self.name, token, data["actorId"])

    # sending ---------------------------------------------------------------------------
    async def send(self, delivery: Delivery) -> str | None:
        """One delivery. While Talk refuses the credentials it waits for the
        probe that passes (no request of its own), then goes on."""
        while True:
            if self._refused is not None:
                await self._await_accepted()
                await self.ctx.check_fence()  # waited long: still the account's owner?
            try:
                return await self._send(delivery)
            except Refused as exc:
                self._refuse(str(exc))

    async def _send(self, delivery: Delivery) -> str | None:
        kind = delivery.event.kind
        try:
            if kind == EventKind.EDIT:
                return await self._edit(delivery)
            if kind == EventKind.DELETE:
                return await self._delete(delivery)
            if kind in (EventKind.REACTION, EventKind.UNREACTION):
                return await self._react(delivery)
            return await self._post(delivery)
        except RoomFailure as exc:
            if exc.retry_after is not None:
                raise RateLimited(str(exc), exc.retry_after) from None
            if exc.status in UNAVAILABLE_STATUSES:  # a proxy before a Talk that is down, maintenance mode
                raise ServerUnavailable(str(exc)) from None
            raise TransientError(str(exc)) from None
        except Unreachable as exc:
            if exc.connecting:  # no connection: Talk never saw the request
                raise ServerUnavailable(str(exc)) from None
            raise TransientError(str(exc)) from None
        except BadAnswer as exc:
            raise TransientError(f"Talk's answer was not understood: {exc}") from None

    def _nick_and_text(self, delivery: Delivery, text: str) -> tuple[str, str | None]:
        """The text to post and the actorDisplayName (guests; Talk ignores it for users)."""
        nick = php_trim(delivery.username) or delivery.event.sender_name
        if self.separate_name:
            return text, nick
        return delivery.username + text, nick if self.guest else None

    def _check(self, token: str, what: str, answer: Answer, ok: Sequence[int]) -> None:
        if answer.status in ok:
            return
        if answer.status in (403, 404, 412, 429) or answer.status >= 500:
            raise self._room_failure(token, what, answer)
        raise PermanentError(f"{what} in room {token}: Talk answered {answer.status}: {answer.body[:200]!r}")

    def _first_attempt(self, delivery: Delivery) -> bool:
        """False when this copy may already be in the room: a retry here, or
        the first delivery to the room since (re)connecting — the one a crash
        or a takeover may have cut between Talk's 201 and the record."""
        key = delivery.key
        fresh = delivery.channel in self._sent_since_connect and key not in self._attempted
        self._sent_since_connect.add(delivery.channel)
        self._attempted[key] = None
        if len(self._attempted) > ATTEMPTED_KEEP:
            self._attempted.popitem(last=False)
        return fresh

    async def _recent_references(self, token: str, wanted: set[str]) -> dict[str, int]:
        """Our messages among the room's newest ones carrying these referenceIds."""
        params = {"lookIntoFuture": 0, "limit": RECENT_WINDOW, "setReadMarker": 0, "markNotificationsAsRead": 0}
        answer = await self._room_call(token, "GET", f"{CHAT_API}/{path_token(token)}", params=params)
        if answer.status == 304:
            return {}
        self._check(token, "look up", answer, (200,))
        return {
            m.reference_id: m.id
            for m in parse_page(answer.body)
            if m.reference_id in wanted and m.actor in self._own and m.system == ""
        }

    async def _post(self, delivery: Delivery) -> str | None:
        token = delivery.channel
        event = delivery.event
        text = delivery.text
        files: list[tuple[Attachment, bytes]] = []
        for att in event.attachments:
            data = self._decoded(att)
            if data is not None and not self.guest:
                files.append((att, data))
            else:  # cannot upload it: name and link, as a line of text
                line = f"{att.name}: {att.url}" if att.url else f"[file {att.name}]"
                text += ("\n" if text.strip() else "") + line
        body, display = self._nick_and_text(delivery, text)
        limit = self.caps.max_length
        caption = body if files and php_trim(body) and len(body) <= limit else None
        parts: list[tuple[str, Any]] = []
        if files and caption is None and php_trim(text):
            parts += [("text", piece) for piece in split_message(body, limit)]
        elif not files:
            parts += [("text", piece) for piece in split_message(body, limit)]
        for i, (att, data) in enumerate(files):
            parts.append(("file", (att, data, caption if i == 0 else None)))
        if not parts:
            return None
        refs = [reference_id(delivery.key, i) for i in range(len(parts))]
        done = {} if self._first_attempt(delivery) else await self._recent_references(token, set(refs))
        reply = int(delivery.reply_to) if delivery.reply_to and delivery.reply_to.isdigit() else 0
        first: int | None = None
        for i, (kind, part) in enumerate(parts):
            ref = refs[i]
            if ref in done:
                posted = done[ref]
            elif kind == "text":
                posted = await self._post_text(token, part, ref, reply if i == 0 else 0, display)
            else:
                att, data, cap = part
                posted = await self._post_file(delivery, i, att, data, cap, ref, reply if i == 0 else 0, display)
            first = posted if first is None else first
        return str(first) if first is not None else None

    @staticmethod
    def _decoded(att: Attachment) -> bytes | None:
        if not att.data_b64:
            return None
        try:
            return base64.b64decode(att.data_b64, validate=True)
        except (binascii.Error, ValueError):
            return None

    async def _post_text(self, token: str, text: str, ref: str, reply: int, display: str | None) -> int:
        body: dict[str, Any] = {"message": text, "referenceId": ref}
        if reply:
            body["replyTo"] = reply
        if display:
            body["actorDisplayName"] = display
        path = f"{CHAT_API}/{path_token(token)}"
        answer = await self._room_call(token, "POST", path, json=body)
        if answer.status == 400 and reply:  # the message replied to is gone: post it unthreaded
            del body["replyTo"]
            answer = await self._room_call(token, "POST", path, json=body)
        self._check(token, "post", answer, (201,))
        return parse_message(answer.data(), "the posted message").id

    async def _post_file(
        self, delivery: Delivery, part: int, att: Attachment, data: bytes, caption: str | None, ref: str,
        reply: int, display: str | None,
    ) -> int:  # fmt: skip
        """WebDAV upload into Talk/ (a folder per copy: same name, no clash,
        the same path again on a retry), then a share into the room."""
        token = delivery.channel
        client = self._client()
        folder = "Talk/talkbridge-" + hashlib.sha256(f"{delivery.key}#{part}".encode()).hexdigest()[:16]
        name = safe_name(att.name)
        for path in ("Talk", folder):
            answer = await client.call("MKCOL", dav_path(self.login, path))
            if answer.status == 401:
                raise Refused(f"WebDAV: Talk answered 401 for {self.login}")
            if answer.status not in (201, 405):
                self._check(token, f"create folder {path}", answer, (201, 405))
        answer = await client.call(
            "PUT", dav_path(self.login, f"{folder}/{name}"), content=data,
            headers={"Content-Type": att.mime or "application/octet-stream"},
        )  # fmt: skip
        if answer.status == 401:
            raise Refused(f"WebDAV: Talk answered 401 for {self.login}")
        self._check(token, f"upload {name}", answer, (201, 204))
        meta: dict[str, Any] = {"messageType": delivery.event.extra.get("talkMessageType", "comment")}
        if meta["messageType"] not in ("comment", "voice-message", "record-audio", "record-video"):
            meta["messageType"] = "comment"
        if caption and self.caps.has("media-caption"):
            meta["caption"] = caption
        if reply:
            meta["replyTo"] = reply
        form = {"shareType": "10", "shareWith": token, "path": f"/{folder}/{name}", "referenceId": ref,
                "talkMetaData": orjson.dumps(meta).decode()}  # fmt: skip
        answer = await self._room_call(token, "POST", SHARES, data=form)
        if answer.status != 403:  # 403: already shared with this room (a retry): find it below
            self._check(token, f"share {name}", answer, (200,))
        found = await self._recent_references(token, {ref})
        if ref not in found:
            raise TransientError(f"shared {name} into room {token}, but its message is not among the newest")
        if caption and not self.caps.has("media-caption") and php_trim(caption):
            await self._post_text(token, caption, reference_id(delivery.key, 1000 + part), 0, display)
        return found[ref]

    async def _edit(self, delivery: Delivery) -> str | None:
        token, target = delivery.channel, delivery.target_id or ""
        if not target.isdigit():
            raise PermanentError(f"edit needs a Talk message id (got {target!r})")
        text, display = self._nick_and_text(delivery, delivery.text)
        text = (split_message(text, self.caps.max_length) or [text])[0]
        if self.caps.has("edit-messages"):
            answer = await self._room_call(
                token, "PUT", f"{CHAT_API}/{path_token(token)}/{target}", json={"message": text}
            )
            if answer.status in (200, 202):
                return None
            if answer.status == 404:
                self.ctx.metrics.skipped.labels(self.name, "edit_target_gone").inc()
                return None
            if answer.status not in (400, 403, 405):
                self._check(token, "edit", answer, (200, 202))
        # Talk cannot edit it (before Talk 19, or past its 24 h): say it visibly
        note, _ = self._nick_and_text(delivery, delivery.text + EDIT_MARK)
        await self._fallback(delivery, note, int(target), display)
        return None

    async def _delete(self, delivery: Delivery) -> str | None:
        token, target = delivery.channel, delivery.target_id or ""
        if not target.isdigit():
            raise PermanentError(f"deletion needs a Talk message id (got {target!r})")
        answer = await self._room_call(token, "DELETE", f"{CHAT_API}/{path_token(token)}/{target}")
        if answer.status in (200, 202, 404):
            return None
        if answer.status not in (400, 403, 405):
            self._check(token, "delete", answer, (200, 202))
        note, display = self._nick_and_text(delivery, DELETE_NOTE)
        await self._fallback(delivery, note, int(target), display)
        return None

    async def _fallback(self, delivery: Delivery, text: str, target: int, display: str | None) -> None:
        ref = reference_id(delivery.key, 0)
        done = {} if self._first_attempt(delivery) else await self._recent_references(delivery.channel, {ref})
        if ref not in done:
            await self._post_text(delivery.channel, split_message(text, self.caps.max_length)[0], ref, target, display)

    async def _react(self, delivery: Delivery) -> str | None:
        token, target = delivery.channel, delivery.target_id or ""
        emoji = delivery.event.reaction or ""
        if not emoji or not target.isdigit():
            raise PermanentError(f"reaction needs an emoji and a Talk message id (got {target!r})")
        add = delivery.event.kind == EventKind.REACTION
        path = f"{REACTION_API}/{path_token(token)}/{target}"
        answer = await self._room_call(token, "POST" if add else "DELETE", path, json={"reaction": emoji})
        if answer.status in (200, 201) or (answer.status == 404 and not add):
            return None
        if answer.status == 404:
            self.ctx.metrics.skipped.labels(self.name, "reaction_target_gone").inc()
            return None
        self._check(token, "react", answer, (200, 201))
        return None
