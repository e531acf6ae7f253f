"""Source id <-> delivered ids, so replies, edits, deletions and reactions
follow a message across networks — and the record of what was delivered, so
a redelivery after a crash posts nothing twice.

Every message has a *canonical* reference: where it was first written
(account, channel, native id). The map is kept per *room* (account +
channel) in which copies were delivered, as compact fields:

- ``f`` + digest(canonical) -> the copy's native id here ("" while the
  network has not told us the id: a Talk bot's post). Its presence is also
  the delivered-marker of that copy;
- ``r`` + native id of the copy -> digest(canonical) + digest(canonical's
  room) + canonical native id: what a reply *to the copy* refers to;
- ``d`` + digest(event id) -> "": the delivered-marker of a delivery that is
  not a new message (an edit, a deletion, a reaction);
- ``o`` + digest(a key the adapter chose) -> the canonical message (as in
  ``r``): a copy posted where the network does not answer with its id (a
  Talk bot's post, remembered by its text until a webhook shows its id;
  ``remember`` / ``learn_remembered``).

Memory (issue 6): one key per field costs ~150 bytes of Redis overhead
before the data. Here the fields of a room live in a few dozen small hashes
that Redis stores as listpacks (a few bytes per field), so a delivered copy
costs about 70 to 110 bytes (docs/benchmarks.md). A room's hashes are grouped
in *generations* of ``gen_size`` copies; a room keeps its last ``KEEP``
generations and drops the oldest whole when a new one starts, which bounds a
room at ``MessageMapPerRoom`` to 1.25 times that many copies — Matterbridge's
5,000-message cache, but durable and shared by every daemon. Every hash also
expires ``MessageMapDays`` after its last write, so idle rooms vanish.

Keys (``P`` the prefix, ``␟`` is ``\\x1f``, never in account or channel
names): ``P:m:{ACCOUNT}␟CHANNEL␟n`` (copies written so far) and
``P:m:{ACCOUNT}␟CHANNEL␟GEN.BUCKET`` (the fields). Hash-tagged by account, so
one script can write them with the account's stream and fence on Cluster.

Writes that record a delivery are *fenced* (``bridge.lease.Fence``): the
script refuses them unless the writer still holds the account's current
lease token, so an owner that stalled past its lease and resumed cannot
record or acknowledge alongside its successor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bridge.events import Delivery, EventKind
from bridge.keys import ID_MAP_SEP, fence_key, hash_tag, id_map_key, inbound_key

SEP = ID_MAP_SEP  # never appears in account names, channel names or ids
KEEP = 5  # generations a room keeps; the oldest of them is dropped whole
FIELDS_PER_BUCKET = 80  # well under Redis's listpack limit of 128 fields per hash
FENCED = "FENCED"


class Fenced(Exception):
    """A write was refused: another instance holds the account's lease now."""


def ref(account: str, channel: str, native_id: str) -> str:
    return f"{account}{SEP}{channel}{SEP}{native_id}"


def canonical_of(delivery: Delivery) -> str | None:
    """The canonical reference of the message a delivery copies (None unless
    it is a new message with a source id: only those get copies to map)."""
    event = delivery.event
    if event.kind != EventKind.MESSAGE or not event.native_id:
        return None
    return ref(event.account, event.channel, event.native_id)


def split_ref(value: str) -> tuple[str, str, str]:
    account, channel, native_id = value.split(SEP, 2)
    return account, channel, native_id


def _digest(text: str, size: int = 8) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def _room_digest(account: str, channel: str) -> bytes:
    return _digest(f"{account}{SEP}{channel}", 4)


# The Lua the fenced scripts share (the api adapter's buffer script includes
# it too). Fields are found in the newest generation that has them; a value
# of "" (delivered, id unknown) is returned only when no generation has more.
LUA_LIB = r"""
local tb_gens = {}  -- room -> its current generation, read once per script
local function tb_fenced(fence_key, token)
  if token == '' then return false end
  return redis.call('GET', fence_key) ~= token
end
local function tb_gen(base, gen_size)
  local g = tb_gens[base]
  if g == nil then
    g = math.floor(tonumber(redis.call('GET', base .. '\31n') or '0') / gen_size)
    tb_gens[base] = g
  end
  return g
end
-- the newest value of `field` in the room's last `gens` generations
local function tb_find(base, gen_size, gens, bucket, field)
  local g = tb_gen(base, gen_size)
  local empty = false
  for i = g, math.max(0, g - gens + 1), -1 do
    local v = redis.call('HGET', base .. '\31' .. i .. '.' .. bucket, field)
    if v then
      if v ~= '' then return v end
      empty = v
    end
  end
  return empty
end
-- items: flat {bucket, field, value, ...} from index `at`, `count` triples
local function tb_put(base, gen_size, keep, buckets, ttl, copies, items, at, count)
  local counter = base .. '\31n'
  local g = tb_gen(base, gen_size)
  local touched = {}
  for i = 0, count - 1 do
    local j = at + 3 * i
    local key = base .. '\31' .. g .. '.' .. items[j]
    redis.call('HSET', key, items[j + 1], items[j + 2])
    touched[key] = true
  end
  for key in pairs(touched) do redis.call('EXPIRE', key, ttl) end
  if copies > 0 then
    local g2 = math.floor(redis.call('INCRBY', counter, copies) / gen_size)
    for new = g + 1, g2 do
      local old = new - keep
      if old >= 0 then
        for b = 0, buckets - 1 do redis.call('DEL', base .. '\31' .. old .. '.' .. b) end
      end
    end
    tb_gens[base] = g2
  end
  redis.call('EXPIRE', counter, ttl)
end
"""

# Lua for a script of someone else's that records deliveries in one room of
# the map along with its own writes (the api buffer, adapters/api/buffer.py),
# after ``LUA_LIB``: ``recording_script`` puts them together. The script
# passes the map's arguments (``IdMap.recording_args``) and each delivery's
# (``IdMap.delivery_args``) through to these functions, so it knows nothing
# of the map's layout:
#   tb_rec_begin(at): reads the room's arguments from ARGV[at]; returns the
#     index after them.
#   tb_rec_delivery(at): reads one delivery's from ARGV[at]; returns what
#     its delivered-marker holds when it was recorded before (in the map or
#     earlier in this script), else false having queued its record; and the
#     index after its arguments.
#   tb_rec_end(): writes the queued records.
RECORDING_LIB = r"""
local tb_rec = {}
local function tb_rec_begin(at)
  tb_rec.room = ARGV[at]
  tb_rec.gen_size, tb_rec.keep, tb_rec.buckets = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  tb_rec.ttl, tb_rec.marker_gens = ARGV[at + 4], tonumber(ARGV[at + 5])
  tb_rec.items, tb_rec.added, tb_rec.this_call = {}, 0, {}
  return at + 6
end
local function tb_rec_delivery(at)
  local count = tonumber(ARGV[at])
  local bucket, field = ARGV[at + 1], ARGV[at + 2]  -- the first item is the delivered-marker
  local marker = bucket .. '\31' .. field
  local done = tb_rec.this_call[marker] or tb_find(tb_rec.room, tb_rec.gen_size, tb_rec.marker_gens, bucket, field)
  if not done then
    for j = at + 1, at + 3 * count do tb_rec.items[#tb_rec.items + 1] = ARGV[j] end
    tb_rec.this_call[marker] = ARGV[at + 3]  -- what tb_find will answer: the marker item's value
    tb_rec.added = tb_rec.added + 1
  end
  return done, at + 1 + 3 * count
end
local function tb_rec_end()
  if tb_rec.added > 0 then
    tb_put(tb_rec.room, tb_rec.gen_size, tb_rec.keep, tb_rec.buckets, tb_rec.ttl, tb_rec.added, tb_rec.items, 1,
      #tb_rec.items / 3)
  end
end
"""


def recording_script(body: str) -> str:
    """A script whose ``body`` records deliveries with ``RECORDING_LIB`` and
    checks the fence with ``tb_fenced``."""
    return LUA_LIB + RECORDING_LIB + body


# Find fields across rooms. ARGV: gen_size, generations to look in, then
# (base, bucket, field) triples. Returns one value (or false) per triple.
_FIND = (
    LUA_LIB
    + r"""
local gen_size, gens = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 3 do
  out[#out + 1] = tb_find(ARGV[i], gen_size, gens, ARGV[i + 1], ARGV[i + 2])
end
return out
"""
)

# Record delivered copies and acknowledge their stream entries, fenced.
# KEYS: fence, stream. ARGV: token, group, n_ack, ack ids..., the header
# (IdMap.header), then per room: base, copies, n_items, (bucket, field, value)...
_COMMIT = (
    LUA_LIB
    + r"""
if tb_fenced(KEYS[1], ARGV[1]) then return redis.error_reply('FENCED lease token is stale') end
local n_ack = tonumber(ARGV[3])
local at = 4 + n_ack
local gen_size, keep, buckets, ttl = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), ARGV[at + 3]
at = at + 5
while at <= #ARGV do
  local base, copies, count = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  tb_put(base, gen_size, keep, buckets, ttl, copies, ARGV, at + 3, count)
  at = at + 3 + 3 * count
end
if n_ack > 0 then redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, 4, 3 + n_ack)) end
return n_ack
"""
)


@dataclass(frozen=True, slots=True)
class Field:
    """Where one field lives in a room's hashes."""

    base: str
    bucket: str
    name: bytes


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease token an account's owner writes delivery state under."""

    key: str
    token: str


class IdMap:
    def __init__(
        self, redis: Redis, prefix: str, ttl_seconds: int, per_room: int = 5000, batch_size: int = 200
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = max(1, int(ttl_seconds))
        self.gen_size = max(1, math.ceil(per_room / (KEEP - 1)))
        # Where a redelivered copy's marker can be: between recording a copy
        # and meeting it again, a room takes at most two batches of other
        # copies (the api buffer script records a batch before the core acks
        # it; a re-routed inbound batch repeats at most a batch), since a
        # room's lane records and acknowledges one delivery, or one batch, at
        # a time and only the lease holder writes. So a delivered-marker is
        # looked for in the generations those copies can span, not all KEEP:
        # a new message (not found) costs 1 to 2 HGETs instead of 5.
        self.marker_gens = min(KEEP, 1 + math.ceil((2 * max(1, batch_size) + 1) / self.gen_size))
        # ~2 fields per copy (forward + reverse)
        self.buckets = max(1, math.ceil(2 * self.gen_size / FIELDS_PER_BUCKET))
        self._find = redis.register_script(_FIND)
        self._commit = redis.register_script(_COMMIT)

    # layout ---------------------------------------------------------------------
    def room(self, account: str, channel: str) -> str:
        return id_map_key(self.prefix, account, channel)

    def _bucket(self, digest: bytes) -> str:
        return str(int.from_bytes(digest[:4], "big") % self.buckets)

    def _forward(self, account: str, channel: str, canonical: str) -> Field:
        d = _digest(canonical)
        return Field(self.room(account, channel), self._bucket(d), b"f" + d)

    def _reverse(self, account: str, channel: str, native_id: str) -> Field:
        return Field(self.room(account, channel), self._bucket(_digest(native_id)), b"r" + native_id.encode())

    def marker(self, delivery: Delivery) -> Field:
        """The field whose presence says this copy was delivered."""
        canonical = canonical_of(delivery)
        if canonical is not None:
            return self._forward(delivery.account, delivery.channel, canonical)
        d = _digest(delivery.event.id)
        return Field(self.room(delivery.account, delivery.channel), self._bucket(d), b"d" + d)

    def record_items(self, delivery: Delivery, native_id: str | None) -> list[tuple[str, bytes, bytes]]:
        """(bucket, field, value) for one delivered copy, all in its room; the
        first is always the copy's delivered-marker (``marker``)."""
        canonical = canonical_of(delivery)
        if canonical is None:
            m = self.marker(delivery)
            return [(m.bucket, m.name, b"")]
        return self._copy_items(canonical, delivery.account, delivery.channel, native_id)

    def _copy_items(
        self, canonical: str, account: str, channel: str, native_id: str | None
    ) -> list[tuple[str, bytes, bytes]]:
        digest = _digest(canonical)  # once: the forward field and the reverse value both carry it
        items = [(self._bucket(digest), b"f" + digest, (native_id or "").encode())]
        if native_id:
            rev = self._reverse(account, channel, native_id)
            items.append((rev.bucket, rev.name, self._compact(canonical, digest)))
        return items

    def recording_args(self, account: str, channel: str) -> list[Any]:
        """The arguments ``tb_rec_begin`` reads (``RECORDING_LIB``): a script
        recording deliveries to this room."""
        return [self.room(account, channel), *self.header()]

    def delivery_args(self, delivery: Delivery, native_id: str | None) -> list[Any]:
        """The arguments ``tb_rec_delivery`` reads (``RECORDING_LIB``): the
        record of one delivered copy, its delivered-marker first."""
        items = self.record_items(delivery, native_id)
        args: list[Any] = [len(items)]
        for item in items:
            args.extend(item)
        return args

    def header(self) -> list[Any]:
        """gen_size, keep, buckets, ttl, marker generations: the room
        parameters the writing scripts take."""
        return [self.gen_size, KEEP, self.buckets, self.ttl, self.marker_gens]

    # reads ------------------------------------------------------------------------
    async def find(self, fields: Sequence[Field], gens: int = KEEP) -> list[bytes | None]:
        if not fields:
            return []
        args: list[Any] = [self.gen_size, gens]
        for f in fields:
            args += [f.base, f.bucket, f.name]
        found = await self._find(args=args)
        return [v if isinstance(v, bytes) else None for v in found]

    async def delivered(self, deliveries: Sequence[Delivery]) -> list[bool]:
        found = await self.find([self.marker(d) for d in deliveries], self.marker_gens)
        return [v is not None for v in found]

    async def resolve(
        self, account: str, channel: str, native_id: str, dest_account: str, dest_channel: str
    ) -> str | None:
        """The native id, in the destination, of the message ``native_id``."""
        [rev] = await self.find([self._reverse(account, channel, native_id)])
        if rev is not None and len(rev) > 12:  # a copy: follow it to its canonical message
            digest, room, c_native = rev[:8], rev[8:12], rev[12:].decode()
            if room == _room_digest(dest_account, dest_channel):
                return c_native
        else:
            canonical = ref(account, channel, native_id)
            if (account, channel) == (dest_account, dest_channel):
                return native_id
            digest = _digest(canonical)
        fwd = Field(self.room(dest_account, dest_channel), self._bucket(digest), b"f" + digest)
        [found] = await self.find([fwd])
        return found.decode() if found else None

    # writes -----------------------------------------------------------------------
    async def commit(
        self,
        fence: Fence | None,
        stream: str,
        group: str,
        acks: Sequence[bytes | str],
        records: Iterable[tuple[Delivery, str | None]] = (),
    ) -> None:
        """Record delivered copies and acknowledge entries, atomically and
        fenced: raises ``Fenced`` when another instance owns the account."""
        rooms: dict[str, list[Any]] = {}
        copies: dict[str, int] = {}
        for delivery, native_id in records:
            base = self.room(delivery.account, delivery.channel)
            items = rooms.setdefault(base, [])
            for triple in self.record_items(delivery, native_id):
                items.extend(triple)
            copies[base] = copies.get(base, 0) + 1
        await self._run_commit(fence, stream, group, acks, rooms, copies)

    @staticmethod
    def _compact(canonical: str, digest: bytes | None = None) -> bytes:
        c_account, c_channel, c_native = split_ref(canonical)
        return (digest or _digest(canonical)) + _room_digest(c_account, c_channel) + c_native.encode()

    def _remembered(self, account: str, channel: str, key: str) -> Field:
        d = _digest(key)
        return Field(self.room(account, channel), self._bucket(d), b"o" + d)

    async def remember(self, account: str, channel: str, key: str, canonical: str) -> None:
        """Note that the copy of ``canonical`` about to be posted in this room
        will be recognisable by ``key`` (the network does not answer with its
        id). Unfenced: a hint, not delivery state."""
        f = self._remembered(account, channel, key)
        items = [f.bucket, f.name, self._compact(canonical)]
        await self._run_commit(None, "", "", (), {f.base: items}, {})

    async def learn_remembered(self, account: str, channel: str, key: str, native_id: str) -> bool:
        """The copy remembered by ``key`` has the id ``native_id``: record it
        (as ``learn``). False when nothing was remembered by that key."""
        [value] = await self.find([self._remembered(account, channel, key)])
        if value is None or len(value) <= 12:
            return False
        digest = value[:8]
        fwd = Field(self.room(account, channel), self._bucket(digest), b"f" + digest)
        rev = self._reverse(account, channel, native_id)
        items = [fwd.bucket, fwd.name, native_id.encode(), rev.bucket, rev.name, value]
        await self._run_commit(None, "", "", (), {fwd.base: items}, {})
        return True

    async def learn(self, canonical: str, dest_account: str, dest_channel: str, dest_native_id: str) -> None:
        """Record a copy whose id became known only after its delivery (not
        a new copy: the room's count is unchanged)."""
        items: list[Any] = []
        for triple in self._copy_items(canonical, dest_account, dest_channel, dest_native_id):
            items.extend(triple)
        await self._run_commit(None, "", "", (), {self.room(dest_account, dest_channel): items}, {})

    async def _run_commit(
        self,
        fence: Fence | None,
        stream: str,
        group: str,
        acks: Sequence[bytes | str],
        rooms: dict[str, list[Any]],
        copies: dict[str, int],
    ) -> None:
        args: list[Any] = [fence.token if fence else "", group, len(acks), *acks, *self.header()]
        for base, items in rooms.items():
            args += [base, copies.get(base, 0), len(items) // 3, *items]
        # Unfenced, or nothing to acknowledge: stand-ins, never read, in the slot of the rooms' account
        # (every room written here is one account's), so Redis Cluster runs the script.
        account = hash_tag(next(iter(rooms), "")) or ""
        keys = [fence.key if fence else fence_key(self.prefix, account), stream or inbound_key(self.prefix, account)]
        try:
            await self._commit(keys=keys, args=args)
        except ResponseError as exc:
            if str(exc).startswith(FENCED):
                raise Fenced(str(exc)) from None
            raise
