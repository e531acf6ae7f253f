"""Inbound: where a Talk webhook is verified (``Webhook.verify_webhook``: size,
headers, HMAC over the raw bytes), admitted once (``ADMIT``: replays refused,
the room's state moved, in one script), parsed (``_parse``) and turned into
events (``_event``); and the ids of the bot's own messages learned from what
Talk shows of them later (``_learn_own``).

A mixin of ``TalkBot`` (adapters/nctalk_bot/adapter.py), which holds the state."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from adapters.nctalk_bot.common import (
    H_RANDOM,
    H_SIGNATURE,
    ID_DIGITS,
    MAX_RANDOM,
    MIN_RANDOM,
    REPLAY_KEPT_DAYS,
    ROOM_CONFIRM,
    SECRET_PROOF_REFRESH,
    WebhookRejected,
    sign,
)
from adapters.talk.common import (
    BadContent,
    is_message_id,
    parse_content,
    php_trim,
    render,
)
from bridge.events import Delivery, Event, EventKind
from bridge.groupcommit import NotReplicated
from bridge.idmap import canonical_of
from bridge.listener import Refused, read_body

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

# Admit a verified webhook once, atomically; see the module docstring. Times
# are Redis's clock (TIME), one clock for the fleet. Returns 1 admitted, 0 a
# random seen before, -1 a message id older than the window.
# KEYS: 1 seen:RANDOM, 2 ids (zset: padded message id -> first seen, ms),
#       3 floor (the highest id first seen a window ago or more), 4 randoms
#       (zset: random -> seen, ms), 5 rooms, 6 refused rooms.
# ARGV: 1 window ms, 2 padded message id or "", 3 random, 4 randoms kept,
#       5 ms kept, 6 room op ("confirm" | "lift" | "leave"), 7 room token.
ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local kept_ms = tonumber(ARGV[5])
if ARGV[2] ~= '' then
  local cutoff = now - tonumber(ARGV[1])
  local floor = redis.call('GET', KEYS[3]) or ''
  local aged = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if #aged > 0 then
    for _, id in ipairs(aged) do
      if id > floor then floor = id end
    end
    redis.call('SET', KEYS[3], floor, 'PX', kept_ms)
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  end
  if ARGV[2] <= floor then return -1 end
  redis.call('ZADD', KEYS[2], 'NX', now, ARGV[2])
  redis.call('PEXPIRE', KEYS[2], kept_ms)
else
  if redis.call('ZSCORE', KEYS[4], ARGV[3]) then return 0 end
  redis.call('ZADD', KEYS[4], now, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - kept_ms)
  local over = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[4])
  if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[4], 0, over - 1) end
  redis.call('PEXPIRE', KEYS[4], kept_ms)
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
if ARGV[6] == 'leave' then
  redis.call('SREM', KEYS[5], ARGV[7])
  redis.call('SADD', KEYS[6], ARGV[7])
elseif ARGV[6] == 'confirm' then
  redis.call('SADD', KEYS[5], ARGV[7])
  redis.call('SREM', KEYS[6], ARGV[7])
else
  redis.call('SMOVE', KEYS[6], KEYS[5], ARGV[7])
end
return 1
"""
ADMITTED, SEEN_RANDOM, OLDER_THAN_WINDOW = 1, 0, -1


class Webhook:
    """``TalkBot``'s inbound side: the webhook route and what it admits."""

    # inbound -------------------------------------------------------------------------
    async def webhook(self, request: web.Request) -> web.Response:
        try:
            raw, random = await self.verify_webhook(request)
            payload = _parse(raw)
            await self._accept(payload, random)
        except WebhookRejected as exc:
            self.ctx.metrics.rejected.labels(self.name, exc.reason).inc()
            if exc.status >= 500:  # a verified webhook we could not take: ours to fix, each one
                self.ctx.log.error("%s: webhook not accepted: %s", self.name, exc.detail)
            else:  # anyone can send these: the first at once, then one line a minute (bridge/rejections.py)
                detail = f"{exc.status}: {exc.detail}"
                self.ctx.rejections.note(self.name, "webhook", exc.reason, detail, request.remote)
            return web.json_response({"error": exc.detail}, status=exc.status)
        return web.Response(status=200)

    async def verify_webhook(self, request: web.Request) -> tuple[bytes, str]:
        """Size, headers, then HMAC over the raw bytes; returns (body, random)."""
        limit = self.ctx.max_body
        if request.content_length is not None and request.content_length > limit:
            raise WebhookRejected(413, "too_large", f"body larger than {limit} bytes")
        random = request.headers.get(H_RANDOM, "")
        signature = request.headers.get(H_SIGNATURE, "")
        if not random or not signature:
            raise WebhookRejected(401, "missing_signature", f"{H_RANDOM} and {H_SIGNATURE} are required")
        if (
            not MIN_RANDOM <= len(random) <= MAX_RANDOM
            or not (random.isascii() and random.isprintable())  # bytes that are not UTF-8 arrive as surrogates
            or not _HEX64.fullmatch(signature)
        ):
            raise WebhookRejected(401, "bad_signature", "malformed random or signature")
        try:
            raw = await read_body(request, limit)  # bounded, chunked or not
        except Refused as exc:
            label = {413: "too_large", 408: "timeout"}.get(exc.status, "bad_body")
            raise WebhookRejected(exc.status, label, exc.reason) from None
        expected = sign(self.secret, random, raw)
        if not hmac.compare_digest(expected, signature.lower()):
            raise WebhookRejected(401, "bad_signature", "signature does not match (check BotSecret)")
        return raw, random

    async def _accept(self, payload: dict[str, Any], random: str) -> None:
        now = time.monotonic()
        self._secret_proven_at = now  # it verified: Talk signs with our secret
        kind = payload["type"]
        token = _room_of(payload)
        seen_key = self.ctx.key("seen", random)
        message_id = _new_message_id(payload)
        redis = self.ctx.redis
        confirm = False  # a verified hook proves the bot is in the room
        if kind == "Leave":
            room_op = "leave"
            self._rooms_confirmed.pop(token, None)
        elif kind == "Join" or now - self._rooms_confirmed.get(token, -ROOM_CONFIRM) >= ROOM_CONFIRM:
            room_op, confirm = "confirm", True
        else:  # written here lately: only lift a refusal made since, anywhere (see __init__)
            room_op = "lift"
        keys = (seen_key, self.replay_ids_key, self.replay_floor_key, self.replay_randoms_key,
                self.rooms_key, self.left_key)  # fmt: skip
        args = (self.replay_window * 1000, message_id, random, self.replay_kept, REPLAY_KEPT_DAYS * 86_400_000,
                room_op, token)  # fmt: skip
        prove = now - self._proof_written_at >= SECRET_PROOF_REFRESH
        # the proof: tell the fleet, in the same pipeline (no round trip of its own); safe to write twice
        also = [self._proof_op()] if prove else []
        try:
            verdict = (await self._commands.run_script(self._admit, keys, args, also))[0]
            if prove:
                self._proof_written_at = now
            if verdict == ADMITTED and confirm:
                self._rooms_confirmed[token] = now
        except (RedisError, OSError) as exc:
            raise WebhookRejected(503, "redis", f"message queue unavailable, retry later ({exc})") from None
        if verdict == OLDER_THAN_WINDOW:
            raise WebhookRejected(
                409, "replay", f"message {message_id.lstrip('0') or '0'} is older than the replay window "
                f"({self.replay_window} s): Talk sends no webhook that late (a replay)",
            )  # fmt: skip
        if verdict != ADMITTED:
            raise WebhookRejected(409, "replay", "this request was already received (replayed random)")
        try:
            event = await self._event(payload, token)
            if event is not None:
                await self.ctx.publish(event)  # its WAIT ([redis] MinReplicas) covers the marker written before it
                self._events_in.inc()
            elif self.ctx.bus is not None:  # a join or leave: the room state just written, on replicas
                await self.ctx.bus.replicated()
        except (RedisError, OSError) as exc:
            if isinstance(exc, NotReplicated):
                self.ctx.metrics.replication_short.labels("webhook").inc()
            try:  # let a genuine retry through: it was not accepted
                await redis.delete(seen_key)
                if not message_id:
                    await redis.zrem(self.replay_randoms_key, random)
            except (RedisError, OSError) as cleanup:
                self.ctx.log.warning(
                    "%s: could not clear the replay marker of a webhook answered 503 "
                    "(a resend within %ds will be refused as a replay): %s",
                    self.name,
                    self.replay_window,
                    cleanup,
                )
            raise WebhookRejected(503, "redis", f"message queue unavailable, retry later ({exc})") from None

    async def _event(self, payload: dict[str, Any], token: str) -> Event | None:
        kind = payload["type"]
        if kind in ("Join", "Leave"):
            actor_id = payload["actor"]["id"]
            if kind == "Join" and isinstance(actor_id, str) and actor_id.startswith("bots/"):
                await self.ctx.redis.set(self.ctx.key("self"), actor_id)
            self.ctx.log.info("%s: bot %s room %s", self.name, "added to" if kind == "Join" else "removed from", token)
            return None
        if kind == "Activity":
            return None  # system messages: nothing to bridge
        actor = payload["actor"]
        obj = payload["object"]
        base = {
            "account": self.name,
            "channel": token,
            "sender_id": actor["id"],
            "sender_name": actor.get("name") or actor["id"],
            "origin": [f"{self.name}/{token}"],
        }
        if kind == "Create":
            message, parameters = _content(obj)
            text, files = render(message, parameters)
            event = Event(kind=EventKind.MESSAGE, text=text, native_id=str(obj["id"]), attachments=files, **base)
            parent = obj.get("inReplyTo")
            if isinstance(parent, dict) and isinstance(parent.get("object"), dict) and "id" in parent["object"]:
                event.reply_to = str(parent["object"]["id"])
                parent_actor = parent.get("actor")
                if isinstance(parent_actor, dict) and str(parent_actor.get("id", "")).startswith("bots/"):
                    await self._learn_own(token, parent["object"])  # a reply to a bridged message
            return event
        if kind == "Like":
            target, emoji = str(obj["id"]), payload["content"]
            if await self._own_echo(actor["id"], token, target, emoji, "add"):
                return None
            await self._learn_own(token, obj)  # maybe a reaction to a bridged message
            return Event(kind=EventKind.REACTION, target_id=target, reaction=emoji, **base)
        # Undo: object is the whole Like
        target = str(obj["object"]["id"])
        emoji = obj.get("content") if isinstance(obj.get("content"), str) else payload.get("content")
        if await self._own_echo(actor["id"], token, target, emoji, "del"):
            return None
        await self._learn_own(token, obj["object"])
        return Event(kind=EventKind.UNREACTION, target_id=target, reaction=emoji, **base)

    # The bot API never tells us the id of what we posted. Talk does show it
    # later: a reply's inReplyTo and a reaction's object carry the message's
    # id and text. We remember each posted text (per room) with the message
    # it copies, and when Talk shows that text with an id, the id map learns
    # it — then replies and reactions to bridged messages cross like any other.
    @staticmethod
    def _own_key(text: str) -> str:
        return php_trim(text)  # as Talk stores it: the webhook shows the text PHP's trim() left

    async def _remember_own(self, delivery: Delivery, text: str) -> None:
        """Before posting: Talk will not tell the id of the bot's message, but
        a later reply or reaction shows it with its text (``_learn_own``)."""
        canonical = canonical_of(delivery)
        if canonical is None or self.ctx.idmap is None:
            return
        await self.ctx.idmap.remember(self.name, delivery.channel, self._own_key(text), canonical)

    async def _learn_own(self, token: str, note: dict[str, Any]) -> None:
        if self.ctx.idmap is None:
            return
        try:
            message, _parameters = _content(note)
        except (WebhookRejected, KeyError, TypeError, ValueError):
            return  # not a message note (a system message, a file): nothing to learn
        await self.ctx.idmap.learn_remembered(self.name, token, self._own_key(message), str(note["id"]))

    async def _own_echo(self, actor_id: str, token: str, target: str, emoji: str, op: str) -> bool:
        """Talk sends reaction hooks for the bot's own reactions too (and
        before Talk 22.0.x names the *message author* as their actor): a
        marker set just before each reaction we post recognizes the echo."""
        consumed = await self.ctx.redis.delete(self._echo_key(token, target, emoji, op))
        if consumed:
            return True
        return self.self_actor is not None and actor_id == self.self_actor

    def _echo_key(self, token: str, target: str, emoji: str, op: str) -> str:
        digest = hashlib.sha256(f"{token}\x1f{target}\x1f{emoji}".encode()).hexdigest()[:32]
        return self.ctx.key("echo", op, digest)


# payload validation -------------------------------------------------------------------
def _parse(raw: bytes) -> dict[str, Any]:
    try:  # orjson refuses what the rest could not carry: not UTF-8, lone surrogates, NaN, nesting past 1,024
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WebhookRejected(400, "bad_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise WebhookRejected(400, "bad_shape", "body must be a JSON object")
    kind = payload.get("type")
    if kind not in ("Create", "Like", "Undo", "Join", "Leave", "Activity"):
        raise WebhookRejected(400, "bad_shape", f"unknown activity type {kind!r}")
    actor = payload.get("actor")
    if not isinstance(actor, dict) or not _nonempty(actor.get("id")):
        raise WebhookRejected(400, "bad_shape", "actor.id is missing")
    if not isinstance(actor.get("name", ""), str):
        raise WebhookRejected(400, "bad_shape", "actor.name must be a string")
    obj = payload.get("object")
    if not isinstance(obj, dict):
        raise WebhookRejected(400, "bad_shape", "object is missing")
    if kind in ("Join", "Leave"):
        if not _nonempty(obj.get("id")):
            raise WebhookRejected(400, "bad_shape", "object.id (the room token) is missing")
        return payload
    target = payload.get("target")
    if not isinstance(target, dict) or not _nonempty(target.get("id")):
        raise WebhookRejected(400, "bad_shape", "target.id (the room token) is missing")
    if kind == "Create":
        if not is_message_id(obj.get("id")):
            raise WebhookRejected(400, "bad_shape", "object.id is not a message id")
        _content(obj)
        reply = obj.get("inReplyTo")
        if reply is not None and not (
            isinstance(reply, dict)
            and isinstance(reply.get("object"), dict)
            and is_message_id(reply["object"].get("id"))
        ):
            raise WebhookRejected(400, "bad_shape", "object.inReplyTo.object.id is not a message id")
    elif kind == "Like":
        if not is_message_id(obj.get("id")):
            raise WebhookRejected(400, "bad_shape", "object.id is not a message id")
        if not _nonempty(payload.get("content")):
            raise WebhookRejected(400, "bad_shape", "content (the emoji) is missing")
    elif kind == "Undo":
        like = obj.get("object")
        if obj.get("type") != "Like" or not isinstance(like, dict) or not is_message_id(like.get("id")):
            raise WebhookRejected(400, "bad_shape", "Undo must carry the Like with object.object.id")
        if not _nonempty(obj.get("content")) and not _nonempty(payload.get("content")):
            raise WebhookRejected(400, "bad_shape", "object.content (the emoji) is missing")
    return payload


def _content(obj: dict[str, Any]) -> tuple[str, Any]:
    try:
        return parse_content(obj.get("content"))
    except BadContent as exc:
        raise WebhookRejected(400, "bad_shape", str(exc)) from None


def _new_message_id(payload: dict[str, Any]) -> str:
    """The id of the message a ``Create`` or ``Activity`` announces, zero-padded
    to ID_DIGITS so that string order is numeric order; "" for the other
    types (their ids name older messages or rooms) and for an id that is not
    a message id of at most ID_DIGITS digits (then its random is kept long)."""
    if payload["type"] not in ("Create", "Activity"):
        return ""
    value = payload["object"].get("id")
    if not is_message_id(value):
        return ""
    digits = str(value)
    return digits.zfill(ID_DIGITS) if len(digits) <= ID_DIGITS else ""


def _room_of(payload: dict[str, Any]) -> str:
    if payload["type"] in ("Join", "Leave"):
        return str(payload["object"]["id"])
    return str(payload["target"]["id"])


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and value != ""
