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
- **Lockout**: login attempts are counted per client (an IPv4 address, an
  IPv6 /64) and for all clients together, in windows of ``LockoutMinutes``
  from the first attempt. An attempt is counted *before* its password is
  checked, atomically in Redis (a Lua script per counter: the two keys are
  in different Cluster slots), so a burst sent at once is cut off at the
  limit; a correct login takes its attempt back. At ``MaxFailedLogins``
  (one client) further attempts are refused without checking the password
  until the window ends. At ``MaxFailedLoginsAll`` (everyone) only *known*
  clients may still try — a client that logged in within
  ``KnownAddressDays`` — each within its own limit: an attacker's failures,
  from however many addresses, cannot lock the administrator out of an
  address that logged in before, and a guess spread over many new addresses
  stops at the overall limit. What is left: a new address is refused while
  the overall limit holds (an attacker can renew it every window); an
  attacker sharing the administrator's address (a local user behind the
  same 127.0.0.1, everyone behind one proxy) can keep that address locked.
- **Cost**: at most ``PASSWORD_CHECKS_AT_ONCE`` hashes are computed at a
  time per process (scrypt: 32 MiB and ~0.1 s each, in threads); the
  others wait, and only attempts that were counted get that far.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from bridge.addresses import client_key
from bridge.admin.passwords import PasswordCheck, parse_password
from bridge.config_keys import AdminSection
from bridge.keys import admin_failed_all_key, admin_failed_key, admin_known_key, admin_session_key

SESSION_COOKIE = "tb_admin"
LOGIN_COOKIE = "tb_login"
CLIENT_KEY_MAX = 64  # characters of a client address kept in a key name


PASSWORD_CHECKS_AT_ONCE = 2  # per process: scrypt's memory and CPU, whatever a burst sends

# Reserve one attempt. KEYS: an attempt counter. ARGV: the window in ms, the
# limit, "1" to count without refusing (a known client against the overall
# limit). Returns {count, or -1 when refused; the window's ms left}. The
# window starts at the first attempt (EXPIRE's NX option would do it, but
# Redis 6.2 lacks it).
_RESERVE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[2]) and ARGV[3] ~= '1' then
  return {-1, redis.call('PTTL', KEYS[1])}
end
n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""

# Take one attempt back (never below zero, never creating the key).
_RELEASE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then return redis.call('DECR', KEYS[1]) end
return 0
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
    known_seconds: float  # how long a client that logged in stays "known" (0: never)
    secure_cookie: bool

    @classmethod
    def from_section(cls, admin: AdminSection) -> AuthSettings:
        return cls(
            user=admin.user,
            password=parse_password(admin.password),
            session_seconds=float(admin.session_hours) * 3600,
            max_failures=int(admin.max_failed_logins),
            max_failures_all=int(admin.max_failed_logins_all),
            lockout_seconds=float(admin.lockout_minutes) * 60,
            known_seconds=float(admin.known_address_days) * 86400,
            secure_cookie=bool(admin.secure_cookie),
        )


class Auth:
    def __init__(self, redis: Redis, prefix: str, settings: AuthSettings) -> None:
        self.redis = redis
        self.prefix = prefix
        self.settings = settings
        self._reserve = redis.register_script(_RESERVE)
        self._release = redis.register_script(_RELEASE)
        self._checking = asyncio.Semaphore(PASSWORD_CHECKS_AT_ONCE)

    # keys ---------------------------------------------------------------------------
    def _session_key(self, token: str) -> str:
        return admin_session_key(self.prefix, hashlib.sha256(token.encode(errors="replace")).hexdigest())

    @staticmethod
    def _safe(client: str) -> str:
        return "".join(c if c.isalnum() or c in ".:-" else "_" for c in client_key(client)[:CLIENT_KEY_MAX])

    def _fail_key(self, client: str) -> str:
        return admin_failed_key(self.prefix, self._safe(client))

    def _known_key(self, client: str) -> str:
        return admin_known_key(self.prefix, self._safe(client))

    @property
    def _fail_all_key(self) -> str:
        return admin_failed_all_key(self.prefix)

    # logins ---------------------------------------------------------------------------
    async def login(self, client: str, user: str, password: str) -> str:
        """A new session's token, or ``LoginRefused``."""
        s = self.settings
        window_ms = int(s.lockout_seconds * 1000)
        known = s.known_seconds > 0 and bool(await self.redis.exists(self._known_key(client)))
        mine, mine_ms = await self._reserve(keys=[self._fail_key(client)], args=[window_ms, s.max_failures, 0])
        if mine < 0:
            raise _locked_out(mine_ms, "")
        everyone, everyone_ms = await self._reserve(
            keys=[self._fail_all_key], args=[window_ms, s.max_failures_all, 1 if known else 0]
        )
        if everyone < 0:
            await self._release(keys=[self._fail_key(client)])  # not this client's doing: not its attempt
            raise _locked_out(everyone_ms, " from everywhere (addresses that logged in before may still try)")
        # Both checked whatever the first says: the time taken tells nothing about which was wrong.
        user_ok = hmac.compare_digest(
            hashlib.sha256(user.encode(errors="replace")).digest(), hashlib.sha256(s.user.encode()).digest()
        )
        async with self._checking:  # scrypt: ~0.1 s and 32 MiB each, off the loop, a few at a time
            password_ok = await asyncio.to_thread(s.password.verify, password)
        if not (user_ok and password_ok):
            raise LoginRefused(401, "wrong user name or password")  # the reserved attempts stay counted
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self._fail_key(client))  # a correct login forgives the client's failures
        if s.known_seconds > 0:
            pipe.set(self._known_key(client), "1", px=int(s.known_seconds * 1000))
        await pipe.execute()
        await self._release(keys=[self._fail_all_key])
        return await self._new_session(user)

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


def _locked_out(ms_left: int, where: str) -> LoginRefused:
    minutes = max(1, -(-int(ms_left) // 60000)) if ms_left and ms_left > 0 else 1
    return LoginRefused(
        429, f"too many failed logins{where}: try again in {minutes} minute(s)", retry_after=minutes * 60
    )
