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
import sys
from collections.abc import Sequence
from typing import ClassVar, TextIO

import httpx
from aiohttp import web

from adapters.checks import url_problems
from adapters.nctalk_bot.common import PROTOCOL, REPLAY_KEPT, SECRET_PROOF_REFRESH, WEBHOOK_PREFIX
from adapters.nctalk_bot.sending import Sending
from adapters.nctalk_bot.webhook import ADMIT, Webhook
from adapters.talk.common import (
    BRUTEFORCE_MAX_DELAY,
    MAX_CHAT_LENGTH,
    OCS_HEADERS,
)
from bridge.adapter import (
    Adapter,
    AdapterContext,
    CliCommand,
    Option,
)
from bridge.config import AccountConfig, Config, ConfigError
from bridge.groupcommit import GroupCommit


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


class TalkBot(Webhook, Sending, Adapter):
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
