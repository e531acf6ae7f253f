"""Nextcloud Talk as a user account (``[nctalk.NAME]``): adapters/nctalk/adapter.py."""

from adapters.nctalk.adapter import TalkUser
from adapters.nctalk.common import safe_name

__all__ = ["TalkUser", "safe_name"]
