"""Helpers for the adapters' ``check_account`` (bridge/adapter.py): checks
several protocols share, kept on the adapters' side because the core never
calls them."""

from __future__ import annotations

from urllib.parse import urlsplit

from bridge.config import AccountConfig


def url_problems(account: AccountConfig, *keys: str) -> list[str]:
    """check_account's test of URL options: each that is set must be http(s) with a host."""
    problems = []
    for key in keys:
        value = account.get(key, "")
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                problems.append(f'{account.name}.{key}: "{value}" is not an http(s) URL')
    return problems
