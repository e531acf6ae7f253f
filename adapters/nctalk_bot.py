"""Nextcloud Talk bot (webhook): ``[nctalkbot.NAME]``.

Talk calls ``POST /webhook/nextcloud/NAME`` on the daemon's shared HTTP
server (every instance serves it) with an ActivityStreams payload signed as
``hex(HMAC-SHA256(BotSecret, X-Nextcloud-Talk-Random + raw body))``. The
handler verifies over the raw bytes, refuses replays, puts the event in Redis
and answers 200 — Talk waits for the answer (at most 5 s) before the sender's
own message is confirmed, so nothing slow happens here.

Outbound, the bot API (``…/api/v1/bot/{token}/message`` and
``…/reaction/{messageId}``) is signed over ``random + message text`` (or the
reaction), never over the JSON body. It answers 201 with ``data: null``: the
id of a posted message is never known, so replies/reactions *to the bot's
own messages* are mapped only once Talk shows their id in a later webhook
(a reply's ``inReplyTo``, a reaction's object; see ``_learn_own``). It cannot
edit or delete either; those deliveries are skipped. See docs/talk-bot.md.

Replays: Talk's webhook carries no timestamp; its random is the only nonce,
and Talk sends each webhook once, while the message is posted, never late.
A verified webhook is admitted by one script (``ADMIT``) that refuses a
random seen within ``ReplayWindow``; a ``Create`` or ``Activity`` whose
message id is at or below the highest id first seen at least
``ReplayWindow`` ago (Talk's message ids are one server-wide increasing
sequence, so that message is older than the window: Talk sent its webhook
long ago); and a ``Join``, ``Leave``, ``Like`` or ``Undo`` whose random is
among the account's last ``REPLAY_KEPT`` such randoms of the last
``REPLAY_KEPT_DAYS`` (they bring no new id). Only an admitted webhook moves
the room between the rooms and refused-rooms sets, in the same script: a
refused one changes nothing.

Modelled on Talk 19 (Nextcloud 29) with the Talk 21+ additions
(``object.inReplyTo``, ``Like`` / ``Undo`` reaction hooks).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar, TextIO
from urllib.parse import quote

import httpx
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from adapters.checks import url_problems
from adapters.talk.common import (
    BRUTEFORCE_MAX_DELAY,
    MAX_CHAT_LENGTH,
    OCS_API,
    OCS_HEADERS,
    BadContent,
    is_message_id,
    parse_content,
    php_trim,
    reference_id,
    render,
    retry_after,
    split_message,
)
from bridge.adapter import (
    AccountFailed,
    Adapter,
    AdapterContext,
    CliCommand,
    Option,
    PermanentError,
    ServerUnavailable,
    TransientError,
    error_for_status,
)
from bridge.config import AccountConfig, Config, ConfigError
from bridge.events import Delivery, Event, EventKind
from bridge.groupcommit import GroupCommit, Op
from bridge.idmap import canonical_of
from bridge.listener import Refused, read_body

PROTOCOL = "nctalkbot"
WEBHOOK_PREFIX = "/webhook/nextcloud/"
BOT_API = OCS_API + "/bot"
H_RANDOM = "X-Nextcloud-Talk-Random"
H_SIGNATURE = "X-Nextcloud-Talk-Signature"
H_BACKEND = "X-Nextcloud-Talk-Backend"
H_BOT_RANDOM = "X-Nextcloud-Talk-Bot-Random"
H_BOT_SIGNATURE = "X-Nextcloud-Talk-Bot-Signature"
MIN_RANDOM = 32  # Talk sends 64 chars; it requires >= 32 from bots
MAX_RANDOM = 256
ROOM_CONFIRM = 60.0  # seconds a room, once written to the rooms set, is not rewritten in full by this process
SECRET_PROVEN_FOR = 3600  # seconds a verified exchange vouches for the secret (fleet-wide, in Redis)
SECRET_PROOF_REFRESH = 60.0  # seconds between one process's rewrites of that proof (the webhook path is hot)
ECHO_TTL = 600  # seconds a "we reacted" marker waits for Talk's echo
REPLAY_KEPT = 100_000  # Join/Leave/Like/Undo randoms remembered per account (about 15 MB of Redis when full)
REPLAY_KEPT_DAYS = 400  # and for at most this long; also how long the id floor outlives a quiet account
ID_DIGITS = 20  # message ids compared as zero-padded strings: numeric order without Lua's floats
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


class WebhookRejected(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason  # metrics label
        self.detail = detail


def sign(secret: str, random: str, data: str | bytes) -> str:
    """hex HMAC-SHA256(secret, random + data), as Talk computes it both ways."""
    payload = random.encode() + (data if isinstance(data, bytes) else data.encode())
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def webhook_path(account: AccountConfig) -> str:
    return WEBHOOK_PREFIX + account.bridge


def install_command(account: AccountConfig) -> str:
    """The ``occ`` line that registers this account's bot in Talk.

    The secret is printed: this is for the operator's terminal only. Without
    ``WebhookURL`` a placeholder stands in for the public URL.
    """
    name = account.get("BotName") or account.bridge
    url = account.get("WebhookURL") or f"https://PUBLIC-HOST{webhook_path(account)}"
    return (
        "occ talk:bot:install --feature webhook --feature response --feature reaction "
        f"{_shell_quote(name)} {_shell_quote(account.get('BotSecret', ''))} {_shell_quote(url)}"
    )


def talk_bot_command(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    """``talkbridge talk-bot-command --config FILE NAME``: print the occ line."""
    name = args.account if "." in args.account else f"{PROTOCOL}.{args.account}"
    account = config.accounts.get(name)
    if account is None or account.protocol != PROTOCOL:
        bots = ", ".join(n for n, a in config.accounts.items() if a.protocol == PROTOCOL) or "none"
        raise ConfigError([f'talk-bot-command: no {PROTOCOL} account "{args.account}" (configured: {bots})'])
    if not account.get("WebhookURL"):
        print(
            f"talk-bot-command: {name}.WebhookURL is not set; replace PUBLIC-HOST with the address Talk can reach",
            file=sys.stderr,
        )
    print(install_command(account), file=out)
    return 0


def _talk_bot_command_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("account", help=f"the account: NAME or {PROTOCOL}.NAME")


class TalkBot(Adapter):
    protocol = PROTOCOL
    options: ClassVar[dict[str, Option]] = {
        "Server": Option(str, required=True, help="Nextcloud base URL, e.g. https://cloud.example.com"),
        "BotSecret": Option(str, required=True, secret=True, help="the secret given to occ talk:bot:install"),
        "WebhookURL": Option(str, default="", help="public URL Talk calls (for talk-bot-command)"),
        "BotName": Option(str, default="", help="name shown in Talk; default: the account name"),
        "Persona": Option(str, default="", help="LLM persona answering in this bot's rooms"),
        "Timeout": Option(
            (int, float), default=15, above=0, help="seconds per request to Talk, beyond its brute-force delay"
        ),
        "MessageLength": Option(
            int, default=MAX_CHAT_LENGTH, min=1, help="Talk's chat max-length; longer messages are split"
        ),
        "Silent": Option(bool, default=False, help="post without notifications"),
        "ReplayWindow": Option(
            int,
            default=3600,
            min=1,
            help="seconds a webhook random is remembered; messages older than this are refused by their id",
        ),
    }

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        acct = ctx.account
        self.name = acct.name
        self.secret: str = acct.get("BotSecret", "")
        self.server: str = str(acct.get("Server", "")).rstrip("/")
        self.timeout = float(acct.get("Timeout", 15))
        self.max_length = int(acct.get("MessageLength", MAX_CHAT_LENGTH) or MAX_CHAT_LENGTH)
        self.silent = bool(acct.get("Silent", False))
        self.replay_window = int(acct.get("ReplayWindow", 3600))
        url = acct.get("WebhookURL", "")
        # Talk's own actor id for this bot: "bots/bot-" + sha1(webhook URL).
        self.self_actor = f"bots/bot-{hashlib.sha1(url.encode()).hexdigest()}" if url else None
        self.rooms_key = ctx.rooms.key  # in the room batches below; the router reads the set through ctx.rooms too
        self.left_key = ctx.key("left")  # rooms refused: Talk said Leave, or a 401 once the secret was proven
        self.replay_ids_key = ctx.key("replay", "ids")
        self.replay_floor_key = ctx.key("replay", "floor")
        self.replay_randoms_key = ctx.key("replay", "randoms")
        self.replay_kept = REPLAY_KEPT
        self._admit = ctx.redis.register_script(ADMIT)
        # token -> when this process last wrote it to the rooms set in full.
        # Only a cache that saves commands on the hot webhook path: the room
        # state itself is the fleet's, in Redis. While it is fresh, a verified
        # webhook still sends one SMOVE left -> rooms, so a refusal recorded
        # since by any instance (a Leave, a 401) is lifted just as a full
        # rewrite would lift it: every removal from the rooms set also adds the
        # room to the left set. Fresh or not, the outcome is the same.
        self._rooms_confirmed: dict[str, float] = {}
        self._events_in = ctx.metrics.events_in.labels(acct.name)
        self._commands = GroupCommit(ctx.redis)
        self._client: httpx.AsyncClient | None = None
        # When Talk last proved it shares our secret (a verified webhook or an
        # accepted signed request), here; a 401 soon after means "not in this
        # room". Webhooks land on any instance and deliveries run on another,
        # so the proof is also kept in Redis for SECRET_PROVEN_FOR seconds,
        # under a key bound to this secret (a proof made with an old secret
        # must not vouch for a new, wrong one) that names nothing of it.
        self._secret_proven_at: float | None = None
        fingerprint = hmac.new(self.secret.encode(), b"talkbridge: secret proven", hashlib.sha256).hexdigest()
        self.proof_key = ctx.key("proven", fingerprint[:16])
        self._proof_written_at = -SECRET_PROOF_REFRESH  # monotonic time this process last wrote it

    # config ----------------------------------------------------------------------
    @classmethod
    def check_account(cls, account: AccountConfig) -> list[str]:
        problems = []
        secret = account.get("BotSecret", "")
        if secret and not 40 <= len(secret) <= 128:
            problems.append(f"{account.name}.BotSecret: must be 40 to 128 characters (Talk refuses others)")
        problems += url_problems(account, "Server", "WebhookURL")
        return problems

    @classmethod
    def cli_commands(cls) -> Sequence[CliCommand]:
        return (
            CliCommand(
                "talk-bot-command",
                "print the occ command that installs a Talk bot account",
                _talk_bot_command_arguments,
                talk_bot_command,
            ),
        )

    # lifecycle ---------------------------------------------------------------------
    async def connect(self) -> None:
        self._client = httpx.AsyncClient(
            # Nextcloud's brute-force throttle may hold a request up to
            # BRUTEFORCE_MAX_DELAY before handling it (every request from a
            # throttled IP) and as long again before answering a refused one.
            # A correct request is then still done, after the wait: a read
            # timeout inside that wait would retry (and post) it again, and a
            # refused one would be retried instead of stopping the account.
            timeout=httpx.Timeout(self.timeout, read=self.timeout + 2 * BRUTEFORCE_MAX_DELAY),
            headers=OCS_HEADERS,
        )

    async def disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def ingress_routes(self) -> list[web.RouteDef]:
        return [web.post(webhook_path(self.ctx.account), self.webhook)]

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
                await self.ctx.publish(event)
                self._events_in.inc()
        except (RedisError, OSError) as exc:
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
            await self._call("POST", f"{_path_token(delivery.channel)}/message", body, piece, room=delivery.channel)
            if i == 0:
                await self._remember_own(delivery, piece)
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
        wait = retry_after(resp.headers.get("Retry-After"))
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
