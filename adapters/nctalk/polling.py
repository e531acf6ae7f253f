"""Receiving: one long poll per room (each a ``bridge.receiver.Receiver``,
which keeps the backoff and reports the room's health), the ``*`` channel's
room list, the rooms' cursors (committed with their pages' events), and a
guest's joins.

A mixin of ``TalkUser`` (adapters/nctalk/adapter.py), which holds the state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from adapters.nctalk.common import CHAT_API, FOLLOWED_TYPES, THROTTLE_SLACK, Refused, RoomFailure
from adapters.talk.chat import BadAnswer, parse_page, parse_rooms
from adapters.talk.chat import last_given as parse_last_given
from adapters.talk.client import ROOM_API, Answer, Unreachable, path_token
from bridge.adapter import retry_after_header
from bridge.bus import Write
from bridge.events import Event
from bridge.receiver import Backoff, Receiver


class Polling:
    """``TalkUser``'s receive side: the rooms' polls and their failures."""

    # receiving -----------------------------------------------------------------------
    async def receive(self) -> None:
        while True:
            if self._refused is not None:
                await self._await_accepted()  # the probe that passed read the capabilities
            elif not self.guest:
                try:
                    await self._load_capabilities()
                except Refused as exc:
                    await self._refuse(str(exc))
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
                await self._refuse(str(exc))
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
            await self.ctx.room_recovered(token)  # no longer ours to report
        self.ctx.log.info("%s: channel *: no longer in room(s) %s", self.name, ", ".join(tokens))

    async def _poll_room(self, token: str) -> None:
        """The room's long poll until the credentials are refused; a failing
        room (404, 403, the lobby, Talk away) is retried with backoff, never
        given up."""
        receiver = Receiver(
            self.ctx, f"room {token}", room=token,
            transient=(RoomFailure, Unreachable, BadAnswer),
            backoff=Backoff(self.retry_min, self.retry_max, self._rng),
            pause=lambda seconds: self.pause(seconds),  # looked up at each wait: a test swaps it
            retry_after=lambda exc: exc.retry_after if isinstance(exc, RoomFailure) else None,
        )  # fmt: skip
        try:
            await receiver.run(lambda: self._poll_once(token), until=lambda: self._refused is None)
        except Refused as exc:
            await self._refuse(str(exc))

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
        wait = retry_after_header(answer.headers.get("Retry-After")) if status in (429, 503) else None
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
