"""Logins, sessions and CSRF tokens of the management page, kept in Redis.

Kept in Redis rather than in one process so that every instance serving the
page (behind one name or a load balancer) knows every session, and a
lockout holds across them.

- **Session**: a random 256-bit token in a cookie (``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` when configured); Redis holds only its
  SHA-256 (``P:admin:session:HASH``: user, CSRF token, creation time),
  expiring after ``SessionHours``. Logging out deletes it.
- **CSRF**: every state-changing request carries the session's token in a
  form field (``csrf``) or the ``X-CSRF-Token`` header, compared in
  constant time. The login form, which has no session yet, carries a
  one-time token that must match a cookie set with the form.
- **Lockout**: failed logins are counted per client address and for all
  clients together, in windows of ``LockoutMinutes`` from the first
  failure. At ``MaxFailedLogins`` (one client) or ``MaxFailedLoginsAll``
  (everyone) logins are refused without checking the password until the
  window ends. The overall limit bounds a distributed guess at the price
  of locking the real administrator out too for a while: the page listens
  on localhost unless configured otherwise, so reaching it at all takes a
  shell on the host first. Behind a proxy every client has the proxy's
  address, so the per-client limit becomes a second overall one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bridge.admin.passwords import PasswordCheck, parse_password

SESSION_COOKIE = "tb_admin"
LOGIN_COOKIE = "tb_login"
CLIENT_KEY_MAX = 64  # characters of a client address kept in a key name


# KEYS: a failure counter. ARGV: the window in ms. The window starts at the
# first failure (EXPIRE's NX option would do it, but Redis 6.2 lacks it).
_COUNT_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class LoginRefused(Exception):
    """A login not accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str, retry_after: int = 0) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Session:
    key: str  # the Redis key (it names the token's hash, never the token)
    user: str
    csrf: str
    created: float

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(errors="replace"), self.csrf.encode())


@dataclass(frozen=True, slots=True)
class AuthSettings:
    user: str
    password: PasswordCheck
    session_seconds: float
    max_failures: int
    max_failures_all: int
    lockout_seconds: float
    secure_cookie: bool

    @classmethod
    def from_section(cls, admin: dict[str, Any]) -> AuthSettings:
        return cls(
            user=admin["User"],
            password=parse_password(admin["Password"]),
            session_seconds=float(admin["SessionHours"]) * 3600,
            max_failures=int(admin["MaxFailedLogins"]),
            max_failures_all=int(admin["MaxFailedLoginsAll"]),
            lockout_seconds=float(admin["LockoutMinutes"]) * 60,
            secure_cookie=bool(admin["SecureCookie"]),
        )


class Auth:
    def __init__(self, redis: Redis, prefix: str, settings: AuthSettings) -> None:
        self.redis = redis
        self.prefix = prefix
        self.settings = settings
        self._count_failure = redis.register_script(_COUNT_FAILURE)

    # keys ---------------------------------------------------------------------------
    def _session_key(self, token: str) -> str:
        return f"{self.prefix}:admin:session:{hashlib.sha256(token.encode(errors='replace')).hexdigest()}"

    def _fail_key(self, client: str) -> str:
        safe = "".join(c if c.isalnum() or c in ".:-" else "_" for c in client[:CLIENT_KEY_MAX])
        return f"{self.prefix}:admin:failed:{safe}"

    @property
    def _fail_all_key(self) -> str:
        return f"{self.prefix}:admin:failed-all"

    # logins ---------------------------------------------------------------------------
    async def login(self, client: str, user: str, password: str) -> str:
        """A new session's token, or ``LoginRefused``."""
        s = self.settings
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self._fail_key(client))
        pipe.pttl(self._fail_key(client))
        pipe.get(self._fail_all_key)
        pipe.pttl(self._fail_all_key)
        mine, mine_ttl, everyone, everyone_ttl = await pipe.execute()
        for count, ttl, limit in ((mine, mine_ttl, s.max_failures), (everyone, everyone_ttl, s.max_failures_all)):
            if count is not None and int(count) >= limit:
                minutes = max(1, -(-int(ttl) // 60000)) if ttl and ttl > 0 else 1
                raise LoginRefused(
                    429, f"too many failed logins: try again in {minutes} minute(s)", retry_after=minutes * 60
                )
        # Both checked whatever the first says: the time taken tells nothing about which was wrong.
        user_ok = hmac.compare_digest(
            hashlib.sha256(user.encode(errors="replace")).digest(), hashlib.sha256(s.user.encode()).digest()
        )
        password_ok = await asyncio.to_thread(s.password.verify, password)  # scrypt: ~0.1 s, off the loop
        if not (user_ok and password_ok):
            await self._failed(client)
            raise LoginRefused(401, "wrong user name or password")
        await self.redis.delete(self._fail_key(client))
        return await self._new_session(user)

    async def _failed(self, client: str) -> None:
        window_ms = int(self.settings.lockout_seconds * 1000)
        for key in (self._fail_key(client), self._fail_all_key):  # two Cluster slots: one script each
            await self._count_failure(keys=[key], args=[window_ms])

    async def _new_session(self, user: str) -> str:
        token = secrets.token_urlsafe(32)
        key = self._session_key(token)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={"user": user, "csrf": secrets.token_urlsafe(32), "created": f"{time.time():.3f}"})
        pipe.pexpire(key, int(self.settings.session_seconds * 1000))
        await pipe.execute()
        return token

    # sessions -------------------------------------------------------------------------
    async def session(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        key = self._session_key(token)
        fields = await self.redis.hgetall(key)
        if not fields or b"csrf" not in fields:
            return None
        try:
            created = float(fields.get(b"created", b"0"))
        except ValueError:
            created = 0.0
        return Session(key, fields.get(b"user", b"").decode(errors="replace"), fields[b"csrf"].decode(), created)

    async def logout(self, session: Session) -> None:
        await self.redis.delete(session.key)

    async def flash(self, session: Session, message: str) -> None:
        """A message for the session's next page (after a redirect)."""
        await self.redis.hset(session.key, "flash", message[:500])

    async def take_flash(self, session: Session) -> str:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(session.key, "flash")
        pipe.hdel(session.key, "flash")
        message, _ = await pipe.execute()
        return message.decode(errors="replace") if message else ""
