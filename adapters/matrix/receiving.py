"""Receiving: one ``/sync`` loop (a ``bridge.receiver.Receiver``, which
keeps the backoff while the homeserver is away and reports it), its
``next_batch`` committed with its events, a limited timeline paged back,
invites, encrypted rooms: nio decrypts a sync's events as it reads it; the
keys' upkeep (upload, query, claim, to-device) follows each sync, events
waiting for their keys are tried again, and the crypto store is committed
with the sync when it changed (crypto.py).

A mixin of ``Matrix`` (adapters/matrix/adapter.py), which holds the state."""

from __future__ import annotations

from typing import Any

import orjson
from nio import RoomMessagesResponse, SyncResponse
from nio.api import MessageDirection

from adapters.matrix.common import PAGE, REACTIONS_TTL, TRANSPORT_ERRORS, Unavailable, describe
from bridge.adapter import AccountFailed, PermanentError
from bridge.bus import Write
from bridge.events import Event
from bridge.receiver import Backoff, Receiver


class Receiving:
    """``Matrix``'s receive side."""

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
        await self._ensure_crypto()
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
            if self.encryption and self.crypto.pending:
                await self._request_keys()
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
            raise Unavailable(f"sync: not a sync answer: {describe(resp)}")
        for room_id, room in client.rooms.items():
            if room.encrypted and room_id not in self.encrypted:
                self.encrypted.add(room_id)
                if room_id in self.channel_of and not self.encryption:
                    await self._encrypted_room(room_id)
                elif room_id in self.channel_of:
                    self.ctx.log.info("%s: room %s is end-to-end encrypted: decrypted and encrypted by device %s",
                                      self.name, self.channel_of[room_id], client.device_id)  # fmt: skip
        if self.encryption:
            await self._keys_upkeep()
        return resp

    async def _keys_upkeep(self) -> None:
        """What nio's sync_forever does after a sync: our keys uploaded, the
        members' device keys queried, one-time keys claimed, to-device
        messages (key shares, key requests) sent. The store is saved before
        new keys go out, and after."""
        client = self._client()
        try:
            if client.should_upload_keys:
                await self._save_crypto()
                await self._call("keys upload", client.keys_upload)
                await self._save_crypto()
            if client.should_query_keys:
                await self._call("keys query", client.keys_query)
                self._blacklist_devices()
            if client.should_claim_keys:
                await self._call("keys claim", lambda: client.keys_claim(client.get_users_for_key_claiming()))
            await self._call("to-device", client.send_to_device_messages)
        except PermanentError as exc:
            self.ctx.log.warning("%s: encryption keys: %s", self.name, exc)

    def _blacklist_devices(self) -> None:
        """``BlacklistDevices``: those devices never get a room key (nio skips
        blacklisted devices when it shares one); every other device of the
        room's members does, verified or not — a bot cannot verify."""
        client = self._client()
        for entry in self.blacklist:
            user, device = entry[0], entry[1] if len(entry) > 1 else None
            for known in list(client.device_store.active_user_devices(user)):
                if (device is None or known.id == device) and not client.olm.is_device_blacklisted(known):
                    client.blacklist_device(known)
                    self.ctx.log.info("%s: device %s of %s blacklisted: no room keys", self.name, known.id, user)

    async def _save_crypto(self) -> None:
        """The crypto store to Redis now (fenced), when it changed: before and
        after keys go out, after a send that shared a room key."""
        async with self.crypto.lock:
            writes = self.crypto.writes(pending=False)
            if writes:
                try:
                    await self.ctx.commit_inbound([], writes)
                except BaseException:
                    self.crypto.unsaved()
                    raise

    async def _request_keys(self) -> None:
        try:
            await self.crypto.request_keys(self._client())
        except TRANSPORT_ERRORS as exc:
            self.ctx.log.warning("%s: room key request not sent: %s", self.name, exc)

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
        await self._commit_with_crypto([], writes)
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
        if self.encryption and self.crypto.pending:
            events.extend(await self._undecrypted(local_reactions))
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
                raise Unavailable(f"messages of {room_id}: {describe(resp)}")
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

    async def _commit(self, events: list[Event], next_batch: str, new_rooms: set[str]) -> None:
        """The sync's events and its next_batch (and newly joined rooms), together, fenced."""
        writes = [Write.set(self.sync_key, next_batch)]
        if new_rooms:
            writes.append(Write.sadd(self.joined_key, *new_rooms))
        await self._commit_with_crypto(events, writes)
        if events:
            self._events_in.inc(len(events))

    async def _commit_with_crypto(self, events: list[Event], writes: list[Write]) -> None:
        """Commit, with the crypto store and the waiting events when they changed."""
        if not self.encryption:
            await self.ctx.commit_inbound(events, writes)
            return
        async with self.crypto.lock:
            writes = writes + self.crypto.writes(pending=True)
            try:
                await self.ctx.commit_inbound(events, writes)
            except BaseException:
                self.crypto.unsaved()
                raise
