"""Outbound: deliveries to Talk through the bot API, signed over the text
(or the reaction), and whether Talk has lately shown that it shares the
secret (a 401 then means "not in this room", not "wrong secret").

A mixin of ``TalkBot`` (adapters/nctalk_bot/adapter.py), which holds the state."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any
from urllib.parse import quote

import httpx
from redis.exceptions import RedisError

from adapters.nctalk_bot.common import (
    BOT_API,
    ECHO_TTL,
    H_BOT_RANDOM,
    H_BOT_SIGNATURE,
    SECRET_PROOF_REFRESH,
    SECRET_PROVEN_FOR,
    sign,
)
from adapters.talk.common import (
    reference_id,
    split_message,
)
from bridge.adapter import (
    AccountFailed,
    PermanentError,
    ServerUnavailable,
    TransientError,
    error_for_status,
    retry_after_header,
)
from bridge.events import Delivery, EventKind
from bridge.groupcommit import Op


class Sending:
    """``TalkBot``'s send side: posts and reactions, and the secret's proof."""

    # outbound ------------------------------------------------------------------------
    async def send(self, delivery: Delivery) -> str | None:
        event = delivery.event
        if event.kind in (EventKind.REACTION, EventKind.UNREACTION):
            await self._react(delivery)
            return None
        if event.kind in (EventKind.EDIT, EventKind.DELETE):
            # The bot API can neither edit nor delete: nothing to do.
            self.ctx.metrics.skipped.labels(self.name, f"bot_cannot_{event.kind.value}").inc()
            return None
        if await self.ctx.redis.sismember(self.left_key, delivery.channel):
            # Talk would answer 401 (indistinguishable from a wrong secret) and
            # count a brute-force attempt: refuse here instead.
            raise PermanentError(f"the bot was removed from room {delivery.channel} (Leave received)")
        text = delivery.username + delivery.text
        for att in event.attachments:  # the bot API cannot upload: name and link
            text += ("\n" if text.strip() else "") + (f"{att.name}: {att.url}" if att.url else f"[file {att.name}]")
        pieces = split_message(text, self.max_length)
        for i, piece in enumerate(pieces):
            body: dict[str, Any] = {
                "message": piece,
                "referenceId": reference_id(delivery.key, i),
                "silent": self.silent,
            }
            if i == 0 and delivery.reply_to and delivery.reply_to.isdigit():
                body["replyTo"] = int(delivery.reply_to)
            if i == 0:
                # Before the post, never after: a Redis error after Talk's 201 would fail a send
                # Talk has taken, and the message would be posted again (a Redis failover).
                await self._remember_own(delivery, piece)
            await self._call("POST", f"{_path_token(delivery.channel)}/message", body, piece, room=delivery.channel)
        return None  # Talk answers 201 with data null: the message id is unknown

    async def _react(self, delivery: Delivery) -> None:
        emoji = delivery.event.reaction or ""
        target = delivery.target_id or ""
        if not emoji or not target.isdigit():
            raise PermanentError(f"reaction needs an emoji and a numeric message id (got {target!r})")
        add = delivery.event.kind == EventKind.REACTION
        marker = self._echo_key(delivery.channel, target, emoji, "add" if add else "del")
        await self.ctx.redis.set(marker, b"1", ex=ECHO_TTL)  # before: Talk's echo arrives before its 201
        path = f"{_path_token(delivery.channel)}/reaction/{target}"
        try:
            status = await self._call(
                "POST" if add else "DELETE", path, {"reaction": emoji}, emoji, ok_404=not add, room=delivery.channel
            )
        except Exception:
            try:  # no echo will come: a later identical reaction's echo must not be taken for this one's
                await self.ctx.redis.delete(marker)
            except (RedisError, OSError) as cleanup:  # the delivery's own error is what the core must see
                self.ctx.log.warning(
                    "%s: could not remove the echo marker of a failed reaction in room %s "
                    "(Talk's echo of the same reaction within %ds may be dropped): %s",
                    self.name,
                    delivery.channel,
                    ECHO_TTL,
                    cleanup,
                )
            raise
        if status == 404:  # DELETE of a reaction that is not there: already the wanted state
            await self.ctx.redis.delete(marker)

    async def _call(
        self, method: str, path: str, body: dict[str, Any], signed: str, *, room: str, ok_404: bool = False
    ) -> int:
        if self._client is None:
            raise TransientError("not connected")
        random = secrets.token_hex(32)  # 64 chars, fresh per request
        headers = {
            H_BOT_RANDOM: random,
            H_BOT_SIGNATURE: sign(self.secret, random, signed),
            "Content-Type": "application/json",
        }
        url = f"{self.server}{BOT_API}/{path}"
        content = json.dumps(body, ensure_ascii=False).encode()
        try:
            started = time.monotonic()
            resp = await self._client.request(method, url, content=content, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # no connection: Talk never saw the request
            raise ServerUnavailable(f"{method} {path}: Talk unreachable: {exc.__class__.__name__}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise TransientError(f"{method} {path}: timed out ({exc.__class__.__name__})") from exc
        except httpx.HTTPError as exc:
            raise TransientError(f"{method} {path}: {exc.__class__.__name__}: {exc}") from exc
        status = resp.status_code
        held = time.monotonic() - started
        if held > self.timeout:  # only Talk's throttle makes a healthy server this slow
            self.ctx.log.warning(
                "%s: Talk took %.0fs to answer %s %s (%d): Nextcloud's brute-force protection is delaying "
                "this IP after refused signatures (fix the cause, then occ security:bruteforce:reset IP)",
                self.name,
                held,
                method,
                path,
                status,
            )
        if status in (200, 201) or (ok_404 and status == 404):
            await self._request_accepted()
            return status
        what = f"{method} {path}: Talk answered {status}"
        if status == 401:
            try:
                proven = await self._secret_proven()
            except (RedisError, OSError) as exc:
                raise TransientError(f"{what}; whether the secret was proven is unknown (Redis: {exc})") from exc
            if proven:
                # The secret works elsewhere: the bot is not enabled in this
                # room. Refuse the room from now on, on every instance (each
                # 401 counts towards Talk's brute-force lockout), and keep the
                # account up.
                try:
                    await self._commands.run(
                        [("srem", (self.rooms_key, room), {}), ("sadd", (self.left_key, room), {})]
                    )
                except (RedisError, OSError) as exc:
                    self.ctx.log.warning("%s: could not record room %s as refused: %s", self.name, room, exc)
                hint = f"occ talk:bot:setup BOT_ID {room}"
                raise PermanentError(f"{what}: the bot is not enabled in room {room} ({hint})")
            raise AccountFailed(f"{what} (bot not enabled in the room, or BotSecret differs from occ talk:bot:install)")
        wait = retry_after_header(resp.headers.get("Retry-After"))
        if status == 429 and wait is None:
            # The bot API has no rate limit: its 429 is the brute-force block
            # (more than ten refused signatures from this IP in 30 minutes),
            # with no Retry-After. Retrying cannot help until it lapses or an
            # admin lifts it; stop the account instead of dead-lettering.
            raise AccountFailed(
                f"{what}: Nextcloud's brute-force protection blocks this IP after repeated refused signatures "
                "(fix BotSecret or the rooms, then occ security:bruteforce:reset IP)"
            )
        raise error_for_status(status, what, wait)

    # Whether Talk has shown, lately, that it shares our secret --------------------------
    def _proof_op(self) -> Op:
        """Record, for every instance, that the secret was proven (the value: when, for people)."""
        return ("set", (self.proof_key, str(int(time.time()))), {"ex": SECRET_PROVEN_FOR})

    async def _request_accepted(self) -> None:
        """Talk accepted a signed request: the secret is right. The fleet hears
        of it at most once per SECRET_PROOF_REFRESH from this process."""
        now = time.monotonic()
        self._secret_proven_at = now
        if now - self._proof_written_at < SECRET_PROOF_REFRESH:
            return
        try:
            await self._commands.run([self._proof_op()])
        except (RedisError, OSError) as exc:  # the request was done: never fail it for this
            self.ctx.log.warning("%s: could not record that Talk accepted the secret: %s", self.name, exc)
        else:
            self._proof_written_at = now

    async def _secret_proven(self) -> bool:
        """Proven within SECRET_PROVEN_FOR, to this process or to any instance."""
        proven = self._secret_proven_at
        if proven is not None and time.monotonic() - proven < SECRET_PROVEN_FOR:
            return True
        return bool(await self.ctx.redis.exists(self.proof_key))


def _path_token(token: str) -> str:
    return quote(token, safe="")
