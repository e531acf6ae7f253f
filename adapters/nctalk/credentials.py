"""The account's credentials: the capabilities read, and a refused password
(401) stopping every poll and send of the account until one probe per
``RefusedRetrySeconds`` is accepted (see adapters/nctalk/adapter.py).

A mixin of ``TalkUser``, which holds the state it reads and writes."""

from __future__ import annotations

import asyncio
import contextlib
import time

from adapters.nctalk.common import THROTTLE_SLACK, Refused
from adapters.talk.chat import BadAnswer, parse_capabilities
from adapters.talk.client import CAPABILITIES, Unreachable
from bridge.adapter import TransientError


class Credentials:
    """``TalkUser``'s credential state: refused, probed, accepted again."""

    async def _load_capabilities(self) -> None:
        answer = await self._client().call("GET", CAPABILITIES, seconds=self.timeout + THROTTLE_SLACK)
        if answer.status == 401:
            raise Refused(f"GET capabilities: Talk answered 401 for {self.login} (app password wrong or revoked)")
        if answer.status != 200:
            raise ConnectionError(f"GET capabilities: Talk answered {answer.status}")
        self.caps = parse_capabilities(answer.body)

    async def _refuse(self, why: str) -> None:
        """Talk answered 401: every poll and send of the account stops until a probe is accepted."""
        if self._refused is None:
            self._next_probe = time.monotonic() + self.refused_pause
            self.ctx.log.critical(
                "%s: ALERT: credentials refused: %s; every room stops polling and sending; "
                "one request every %.0fs until Talk accepts them again", self.name, why, self.refused_pause,
            )  # fmt: skip
        self._refused = why
        self._refused_event.set()
        self._accepted.clear()
        await self.ctx.credentials_refused(why, self.refused_pause)

    async def _await_accepted(self) -> None:
        """While Talk refuses the credentials: one probe (``GET capabilities``)
        per ``RefusedRetrySeconds`` for the whole account — receive and every
        send wait here — until one is accepted. Nextcloud counts each refused
        probe towards its brute-force lockout: one per pause, never a loop."""
        while self._refused is not None:
            wait = self._next_probe - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._accepted.wait()
                continue
            async with self._probe_lock:
                if self._refused is not None and time.monotonic() >= self._next_probe:
                    await self._probe()

    async def _probe(self) -> None:
        try:
            await self._load_capabilities()
        except Refused as exc:
            self._refused = str(exc)
            why = "still refused"
        except (Unreachable, BadAnswer, ConnectionError, TransientError) as exc:
            why = f"not answered ({exc})"  # Talk away, or its brute-force block's 429: no news of the password
        else:
            self.ctx.log.warning("%s: credentials accepted again; polling and sending resume", self.name)
            self._refused = None
            self._refused_event.clear()
            self._accepted.set()
            await self.ctx.credentials_accepted()
            return
        self._next_probe = time.monotonic() + self.refused_pause
        self.ctx.log.error("%s: credentials %s; next probe in %.0fs", self.name, why, self.refused_pause)
        await self.ctx.credentials_refused(self._refused or why, self.refused_pause)
