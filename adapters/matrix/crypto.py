"""End-to-end encryption: the bridge's device (its Olm account, Olm and
Megolm sessions, the device lists it knows) kept in Redis, so a restart, a
crash or a takeover by another instance is the same device.

Where the keys live: matrix-nio's own SQLite store (``SqliteStore``: the
account, sessions, device keys and trust in one database; the library's
tested code), opened *in memory* in each process, never in a file. Its
durable home is Redis, beside the account's other state: the whole
database (``sqlite3.Connection.serialize``, zlib-compressed) is written
under ``matrix-crypto`` with a fenced ``commit_inbound`` — in the same
script as a sync's events and ``next_batch`` when that sync changed it,
and after a send that created Olm sessions. A stale owner (lease lost)
writes nothing. ``connect`` restores it into a fresh in-memory database
before nio builds its Olm machine; a snapshot that cannot be read, or
whose account is not the stored device's, fails the account
(``AccountFailed`` naming it) — never a silent new device. Why not a file:
a file is the machine's, and another instance taking the account over
elsewhere would not have it (a new device, "unable to decrypt" for
everyone); why not a finer Redis store: the whole database is small (a few
tens of KiB compressed for a room with a few devices, docs/matrix.md) and
nio's schema stays nio's.

Writes happen only when the database changed (``total_changes`` of its
connection): a sync that only carries room messages writes nothing more.
One lock orders the snapshots of the sync loop and of the senders, so an
older snapshot never overwrites a newer one.

The one window: keys generated and uploaded (``keys/upload``) are written
right after the upload answers; a crash between the two loses their
private halves (the one-time keys: the next Olm session a peer starts with
one of them fails; peers start another).

Events that nio could not decrypt (the room key not there yet: it often
arrives a moment after the message) wait, in Redis too (``matrix-
undecrypted``, written with the sync), are tried again after every sync,
their key is requested from the sender's devices (``m.room_key_request``),
and after ``UndecryptableSeconds`` they are relayed as a notice and counted
(``talkbridge_deliveries_skipped{reason="undecryptable"}``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from nio import AsyncClient, MegolmEvent
from nio.crypto import Olm
from nio.store import SqliteStore
from peewee import SqliteDatabase

from bridge.adapter import AccountFailed
from bridge.bus import Write

MAGIC = b"TBC1"  # format of the snapshot: zlib of a serialized SQLite database
MAX_PENDING = 1000  # undecryptable events kept waiting for their keys; beyond, the oldest become notices now


class _RestoredDatabase(SqliteDatabase):
    """An in-memory SQLite database that starts as ``snapshot`` (or empty)."""

    def __init__(self, snapshot: bytes | None) -> None:
        self._snapshot = snapshot
        # One connection for the process, not one per thread (peewee's default):
        # another thread would see an empty database; sqlite3 refuses it loudly instead.
        super().__init__(":memory:", pragmas={"foreign_keys": 1, "secure_delete": 1}, thread_safe=False)

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        snapshot, self._snapshot = self._snapshot, None  # once: a second connection would be an older copy
        if snapshot is not None:
            conn.deserialize(snapshot)
        return conn


class RedisBackedStore(SqliteStore):
    """nio's SqliteStore in memory, restored from (and saved to) a snapshot."""

    def __init__(self, user_id: str, device_id: str, snapshot: bytes | None, pickle_key: str = "") -> None:
        self._snapshot = snapshot
        super().__init__(user_id, device_id, "", pickle_key=pickle_key)

    def _create_database(self) -> SqliteDatabase:
        return _RestoredDatabase(self._snapshot)

    def save_encrypted_rooms(self, rooms: Any) -> None:
        # nio calls this after every sync, with an empty set unless a room
        # turned encrypted in it: a SELECT and a transaction for nothing, 9 %
        # of the daemon's CPU at 10 msg/s (py-spy, bench/matrix_relay.py)
        if rooms:
            super().save_encrypted_rooms(rooms)

    def changes(self) -> int:
        return self.database.connection().total_changes

    def serialize(self) -> bytes:
        return self.database.connection().serialize()


def encode_snapshot(database: bytes) -> bytes:
    return MAGIC + zlib.compress(database, 6)


def decode_snapshot(raw: bytes) -> bytes:
    """The database of a snapshot; ValueError when it is not one."""
    if not raw.startswith(MAGIC):
        raise ValueError("not a talkbridge crypto snapshot")
    try:
        return zlib.decompress(raw[len(MAGIC) :])
    except zlib.error as exc:
        raise ValueError(f"corrupt snapshot: {exc}") from None


@dataclass
class Pending:
    """An event nio could not decrypt yet, waiting for its room key."""

    room_id: str
    channel: str
    source: dict[str, Any]
    since: float
    requested: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"room": self.room_id, "channel": self.channel, "source": self.source, "since": self.since}

    @classmethod
    def from_json(cls, raw: Any) -> Pending | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("source"), dict):
            return None
        room, channel, since = raw.get("room"), raw.get("channel"), raw.get("since")
        if not isinstance(room, str) or not isinstance(channel, str) or not isinstance(since, int | float):
            return None
        return cls(room, channel, raw["source"], float(since))


@dataclass
class Crypto:
    """The account's crypto state: its store, when to save it, and the
    events that wait for their keys."""

    account: str
    snapshot_key: str
    pending_key: str
    store: RedisBackedStore | None = None
    saved_changes: int = -1  # total_changes at the last snapshot written (-1: never)
    pending: dict[str, Pending] = field(default_factory=dict)
    pending_dirty: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def load(self, client: AsyncClient, raw: bytes | None) -> bool:
        """Give ``client`` its Olm machine over the store restored from
        ``raw`` (None: a new account). Returns whether the account is new."""
        user, device = client.user_id, client.device_id
        if not user or not device:
            raise AccountFailed(f"{self.account}: encryption needs the device id of the login, which is unknown")
        database = None
        if raw is not None:
            try:
                database = decode_snapshot(raw)
                store = RedisBackedStore(user, device, database)
                found = store.load_account()
            except (ValueError, sqlite3.DatabaseError) as exc:
                raise AccountFailed(
                    f"{self.account}: the crypto store in Redis ({self.snapshot_key}) cannot be read: {exc}; "
                    "refusing to start a new device (restore it, or delete the key to start one knowingly)"
                ) from None
            if found is None:
                raise AccountFailed(
                    f"{self.account}: the crypto store in Redis ({self.snapshot_key}) holds no Olm account for "
                    f"{user} device {device}; refusing to start a new device (delete the key to start one knowingly)"
                )
        else:
            store = RedisBackedStore(user, device, None)
        client.store = store
        client.olm = Olm(user, device, store)
        client.encrypted_rooms = store.load_encrypted_rooms()
        self.store = store
        self.saved_changes = store.changes() if database is not None else -1
        return database is None

    def identity(self) -> str:
        olm = self.store and self.store.load_account()
        return olm.identity_keys["ed25519"] if olm is not None else ""

    def writes(self, pending: bool) -> list[Write]:
        """The snapshot (when the store changed since the last one) and, with
        ``pending``, the waiting events (when they changed), to commit fenced.
        Only the sync's commit writes the waiting events: an event taken out
        of them is published by that commit. Call under ``lock``."""
        writes: list[Write] = []
        if self.store is not None:
            changes = self.store.changes()
            if changes != self.saved_changes:
                writes.append(Write.set(self.snapshot_key, encode_snapshot(self.store.serialize())))
                self.saved_changes = changes
        if pending and self.pending_dirty:
            waiting = [[eid, p.as_json()] for eid, p in self.pending.items()]
            writes.append(Write.set(self.pending_key, orjson.dumps(waiting)))
            self.pending_dirty = False
        return writes

    def unsaved(self) -> None:
        """The commit carrying the last ``writes`` failed: write them again next time."""
        self.saved_changes = -1
        self.pending_dirty = True

    def restore_pending(self, raw: bytes | None) -> None:
        self.pending.clear()
        if not raw:
            return
        try:
            items = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return  # only events waiting for keys: lost to notices' silence is better than a stuck account
        for item in items if isinstance(items, list) else []:
            if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
                pending = Pending.from_json(item[1])
                if pending is not None:
                    self.pending[item[0]] = pending

    def wait(self, event_id: str, room_id: str, channel: str, source: dict[str, Any]) -> None:
        if event_id not in self.pending:
            self.pending[event_id] = Pending(room_id, channel, source, time.time())
            self.pending_dirty = True

    def retry(self, client: AsyncClient, bound: float) -> tuple[list[Pending], list[Pending]]:
        """The waiting events: (decrypted now, given up on), both removed;
        a decrypted one's ``source`` is the plaintext event."""
        done: list[Pending] = []
        expired: list[Pending] = []
        now = time.time()
        over = max(0, len(self.pending) - MAX_PENDING)
        for eid, pending in list(self.pending.items()):
            decrypted = decrypt(client, pending.room_id, pending.source)
            if decrypted is not None:
                done.append(Pending(pending.room_id, pending.channel, decrypted, pending.since))
            elif over > 0 or now - pending.since >= bound:
                over -= 1
                expired.append(pending)
            else:
                continue
            del self.pending[eid]
            self.pending_dirty = True
        return done, expired

    async def request_keys(self, client: AsyncClient) -> None:
        """Ask the sender's device (all the sender's devices when the event
        does not say which) for the keys of waiting events, once per session
        and process. nio's own ``request_room_key`` asks only our own
        devices: a bot has no other device that could have the key."""
        asked: set[str] = set()
        for pending in list(self.pending.values()):
            if pending.requested:
                continue
            pending.requested = True
            event = megolm_event(pending.room_id, pending.source)
            if event is None or event.session_id in asked or not client.device_id:
                continue
            asked.add(event.session_id)
            message = event.as_key_request(event.sender, client.device_id, device_id=event.device_id or None)
            await client.to_device(message)


def megolm_event(room_id: str, source: dict[str, Any]) -> MegolmEvent | None:
    try:
        event = MegolmEvent.from_dict(source)
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(event, MegolmEvent):
        return None  # a BadEvent: not a Megolm event nio can read
    event.room_id = room_id
    return event


def decrypt(client: AsyncClient, room_id: str, source: dict[str, Any]) -> dict[str, Any] | None:
    """The plaintext event of an encrypted one, when its key is there."""
    event = megolm_event(room_id, source)
    if event is None or client.olm is None:
        return None
    decrypted = client.olm._decrypt_megolm_no_error(event)
    plain = getattr(decrypted, "source", None)
    return plain if isinstance(plain, dict) and plain.get("type") != "m.room.encrypted" else None
