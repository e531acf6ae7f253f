"""The session: the login (once, its device and token kept in Redis), a
refused token (logged in again once, or the account fails), every nio
request through ``_call``, and the configured rooms (aliases resolved and
remembered, joined).

A mixin of ``Matrix`` (adapters/matrix/adapter.py), which holds the state."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from nio import JoinError, LoginResponse, RoomResolveAliasResponse

from adapters.matrix.common import (
    DEVICE_NAME,
    TRANSPORT_ERRORS,
    TokenRefused,
    Unavailable,
    check_response,
    describe,
    errcode_of,
    status_of,
)
from bridge.adapter import AccountFailed, PermanentError


class Session:
    """``Matrix``'s login, requests and rooms."""

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
            status, code = status_of(resp), errcode_of(resp)
            if status in (0, 429) or status >= 500 or code == "M_LIMIT_EXCEEDED":
                raise ConnectionError(f"login: {describe(resp)}")
            await self._refuse(f"login of {self.login} refused: {describe(resp)}")
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
        await self.ctx.room_recovered(channel)  # if it failed to resolve before (nothing otherwise)
        return room

    async def _resolve_rooms(self) -> None:
        for channel in self.channels:
            try:
                await self._room_id(channel)
            except (Unavailable, PermanentError) as exc:
                self.ctx.log.error("%s: ALERT: room %s: %s", self.name, channel, exc)
                await self.ctx.room_failed(channel, str(exc), self.retry_max)  # tried again at the next start

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
