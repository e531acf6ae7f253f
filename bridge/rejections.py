"""Refused requests, logged in summary: never one WARNING each.

Whoever can reach a public listener can send it requests that are refused
(a forged webhook, a wrong api token, a stranger asking for ``/metrics``).
Logged one WARNING each, 3,000 of them in a few seconds pushed every real
warning out of the fleet's log stream (capped at 10,000 entries, the
management page's Logs view). A ``RejectionLog`` keeps the operator's view
and bounds what a stranger can write:

- the *first* refusal of a kind — a (source, what, cause) triple, e.g.
  (``nctalkbot.cloud``, ``webhook``, ``bad_signature``) — is logged at once,
  so a genuinely misconfigured peer (Talk signing with another BotSecret) is
  visible within the second;
- the ones after it are only counted, and ``flush`` (every few seconds, from
  ``run``) writes one line per kind per ``every`` seconds with the count, the
  last client's address and the last reason::

      nctalkbot.cloud: 2,991 webhooks refused (bad_signature) in the last 60 s;
      last from 10.0.0.5: signature does not match (check BotSecret)

- a kind quiet for ``every`` seconds starts over: its next refusal is logged
  at once again.

So the log holds at most two lines per kind per ``every`` seconds, whatever
the rate. Kinds are bounded by the code (sources are the configured accounts
and listeners, causes fixed labels), not by what clients send; the details
are cut to ``DETAIL_MAX`` characters. Counting for Prometheus stays with the
caller (``talkbridge_ingress_rejected{account,reason}``): the metric counts
every refusal, the log summarises them.

Lines name the source's account in the ``account`` extra when the source is
one (``protocol.name``), so the log stream files them under it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

EVERY = 60.0  # seconds between two summary lines of one kind
FLUSH_EVERY = 5.0  # seconds between run()'s looks for summaries that are due
DETAIL_MAX = 200  # characters of a client-caused reason kept in a line


@dataclass(slots=True)
class _Kind:
    """What one kind of refusal did since its last line."""

    since: float  # when its last line was logged
    count: int = 0  # refused since then, not yet in a line
    detail: str = ""
    peer: str = ""


def _shown(text: str) -> str:
    """One bounded line of a client-caused text (no newlines, no surrogates)."""
    text = " ".join(text.encode("utf-8", "backslashreplace").decode("utf-8").split())
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


class RejectionLog:
    """Refusals of every listener and account of one process, summed up.

    ``note`` is cheap (a dictionary update) and never waits; pass one
    instance to everything that refuses requests (no global state)."""

    def __init__(
        self,
        log: logging.Logger,
        every: float = EVERY,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        self.log = log
        self.every = every
        self.clock = clock
        self.level = level
        self._kinds: dict[tuple[str, str, str], _Kind] = {}

    def note(self, source: str, what: str, cause: str, detail: str = "", peer: str | None = None) -> None:
        """One request refused: ``source`` (an account or a listener) refused a
        ``what`` (``"webhook"``, ``"login"``; pluralised with an s) for
        ``cause`` (the metric's reason label), saying ``detail``, to ``peer``."""
        now = self.clock()
        key = (source, what, cause)
        kind = self._kinds.get(key)
        peer = _shown(peer or "unknown")
        if kind is None or (kind.count == 0 and now - kind.since >= self.every):
            # the first of its kind, or the first after a quiet spell: at once
            self._kinds[key] = _Kind(since=now)
            self._emit(source, f"{source}: {what} refused ({cause}) from {peer}: {_shown(detail)}; "
                       f"more alike are summed up every {self.every:g} s")  # fmt: skip
            return
        kind.count += 1
        kind.detail = detail
        kind.peer = peer
        if now - kind.since >= self.every:
            self._summarize(key, kind, now)

    def flush(self, force: bool = False) -> None:
        """Log the summaries that are due (all of them when ``force``: at shutdown);
        forget kinds that stayed quiet for a whole period."""
        now = self.clock()
        for key, kind in list(self._kinds.items()):
            if kind.count and (force or now - kind.since >= self.every):
                self._summarize(key, kind, now)
            elif not kind.count and now - kind.since >= self.every:
                del self._kinds[key]  # quiet: its next refusal is logged at once

    def pending(self) -> int:
        """Refusals counted and not yet in a line."""
        return sum(kind.count for kind in self._kinds.values())

    async def run(self) -> None:
        """Write the summaries as they fall due; never ends (cancel it, then ``flush(force=True)``)."""
        while True:
            await asyncio.sleep(min(FLUSH_EVERY, self.every))
            self.flush()

    def _summarize(self, key: tuple[str, str, str], kind: _Kind, now: float) -> None:
        source, what, cause = key
        plural = what if kind.count == 1 else what + "s"
        self._emit(
            source,
            f"{source}: {kind.count:,} {plural} refused ({cause}) in the last {now - kind.since:.0f} s; "
            f"last from {kind.peer}: {_shown(kind.detail)}",
        )
        kind.since, kind.count, kind.detail, kind.peer = now, 0, "", ""

    def _emit(self, source: str, line: str) -> None:
        # an account is always "protocol.name" (as bridge/logstream.py tells them apart)
        self.log.log(self.level, "%s", line, extra={"account": source if "." in source else ""})
