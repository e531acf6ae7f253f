"""The Talk bot's names and tunables, its signature, and the webhook's refusal.

Shared by the webhook (adapters/nctalk_bot/webhook.py), sending
(adapters/nctalk_bot/sending.py) and the adapter (adapters/nctalk_bot/adapter.py)."""

from __future__ import annotations

import hashlib
import hmac

from adapters.talk.common import OCS_API

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
