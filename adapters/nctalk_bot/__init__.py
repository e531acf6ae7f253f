"""Nextcloud Talk bot (webhook): ``[nctalkbot.NAME]``: adapters/nctalk_bot/adapter.py.

Where a Talk webhook is verified and admitted: webhook.py
(``Webhook.verify_webhook``, ``ADMIT``); sending through the bot API:
sending.py; names, tunables and the signature: common.py."""

from adapters.nctalk_bot.adapter import TalkBot, install_command, talk_bot_command, webhook_path
from adapters.nctalk_bot.common import (
    H_BACKEND,
    H_RANDOM,
    H_SIGNATURE,
    PROTOCOL,
    REPLAY_KEPT,
    REPLAY_KEPT_DAYS,
    WebhookRejected,
    sign,
)

__all__ = [
    "H_BACKEND",
    "H_RANDOM",
    "H_SIGNATURE",
    "PROTOCOL",
    "REPLAY_KEPT",
    "REPLAY_KEPT_DAYS",
    "TalkBot",
    "WebhookRejected",
    "install_command",
    "sign",
    "talk_bot_command",
    "webhook_path",
]
