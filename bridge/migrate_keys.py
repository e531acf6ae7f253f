"""Moving an account's keys from the layout before bridge/keys.py to it.

Until then an account's keys had three hash-tag conventions. A deployment
upgraded in place still has its data under the old names (``P`` the key
prefix, ``A`` the account):

=============================  =================================  ==========================
old                            new                                what
=============================  =================================  ==========================
``P:in:A``                     ``P:in:{A}``                       the inbound stream, with
                                                                  the router's group and
                                                                  its pending entries
``{P:in:A}:NAME``              ``P:acct:{A}:NAME``                receive cursors (Talk's
                                                                  ``talk-cursors``, Matrix's
                                                                  ``matrix-sync``, …)
``{P:in:A}:fence``             (deleted)                          the lease token's copy in
                                                                  the old stream's slot
``P:acct:A:NAME``              ``P:acct:{A}:NAME``                the rooms set, an
                                                                  adapter's own state (the
                                                                  Talk bot's ``seen:…``,
                                                                  ``replay:…``, ``left``, …)
``P:apibuf:{A}``               ``P:acct:{A}:apibuf``              an api account's buffer
=============================  =================================  ==========================

``migrate_account`` moves them once, when a daemon has taken the account's
lease and before its adapter starts (bridge/daemon.py), so the only writer
of most of them is this daemon. A key moves only when the new name is still
free (RENAME keeps everything: a stream's consumer groups and pending
entries, a key's TTL). When both names exist — a webhook admitted by another,
already upgraded instance wrote the new one first — two sets are merged (the
rooms and refused-rooms sets; a member is never lost); the old inbound
stream's entries the router has not finished (pending, or not yet read) are
appended to the new stream, to be routed (again: the id map's
delivered-markers keep a redelivery from posting twice); anything else keeps
the new one and drops the old (such keys are short-lived replay state and
hints). Then the account's ``P:acct:{A}:key-layout`` mark is set, so later
takeovers cost one GET; running it again changes nothing.

Finding the ``…:NAME`` keys takes a SCAN of the whole keyspace per account,
once. On Redis Cluster the old and new names are in different slots, where
RENAME and a script over both fail: there each key is copied (DUMP, then
RESTORE with its TTL), then the old one deleted, not atomically — a crash in
between leaves both, and the next run drops the old one as above. SCAN then
visits every primary (redis-py's cluster client does).

Limits: old daemons must be stopped before new ones start (an old daemon
still writing the old names after the move writes where nobody reads). Until
an account is taken over, other accounts' routers read its rooms set under
the new name only: a gateway whose channel is ``*`` misses that account's
rooms for the moments between the upgrade and its takeover.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from bridge.bus import FIELD, ROUTER_GROUP
from bridge.keys import account_key, inbound_key, key_layout_key

LAYOUT = "2"  # the key layout of bridge/keys.py; the old one had no mark
SCAN_COUNT = 1000

# Move one key where the new name is free, merge two sets, else drop the old.
# KEYS: old, new. Returns 1 moved, 2 merged, 3 old dropped, 0 no old key, -1
# both are streams (merged by ``_merge_streams``).
_MOVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return 1
end
if redis.call('TYPE', KEYS[1]).ok == 'set' and redis.call('TYPE', KEYS[2]).ok == 'set' then
  local ttl = redis.call('PTTL', KEYS[2])
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  redis.call('DEL', KEYS[1])
  return 2
end
if redis.call('TYPE', KEYS[1]).ok == 'stream' then return -1 end
redis.call('DEL', KEYS[1])
return 3
"""
MOVED, MERGED, DROPPED, ABSENT, BOTH_STREAMS = 1, 2, 3, 0, -1


def old_inbound_key(prefix: str, account: str) -> str:
    return f"{prefix}:in:{account}"


def old_stream_slot_key(prefix: str, account: str, name: str) -> str:
    """A key the old layout kept in the inbound stream's slot (cursors, the fence copy)."""
    return "{" + old_inbound_key(prefix, account) + "}:" + name


def old_account_key(prefix: str, account: str, *parts: str) -> str:
    return ":".join((prefix, "acct", account, *parts))


def old_api_buffer_key(prefix: str, account: str) -> str:
    return f"{prefix}:apibuf:{{{account}}}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def _scan(redis: Redis, head: str) -> AsyncIterator[str]:
    async for key in redis.scan_iter(match=_glob_escape(head) + "*", count=SCAN_COUNT):
        yield key.decode() if isinstance(key, bytes) else key


async def old_keys(redis: Redis, prefix: str, account: str) -> list[tuple[str, str | None]]:
    """(old name, new name or None to delete) for every key of ``account``
    still in the old layout."""
    moves: list[tuple[str, str | None]] = [
        (old_inbound_key(prefix, account), inbound_key(prefix, account)),
        (old_api_buffer_key(prefix, account), account_key(prefix, account, "apibuf")),
    ]
    fence_copy = old_stream_slot_key(prefix, account, "fence")
    head = old_stream_slot_key(prefix, account, "")
    async for key in _scan(redis, head):
        moves.append((key, None if key == fence_copy else account_key(prefix, account, key[len(head) :])))
    head = old_account_key(prefix, account, "")
    async for key in _scan(redis, head):
        moves.append((key, account_key(prefix, account, key[len(head) :])))
    return moves


async def migrate_account(redis: Redis, prefix: str, account: str, log: logging.Logger) -> int:
    """Move ``account``'s keys from the old layout (module docstring); the
    number of keys moved, merged or dropped. Call it holding the account's lease."""
    mark = key_layout_key(prefix, account)
    if await redis.get(mark) is not None:
        return 0
    changed = 0
    move = redis.register_script(_MOVE)
    for old, new in await old_keys(redis, prefix, account):
        if new is None:
            changed += int(await redis.delete(old))
            continue
        if isinstance(redis, RedisCluster):
            outcome = await _move_across_slots(redis, old, new)
        else:
            outcome = int(await move(keys=[old, new]))
        if outcome == BOTH_STREAMS:
            await _merge_streams(redis, old, new)
        changed += int(outcome != ABSENT)
    await redis.set(mark, LAYOUT)
    if changed:
        log.warning("%s: moved %d keys to the current key layout (bridge/migrate_keys.py)", account, changed)
    return changed


async def _move_across_slots(redis: Redis, old: str, new: str) -> int:
    """``_MOVE`` for Redis Cluster, a command at a time (module docstring)."""
    dump = await redis.dump(old)
    if dump is None:
        return ABSENT
    if not await redis.exists(new):
        ttl = await redis.pttl(old)
        await redis.restore(new, max(0, ttl), dump)
        await redis.delete(old)
        return MOVED
    if await redis.type(old) in (b"set", "set") and await redis.type(new) in (b"set", "set"):
        members = await redis.smembers(old)
        if members:
            await redis.sadd(new, *members)
        await redis.delete(old)
        return MERGED
    if await redis.type(old) in (b"stream", "stream"):
        return BOTH_STREAMS
    await redis.delete(old)
    return DROPPED


async def _merge_streams(redis: Redis, old: str, new: str) -> None:
    """Append the old inbound stream's entries the router has not finished
    to the new one (with new ids), then delete the old stream."""
    start = "-"
    groups = await redis.xinfo_groups(old)
    router = next((g for g in groups if g["name"] in (ROUTER_GROUP, ROUTER_GROUP.encode())), None)
    if router is not None:
        summary = await redis.xpending(old, ROUTER_GROUP)
        last = router["last-delivered-id"]
        first = summary["min"] if summary and summary.get("pending") else None
        start = first if first is not None else "(" + (last.decode() if isinstance(last, bytes) else last)
    while rows := await redis.xrange(old, min=start, max="+", count=SCAN_COUNT):
        for _entry_id, fields in rows:
            if fields.get(FIELD) is not None:
                await redis.xadd(new, {FIELD: fields[FIELD]})
        last_id = rows[-1][0]
        start = "(" + (last_id.decode() if isinstance(last_id, bytes) else last_id)
    await redis.delete(old)
