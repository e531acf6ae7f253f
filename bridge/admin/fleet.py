"""The fleet's state as Redis holds it, for any process to read.

``talkbridge status`` and ``talkbridge dlq`` and the management page read
and act through these functions, so the page and the commands cannot
disagree. Every instance renders every account: nothing here depends on
which daemon (if any) runs the code.

Costs per call, for the page's 2-second budget (docs/benchmarks.md):

- ``account_status``: a few commands per stream (``Bus.stream_status``) and
  one pipeline of per-account keys; O(accounts).
- ``DeadLetterTally``: per-account dead-letter counts without reading the
  dead letters on every page load. It counts inside Redis (a Lua script,
  a chunk at a time) once, then only what was added since: a refresh is
  ``XLEN`` plus the new entries. When entries went away behind its back
  (a replay from the CLI, trimming at ``DeadLetterMaxLen``) the arithmetic
  no longer adds up and it counts again from the start.
- ``dead_letter_page`` and ``log_page``: newest first, a page at a time,
  scanning at most ``SCAN_LIMIT`` entries for a filtered page (the page then
  offers to go on from where the scan stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from redis.asyncio import Redis

from bridge.bus import DELIVER_GROUP, ROUTER_GROUP, Bus, DeadLetter
from bridge.config import Config
from bridge.control import (
    PAUSE_APPLIED,
    RATE_WINDOW_BUCKETS,
    live_announced,
    live_workers,
    paused_accounts,
    rate_bucket,
)
from bridge.health import degraded_accounts
from bridge.keys import alerts_key, instance_key, instances_key, lease_key, log_key, queue_name, rate_key, state_key
from bridge.redis_watch import MasterRecord, read_record
from bridge.rooms import Rooms

SCAN_LIMIT = 5000  # entries one filtered page looks at, at most
TALLY_CHUNK = 2000  # dead letters one run of the tally script reads
LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "WARNING": 30, "ERROR": 40, "CRITICAL": 50, "FATAL": 50}
ENTRY_ID_CHARS = frozenset("0123456789-")
ENTRY_ID_PART_MAX = 2**64 - 1


def valid_entry_id(value: str) -> bool:
    """A stream entry id as Redis writes them: MS-SEQ, each part an unsigned
    64-bit number, and above 0-0 (XADD never writes 0-0). Redis refuses a
    larger part with an error, and ``(0-0`` as an exclusive end (``before``:
    nothing is below it); a hostile id must be a 400 here, not a 503."""
    ms, sep, seq = value.partition("-")
    if not (sep and ms.isdigit() and seq.isdigit() and len(value) <= 41 and set(value) <= ENTRY_ID_CHARS):
        return False
    parts = int(ms), int(seq)
    return parts != (0, 0) and all(part <= ENTRY_ID_PART_MAX for part in parts)


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# accounts -------------------------------------------------------------------------------
@dataclass(slots=True)
class AccountStatus:
    name: str
    protocol: str
    inbound: dict[str, Any]  # Bus.stream_status of P:in:NAME (router group)
    outbound: dict[str, Any]  # Bus.stream_status of P:out:{NAME} (deliver group)
    owner: str | None  # the lease holder
    degraded: str | None  # why, when the owner marked it (bridge/health.py)
    paused: dict[str, Any] | None  # {"at", "by"} while paused
    report: dict[str, str]  # the owner's state report (bridge/control.py), {} if none
    rooms: list[str] = field(default_factory=list)
    rate_in: int = 0  # events in the last minute, fleet-wide
    rate_out: int = 0
    dead_letters: int = 0

    @property
    def state(self) -> str:
        """stopped | paused | connecting | connected | failed | degraded."""
        if self.paused is not None:
            return "paused"
        if self.owner is None:
            return "stopped"  # no live instance holds the account
        reported = self.report.get("state", "") if self.report.get("instance") == self.owner else ""
        if reported == "failed":
            return "failed"
        if self.degraded:
            return "degraded"
        return reported or "connecting"

    @property
    def pause_applied(self) -> bool:
        """The owner has applied the pause (traffic waits now); the page says "held"."""
        return self.report.get("instance") == self.owner and self.report.get(PAUSE_APPLIED) == "1"

    @property
    def backlog(self) -> int:
        """Deliveries to the account not finished yet: unread plus read and pending."""
        return int(self.outbound.get("lag", 0)) + int(self.outbound.get("pending", 0))

    @property
    def error(self) -> str:
        """The last error the owner reported, or why it is degraded."""
        if self.report.get("instance") == self.owner and self.report.get("error"):
            return self.report["error"]
        return self.degraded or ""


async def account_status(redis: Redis, bus: Bus, accounts: Mapping[str, str]) -> list[AccountStatus]:
    """Every account (name -> protocol) in config order: its two streams,
    owner, degraded mark, pause and the owner's report."""
    names = list(accounts)
    streams = []
    for name in names:
        streams.append(await bus.stream_status(bus.inbound(name), ROUTER_GROUP))
        streams.append(await bus.stream_status(bus.outbound(name), DELIVER_GROUP))
    pipe = redis.pipeline(transaction=False)  # one key each: different Cluster slots
    for name in names:
        pipe.get(lease_key(bus.prefix, name))
        pipe.hgetall(state_key(bus.prefix, name))
    replies = await pipe.execute()
    degraded = await degraded_accounts(redis, bus.prefix, names)
    paused = await paused_accounts(redis, bus.prefix, names)
    out = []
    for i, name in enumerate(names):
        owner, report = replies[2 * i], replies[2 * i + 1]
        out.append(
            AccountStatus(
                name=name,
                protocol=accounts[name],
                inbound=streams[2 * i],
                outbound=streams[2 * i + 1],
                owner=_s(owner) or None,
                degraded=degraded.get(name),
                paused=paused.get(name),
                report={_s(k): _s(v) for k, v in (report or {}).items()},
            )
        )
    return out


def account_protocols(config: Config) -> dict[str, str]:
    return {name: acct.protocol for name, acct in config.accounts.items()}


async def account_rooms(redis: Redis, prefix: str, config: Config) -> dict[str, list[str]]:
    """The rooms of each account: its gateway channels, and for a channel
    of ``*`` the rooms it is in now (the set its adapter keeps)."""
    out: dict[str, list[str]] = {}
    for name in config.accounts:
        rooms = dict.fromkeys(config.channels_of(name))
        if any(e.account == name and e.channel == "*" for gw in config.gateways for e in gw.entries):
            rooms.update(dict.fromkeys(sorted(await Rooms(redis, prefix, name).members())))
        out[name] = list(rooms)
    return out


async def rates(redis: Redis, prefix: str, now: float | None = None) -> dict[str, tuple[int, int]]:
    """Account -> (events in, events out) over the last minute, fleet-wide:
    the current bucket of bridge/control.py's RateRecorder (still filling)
    and the five before it, so a burst shows at the next flush."""
    current = rate_bucket(time.time() if now is None else now)
    pipe = redis.pipeline(transaction=False)
    for bucket in range(current - RATE_WINDOW_BUCKETS + 1, current + 1):
        pipe.hgetall(rate_key(prefix, bucket))
    totals: dict[str, list[int]] = {}
    for bucket in await pipe.execute():
        for field_name, value in (bucket or {}).items():
            direction, _, account = _s(field_name).partition(":")
            slot = totals.setdefault(account, [0, 0])
            with contextlib.suppress(ValueError):
                slot[0 if direction == "in" else 1] += int(value)
    return {account: (pair[0], pair[1]) for account, pair in totals.items()}


# instances ------------------------------------------------------------------------------
def uptime_of(info: Mapping[str, str]) -> float | None:
    """Seconds since an announcement's ``started`` (None: not announced)."""
    try:
        return max(0.0, time.time() - float(info["started"]))
    except (KeyError, ValueError):
        return None


@dataclass(slots=True)
class InstanceStatus:
    id: str
    expires: float  # the heartbeat's expiry, seconds since the epoch
    info: dict[str, str]
    accounts: list[str] = field(default_factory=list)  # the leases it holds

    @property
    def uptime(self) -> float | None:
        return uptime_of(self.info)


async def instance_status(redis: Redis, prefix: str, owners: Mapping[str, str | None]) -> list[InstanceStatus]:
    """The instances whose heartbeat has not expired, with what they announced."""
    out = []
    for ident, expires, info in await live_announced(redis, instances_key(prefix), partial(instance_key, prefix)):
        owned = [name for name, owner in owners.items() if owner == ident]
        out.append(InstanceStatus(ident, expires, info, owned))
    return out


@dataclass(slots=True)
class WorkerStatus:
    """A ``talkbridge worker`` whose heartbeat has not expired (workers/heartbeat.py)."""

    id: str
    expires: float  # seconds since the epoch
    info: dict[str, str]

    @property
    def uptime(self) -> float | None:
        return uptime_of(self.info)

    def count(self, name: str) -> int | None:
        try:
            return int(self.info[name])
        except (KeyError, ValueError):
            return None


async def worker_status(redis: Redis, prefix: str) -> list[WorkerStatus]:
    return [WorkerStatus(ident, expires, info) for ident, expires, info in await live_workers(redis, prefix)]


# dead letters ---------------------------------------------------------------------------
# KEYS: the dead-letter stream. ARGV: start ('-' or '(ID'), count. Returns
# [entries read, last id read, stream, n, stream, n, ...]: only the counts
# leave Redis, never the dead letters themselves.
_TALLY = """
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
local counts, order = {}, {}
for _, row in ipairs(rows) do
  local fields, stream = row[2], ''
  for j = 1, #fields, 2 do
    if fields[j] == 'stream' then stream = fields[j + 1]; break end
  end
  if counts[stream] == nil then counts[stream] = 0; order[#order + 1] = stream end
  counts[stream] = counts[stream] + 1
end
local out = {#rows, #rows > 0 and rows[#rows][1] or ''}
for _, stream in ipairs(order) do out[#out + 1] = stream; out[#out + 1] = counts[stream] end
return out
"""


class DeadLetterTally:
    """Dead letters per source stream, kept by counting only what is new."""

    def __init__(self, redis: Redis, dlq: str, chunk: int = TALLY_CHUNK) -> None:
        self.redis = redis
        self.dlq = dlq
        self.chunk = chunk
        self.counts: dict[str, int] = {}
        self.length = 0
        self.last: str | None = None  # newest entry counted; None: never counted
        self.recounts = 0  # full counts so far (tests, the benchmark)
        self._script = redis.register_script(_TALLY)
        self._lock = asyncio.Lock()

    async def _scan(self, start: str) -> tuple[int, str, dict[str, int]]:
        read, last, counts = 0, "", {}
        while True:
            reply = await self._script(keys=[self.dlq], args=[start, self.chunk])
            n, chunk_last = int(reply[0]), _s(reply[1])
            read += n
            for i in range(2, len(reply), 2):
                stream = _s(reply[i])
                counts[stream] = counts.get(stream, 0) + int(reply[i + 1])
            if n:
                last = chunk_last
            if n < self.chunk:
                return read, last, counts
            start = "(" + chunk_last

    async def refresh(self) -> dict[str, int]:
        async with self._lock:
            if self.last is not None:
                read, last, added = await self._scan("(" + self.last if self.last else "-")
                length = await self.redis.xlen(self.dlq)
                if length == self.length + read:  # only appends since the last look
                    for stream, n in added.items():
                        self.counts[stream] = self.counts.get(stream, 0) + n
                    self.length, self.last = length, last or self.last
                    return dict(self.counts)
            for _ in range(3):  # entries appended while we count: count again
                read, last, counts = await self._scan("-")
                length = await self.redis.xlen(self.dlq)
                if length == read:
                    break
            self.recounts += 1
            self.counts, self.length, self.last = counts, length, last
            return dict(self.counts)

    def forget(self, letters: Iterable[DeadLetter]) -> None:
        """Letters this process removed (replayed, discarded)."""
        for letter in letters:
            if self.counts.get(letter.stream, 0) > 0:
                self.counts[letter.stream] -= 1
                self.length -= 1


def streams_of(bus: Bus, account: str) -> tuple[str, str]:
    return bus.inbound(account), bus.outbound(account)


def per_account(bus: Bus, counts: Mapping[str, int], accounts: Iterable[str]) -> dict[str, int]:
    return {name: sum(counts.get(s, 0) for s in streams_of(bus, name)) for name in accounts}


@dataclass(slots=True)
class Page:
    items: list[Any]
    next: str | None  # the cursor of the next (older) page; None: no more
    scanned: int  # entries looked at


async def dead_letter_page(
    bus: Bus, *, before: str | None = None, streams: Sequence[str] = (), limit: int = 50, scan_limit: int = SCAN_LIMIT
) -> Page:
    """Dead letters newest first, ``limit`` at most, older than ``before``;
    only those from ``streams`` when given."""
    return await _page(
        bus.redis, bus.dlq, before, limit, scan_limit,
        lambda fields: not streams or _s(fields.get(b"stream")) in streams,
        lambda entry_id, fields: _dead_letter(entry_id, fields),
    )  # fmt: skip


async def dead_letter(bus: Bus, letter_id: str) -> DeadLetter | None:
    rows = await bus.redis.xrange(bus.dlq, min=letter_id, max=letter_id)
    return _dead_letter(*rows[0]) if rows else None


async def oldest_dead_letters(bus: Bus, limit: int) -> list[DeadLetter]:
    """``talkbridge dlq list``: the oldest first."""
    return await bus.dead_letters(limit)


async def replay(bus: Bus, ids: Sequence[str] | None) -> int:
    """Put dead letters back on their stream (all when ``ids`` is None): ``Bus.replay``."""
    return await bus.replay(ids)


async def discard(bus: Bus, ids: Sequence[str]) -> list[DeadLetter]:
    """Delete dead letters for good; returns those that were there."""
    gone = []
    for one in ids:
        letter = await dead_letter(bus, one)
        if letter is not None and await bus.redis.xdel(bus.dlq, one):
            gone.append(letter)
    return gone


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    def num(key: bytes, kind: type) -> Any:
        try:
            return kind(fields.get(key, b"0"))
        except ValueError:
            return kind(0)

    return DeadLetter(
        id=_s(entry_id),
        stream=_s(fields.get(b"stream")),
        entry_id=_s(fields.get(b"entry")),
        error=_s(fields.get(b"error")),
        attempts=num(b"attempts", int),
        failed_at=num(b"at", float),
        payload=fields.get(b"d", b""),
    )


def payload_text(payload: bytes, limit: int = 20_000) -> str:
    """A dead letter's payload for people: indented JSON when it is JSON."""
    try:
        text = orjson.dumps(orjson.loads(payload), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = payload.decode(errors="replace")
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit} more characters)"


# the log stream ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LogRecord:
    id: str
    ts: float
    level: str  # as written, upper-cased
    logger: str
    account: str
    instance: str
    message: str

    @property
    def rank(self) -> int:
        return LOG_LEVELS.get(self.level, 0)


def level_rank(level: str) -> int:
    return LOG_LEVELS.get(level.upper(), 0)


def _log_record(entry_id: bytes, fields: dict[bytes, bytes]) -> LogRecord:
    try:
        ts = float(fields.get(b"ts", b"0"))
    except ValueError:
        ts = 0.0
    return LogRecord(
        id=_s(entry_id),
        ts=ts,
        level=_s(fields.get(b"level")).upper(),
        logger=_s(fields.get(b"logger")),
        account=_s(fields.get(b"account")),
        instance=_s(fields.get(b"instance")),
        message=_s(fields.get(b"message")),
    )


async def log_page(
    redis: Redis,
    prefix: str,
    *,
    min_level: str = "WARNING",
    account: str = "",
    instance: str = "",
    before: str | None = None,
    limit: int = 100,
    scan_limit: int = SCAN_LIMIT,
) -> Page:
    """Log records newest first, at ``min_level`` or above, of one account
    and one instance when given."""
    floor = level_rank(min_level)

    def wanted(fields: dict[bytes, bytes]) -> bool:
        return (
            level_rank(_s(fields.get(b"level"))) >= floor
            and (not account or _s(fields.get(b"account")) == account)
            and (not instance or _s(fields.get(b"instance")) == instance)
        )

    return await _page(redis, log_key(prefix), before, limit, scan_limit, wanted, _log_record)


async def _page(
    redis: Redis, key: str, before: str | None, limit: int, scan_limit: int, wanted: Any, make: Any
) -> Page:
    top = "(" + before if before else "+"
    items: list[Any] = []
    scanned = 0
    last_seen: str | None = None
    while len(items) < limit and scanned < scan_limit:
        chunk = min(max(limit * 4, 100), scan_limit - scanned)
        rows = await redis.xrevrange(key, max=top, min="-", count=chunk)
        for entry_id, fields in rows:
            scanned += 1
            last_seen = _s(entry_id)
            if wanted(fields):
                items.append(make(entry_id, fields))
                if len(items) == limit:
                    break
        if len(rows) < chunk and len(items) < limit:
            return Page(items, None, scanned)  # the stream's start
        if last_seen is None:
            return Page(items, None, scanned)
        top = "(" + last_seen
    more = await redis.xrevrange(key, max="(" + last_seen, min="-", count=1) if last_seen else []
    return Page(items, last_seen if more else None, scanned)


# the whole page ---------------------------------------------------------------------------
@dataclass(slots=True)
class Snapshot:
    at: float
    accounts: list[AccountStatus]
    instances: list[InstanceStatus]
    dead_letters: int
    queue: int
    warnings: list[LogRecord]
    workers: list[WorkerStatus] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)  # the conditions in force (bridge/alerts.py)
    redis: MasterRecord | None = None  # the Redis master and its last failover (bridge/redis_watch.py)


async def snapshot(
    redis: Redis, bus: Bus, config: Config, tally: DeadLetterTally, warnings: int = 8, queue: Redis | None = None
) -> Snapshot:
    """Everything the dashboard shows, fleet-wide. ``queue``: the Redis of
    the workers' job queue when it has its own ([workers] RedisURL: arq does
    not run on Cluster); None: ``redis``."""
    accounts = await account_status(redis, bus, account_protocols(config))
    rooms = await account_rooms(redis, bus.prefix, config)
    per_minute = await rates(redis, bus.prefix)
    counts = per_account(bus, await tally.refresh(), config.accounts)
    for row in accounts:
        row.rooms = rooms.get(row.name, [])
        row.rate_in, row.rate_out = per_minute.get(row.name, (0, 0))
        row.dead_letters = counts.get(row.name, 0)
    instances = await instance_status(redis, bus.prefix, {row.name: row.owner for row in accounts})
    recent = await log_page(redis, bus.prefix, limit=warnings, scan_limit=max(warnings * 50, 200))
    alerts = await active_alerts(redis, bus.prefix)
    return Snapshot(
        at=time.time(),
        accounts=accounts,
        instances=instances,
        dead_letters=tally.length,
        queue=int(await (queue if queue is not None else redis).zcard(queue_name(bus.prefix))),  # arq's: a sorted set
        warnings=recent.items,
        alerts=alerts,
        workers=await worker_status(redis, bus.prefix),
        redis=await read_record(redis, bus.prefix),
    )


SEVERITY_ORDER = {"critical": 0, "error": 1, "warning": 2}


async def active_alerts(redis: Redis, prefix: str) -> list[dict[str, Any]]:
    """The alert conditions in force, fleet-wide (one record per condition,
    bridge/alerts.py), most severe first, then oldest first."""
    out = []
    for key, raw in (await redis.hgetall(alerts_key(prefix))).items():
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            record.setdefault("key", _s(key))
            out.append(record)
    return sorted(out, key=lambda r: (SEVERITY_ORDER.get(str(r.get("severity")), 3), float(r.get("since") or 0)))
