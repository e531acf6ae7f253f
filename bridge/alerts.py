"""Admin-room alerts: one message when a condition starts, one when it clears,
fleet-wide (issue 12; docs/operations-alerts.md).

``[general] AdminRoom = "ACCOUNT:CHANNEL"`` names the room: any account's
channel (a Matrix room, a Talk room through a bot or a user account, an
``api`` account). ``Alerts.fire(key, text, severity)`` and
``Alerts.clear(key, text)`` are what daemons (``DaemonWatch``,
bridge/alerts_watch.py) and workers call; ``key`` names the condition
(``account:NAME:credentials``, ``room:ACCOUNT:ROOM``, ``dead-letters``,
``instance:ID``, ``redis``, a worker's own).

Where an alert goes, by severity: ``warning`` to the log and the dashboard;
``error`` and ``critical`` to the log, the dashboard and the admin room —
except an alert about the admin room's own account (its key names it, or
``account=`` does), which the room could not carry: log and dashboard only.

**Once across the fleet.** Current alerts live in the hash
``{prefix}:alerts`` (field: the key; value: a JSON record, the dashboard's
source). A condition *starts* when its field is created and *clears* when it
is deleted, each atomically in a Lua script, so however many instances see
the same condition at once exactly one of them posts about it; the others'
calls change nothing. Records outlive restarts: an instance started after
the fix clears what an instance before it fired.

**Never a storm.** A message goes to the room only within a fleet-wide
budget (``[alerts] MaxPerMinute``), and a condition that starts again within
``RepeatMinutes`` of the last message about it is *held*: posted only if it
lasts that long, dropped silently if it clears first (a flapping condition
costs two messages per RepeatMinutes at most). Over the budget, a start is
held and a "resolved" waits in ``{prefix:alerts}:held``; ``flush`` (every
instance's watch calls it) posts what is due, oldest first. A start that was
never posted is never resolved in the room either.

**The normal delivery path.** A message is a ``Delivery`` appended to the
admin account's outbound stream, exactly like a relayed message: its owner
delivers it with the core's ordering, retries and dead letters.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.bus import Bus
from bridge.config import Config
from bridge.events import Delivery, Event, EventKind
from bridge.keys import alerts_aux_key, alerts_key

SEVERITIES = ("warning", "error", "critical")
POSTED, HELD, SILENT = "posted", "held", "silent"  # a record's "notified"
ALERT_SOURCE = "talkbridge.alerts"  # the source account an alert's Delivery names (never a configured one)
ALERT_GATEWAY = "alerts"
TEXT_MAX = 1_000  # characters of an alert's text kept (a traceback belongs in the log)
BUDGET_WINDOW_MS = 60_000

# KEYS: alerts hash, posted-times hash, held-resolved hash, budget counter.
# ARGV: key, record (JSON), now ms, repeat ms, max per window, budget ttl ms, postable (1/0).
# Returns the record's "notified" when this call started the condition, else
# "active" (it was already) or "resumed" (a resolved message was still held:
# the room never heard it ended, so nothing is posted and it counts as posted).
_FIRE = r"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'active' end
local record = cjson.decode(ARGV[2])
local state = 'silent'
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then
  state = 'resumed'
  record['notified'] = 'posted'
elseif ARGV[7] == '1' then
  state = 'held'
  local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1e18')
  local now = tonumber(ARGV[3])
  if now - last >= tonumber(ARGV[4]) and tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[5]) then
    redis.call('INCR', KEYS[4])
    redis.call('PEXPIRE', KEYS[4], ARGV[6])
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
    state = 'posted'
  end
  record['notified'] = state
else
  record['notified'] = 'silent'
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
return state
"""

# KEYS: as _FIRE. ARGV: key, now ms, max per window, budget ttl ms, resolved text.
# Returns {what, the record}: "none" (not active), "quiet" (the room never
# heard of it), "post" (post the resolved message now), "held" (later: kept
# in the held hash as {text, since, cleared} for flush to post).
_CLEAR = r"""
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {'none', ''} end
redis.call('HDEL', KEYS[1], ARGV[1])
if cjson.decode(raw)['notified'] ~= 'posted' then return {'quiet', raw} end
if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[3]) then
  redis.call('INCR', KEYS[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return {'post', raw}
end
local since = cjson.decode(raw)['since']
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode({text = ARGV[5], since = since, cleared = tonumber(ARGV[2]) / 1000}))
return {'held', raw}
"""

# KEYS: as _FIRE. ARGV: now ms, repeat ms, max per window, budget ttl ms.
# Takes what is due within the budget: held resolved messages first, then held
# starts whose repeat window has passed (the oldest first). Forgets posted
# times older than the repeat window. Returns {kind, key, payload, ...}.
_FLUSH = r"""
local now, repeat_ms, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
local out = {}
local function spend(key)
  used = used + 1
  redis.call('HSET', KEYS[2], key, ARGV[1])
end
local held = redis.call('HGETALL', KEYS[3])
for i = 1, #held, 2 do
  if used >= max then break end
  redis.call('HDEL', KEYS[3], held[i])
  spend(held[i])
  out[#out + 1] = 'resolved'; out[#out + 1] = held[i]; out[#out + 1] = held[i + 1]
end
local due = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local record = cjson.decode(all[i + 1])
  if record['notified'] == 'held' then
    local last = tonumber(redis.call('HGET', KEYS[2], all[i]) or '-1e18')
    if now - last >= repeat_ms then due[#due + 1] = {all[i], record} end
  end
end
table.sort(due, function(a, b) return (tonumber(a[2]['since']) or 0) < (tonumber(b[2]['since']) or 0) end)
for _, item in ipairs(due) do
  if used >= max then break end
  item[2]['notified'] = 'posted'
  local raw = cjson.encode(item[2])
  redis.call('HSET', KEYS[1], item[1], raw)
  spend(item[1])
  out[#out + 1] = 'started'; out[#out + 1] = item[1]; out[#out + 1] = raw
end
if #out > 0 then
  redis.call('SET', KEYS[4], used, 'PX', ARGV[4])
end
local posted = redis.call('HGETALL', KEYS[2])
for i = 1, #posted, 2 do
  if now - tonumber(posted[i + 1]) > repeat_ms and redis.call('HEXISTS', KEYS[1], posted[i]) == 0 then
    redis.call('HDEL', KEYS[2], posted[i])
  end
end
return out
"""

# A post that could not be appended goes back to being held (flush retries it).
# KEYS: alerts hash, posted-times hash, held-resolved hash. ARGV: key, kind,
# the held resolved message's JSON ({text, since, cleared}).
_UNPOST = r"""
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[2] == 'resolved' then
  if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
  return 1
end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local record = cjson.decode(raw)
if record['notified'] ~= 'posted' then return 0 end
record['notified'] = 'held'
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
return 1
"""


def subject_of(key: str) -> str | None:
    """The account an alert key names: ``account:NAME:…`` and ``room:NAME:…``."""
    kind, _, rest = key.partition(":")
    if kind in ("account", "room") and rest:
        return rest.split(":", 1)[0] or None
    return None


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """``[alerts]`` and ``[general] AdminRoom``."""

    admin_room: tuple[str, str] | None = None
    failed_seconds: float = 300.0
    dead_letter_threshold: int = 1
    dead_letter_window: float = 600.0
    max_per_minute: int = 10
    repeat_seconds: float = 600.0
    check_seconds: float = 10.0

    @classmethod
    def from_config(cls, config: Config) -> AlertSettings:
        section = config.alerts
        return cls(
            admin_room=config.admin_room,
            failed_seconds=float(section.failed_minutes) * 60,
            dead_letter_threshold=int(section.dead_letter_threshold),
            dead_letter_window=float(section.dead_letter_window_minutes) * 60,
            max_per_minute=int(section.max_per_minute),
            repeat_seconds=float(section.repeat_minutes) * 60,
            check_seconds=float(section.check_seconds),
        )


def outbound_publisher(bus: Bus) -> Callable[[Delivery], Awaitable[object]]:
    """The ``publish`` an ``Alerts`` needs: append a Delivery to its account's
    outbound stream, as the router does with every relayed message."""

    async def publish(delivery: Delivery) -> object:
        pipe = bus.redis.pipeline(transaction=False)
        bus.add_to(pipe, bus.outbound(delivery.account), delivery.to_wire())
        return (await pipe.execute())[0]

    return publish


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))  # to the nearest second: "since" is kept to the millisecond
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


class Alerts:
    """Fire and clear fleet-wide conditions (see the module's docstring).

    Neither ``fire`` nor ``clear`` raises for Redis trouble: an alert that
    could not be recorded is logged, and a condition that still holds is
    fired again by the next check. Both return True when this call changed
    the condition's state."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        config: Config,
        instance_id: str,
        publish: Callable[[Delivery], Awaitable[object]],
        *,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.settings = AlertSettings.from_config(config)
        self.instance_id = instance_id
        self.publish = publish
        self.clock = clock
        self.log = log or logging.getLogger("talkbridge.alerts")
        self.key = alerts_key(prefix)
        self.held_key = alerts_aux_key(prefix, "held")
        self._keys = [self.key, alerts_aux_key(prefix, "posted"), self.held_key]
        self._fire = redis.register_script(_FIRE)
        self._clear = redis.register_script(_CLEAR)
        self._flush = redis.register_script(_FLUSH)
        self._unpost = redis.register_script(_UNPOST)

    @property
    def admin_account(self) -> str | None:
        return self.settings.admin_room[0] if self.settings.admin_room else None

    def _script_keys(self, now_ms: int) -> list[str]:
        return [*self._keys, alerts_aux_key(self.prefix, f"budget:{now_ms // BUDGET_WINDOW_MS}")]

    def postable(self, severity: str, account: str | None) -> bool:
        """Would this alert go to the admin room (the budget aside)?"""
        return (
            self.settings.admin_room is not None
            and severity in ("error", "critical")
            and (account is None or account != self.admin_account)
        )

    async def fire(
        self,
        key: str,
        text: str,
        severity: str = "error",
        *,
        account: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """The condition ``key`` holds. The fleet's first call records it (and
        posts, the budget allowing); calls while it is active change nothing.
        ``account``: the account it is about, when the key does not say
        (``account:NAME:…`` and ``room:NAME:…`` do)."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
        if not key:
            raise ValueError("an alert needs a key")
        account = account or subject_of(key)
        now = self.clock()
        now_ms = int(now * 1000)
        record = {
            "key": key,
            "severity": severity,
            "text": text[:TEXT_MAX],
            "since": round(now, 3),
            "instance": self.instance_id,
            "account": account,
            "details": dict(details or {}),
        }
        args = [key, orjson.dumps(record), now_ms, int(self.settings.repeat_seconds * 1000)]
        args += [self.settings.max_per_minute, 2 * BUDGET_WINDOW_MS, 1 if self.postable(severity, account) else 0]
        try:
            state = as_str(await self._fire(keys=self._script_keys(now_ms), args=args))
        except (RedisError, OSError) as exc:
            self.log.warning("alert %s not recorded (Redis: %s): %s", key, exc, text, extra={"account": account or ""})
            return False
        if state == "active":
            return False
        level = {"warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}[severity]
        where = {POSTED: "to the admin room", HELD: "to the admin room later (rate limit)", SILENT: "not posted"}
        self.log.log(
            level, "ALERT %s: %s (%s)", key, text, where.get(state, "still open in the room"),
            extra={"account": account or ""},
        )  # fmt: skip
        if state == POSTED:
            await self._post("started", key, self._started_text(record))
        return True

    async def clear(self, key: str, text: str, *, account: str | None = None) -> bool:
        """The condition ``key`` no longer holds: the fleet's first call
        removes it (and posts "resolved" if its start was posted)."""
        now = self.clock()
        now_ms = int(now * 1000)
        args = [key, now_ms, self.settings.max_per_minute, 2 * BUDGET_WINDOW_MS, text[:TEXT_MAX]]
        try:
            what, raw = await self._clear(keys=self._script_keys(now_ms), args=args)
        except (RedisError, OSError) as exc:
            self.log.warning("alert %s not cleared (Redis: %s)", key, exc)
            return False
        what = as_str(what)
        if what == "none":
            return False
        record = orjson.loads(raw)
        self.log.warning("RESOLVED %s: %s", key, text, extra={"account": account or record.get("account") or ""})
        if what == "post":
            await self._post("resolved", key, self._resolved_text(key, text, record.get("since"), now))
        return True

    async def flush(self) -> int:
        """Post what the budget held back and is due now; returns how many."""
        now_ms = int(self.clock() * 1000)
        args = [now_ms, int(self.settings.repeat_seconds * 1000), self.settings.max_per_minute, 2 * BUDGET_WINDOW_MS]
        try:
            out = await self._flush(keys=self._script_keys(now_ms), args=args)
        except (RedisError, OSError) as exc:
            self.log.warning("alerts: held messages not flushed (Redis: %s)", exc)
            return 0
        for i in range(0, len(out), 3):
            kind, key, payload = as_str(out[i]), as_str(out[i + 1]), orjson.loads(out[i + 2])
            if kind == "resolved":
                text = self._resolved_text(key, payload.get("text", ""), payload.get("since"), payload.get("cleared"))
            else:
                text = self._started_text(payload)
            await self._post(kind, key, text, payload)
        return len(out) // 3

    async def active(self) -> dict[str, dict[str, Any]]:
        """Current alerts by key (raises RedisError: the caller decides)."""
        out = {}
        for key, value in (await self.redis.hgetall(self.key)).items():
            with contextlib.suppress(orjson.JSONDecodeError):
                out[as_str(key)] = orjson.loads(value)
        return out

    # the room ------------------------------------------------------------------------
    @staticmethod
    def _started_text(record: Mapping[str, Any]) -> str:
        severity = str(record.get("severity", "error")).upper()
        since = format_time(float(record.get("since") or 0))
        where = f"since {since}, {record.get('instance', '?')}; {record.get('key')}"
        return f"[talkbridge {severity}] {record.get('text', '')} ({where})"

    @staticmethod
    def _resolved_text(key: str, text: str, since: Any, cleared: Any) -> str:
        lasted = ""
        if isinstance(since, int | float) and isinstance(cleared, int | float):
            lasted = f"after {format_duration(cleared - since)}; "
        return f"[talkbridge RESOLVED] {text} ({lasted}{key})"

    def delivery(self, key: str, text: str) -> Delivery:
        """An alert message as a Delivery into the admin room."""
        assert self.settings.admin_room is not None
        account, channel = self.settings.admin_room
        event = Event(
            kind=EventKind.MESSAGE,
            account=ALERT_SOURCE,
            channel=ALERT_GATEWAY,
            sender_id="talkbridge",
            sender_name="talkbridge",
            text=text,
            origin=[f"{ALERT_SOURCE}/{ALERT_GATEWAY}"],
            extra={"alert": key},
        )
        # no nick: the text says who speaks (a Talk bot or Matrix puts the username before the text)
        return Delivery(event=event, account=account, channel=channel, gateway=ALERT_GATEWAY, username="", text=text)

    async def _post(self, kind: str, key: str, text: str, held: Mapping[str, Any] | None = None) -> None:
        try:
            await self.publish(self.delivery(key, text))
        except (RedisError, OSError) as exc:
            self.log.warning("alert %s: message not queued for the admin room (Redis: %s); retried later", key, exc)
            again = orjson.dumps(held or {"text": text})
            with contextlib.suppress(RedisError, OSError):
                await self._unpost(keys=self._keys, args=[key, kind, again])


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
