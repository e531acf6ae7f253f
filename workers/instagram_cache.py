"""Previews cached by shortcode (or username), and dedupe of a link posted
twice in a room.

A cache entry is one Redis hash, ``{prefix}:ig:cache:media:CODE`` (a post,
reel and IGTV link of one shortcode share it) or ``...:profile:NAME``, with
the ``CacheSeconds`` expiry: the preview as JSON, and the downloaded files
when they are small enough to keep (``MAX_CACHED_FILES_BYTES`` together; a
large video is fetched from the CDN again, the rate-limited part, the
extraction, is not repeated). A post found private, deleted or restricted is
cached too, for at most ``ERROR_SECONDS``: a deleted post shared around is
not asked for again and again, and one made public again shows up soon.

Dedupe: the trigger sets ``{prefix}:ig:seen:ROOM:TARGET`` (NX, ``DedupeSeconds``)
to the id of the event that claimed it. The same link again in that room
within the window starts no job; the same event handled again (the route loop
after a crash) finds its own id there and enqueues again, which arq refuses
as a duplicate job id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from bridge.keys import instagram_cache_key, instagram_seen_key
from workers.instagram_fetch import Preview
from workers.instagram_reply import File
from workers.instagram_urls import Target

MAX_CACHED_FILES_BYTES = 8 << 20
ERROR_SECONDS = 600.0

_REPLACE = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""


@dataclass(slots=True)
class Cached:
    preview: Preview | None
    error: str | None  # an ErrorKind: the link's answer was that
    files: list[File] | None  # None: not kept (or not asked for)


class PreviewCache:
    def __init__(self, redis: Redis, prefix: str, ttl: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_ms = round(ttl * 1000)
        self._replace_script = redis.register_script(_REPLACE)

    def key(self, target: Target) -> str:
        return instagram_cache_key(self.prefix, target.cache_key)

    async def get(self, target: Target, *, files: bool) -> Cached | None:
        if self.ttl_ms <= 0:
            return None
        fields = ["preview", "error", "files"]
        preview_raw, error, manifest_raw = await self.redis.hmget(self.key(target), fields)
        if preview_raw is None and error is None:
            return None
        if error is not None:
            return Cached(None, error.decode(), None)
        try:
            preview = Preview.from_json(preview_raw)
        except (ValueError, TypeError, KeyError):  # written by an older version: fetch again
            return None
        kept: list[File] | None = None
        if files and manifest_raw is not None:
            manifest = orjson.loads(manifest_raw)
            blobs = (
                await self.redis.hmget(self.key(target), [f"f{i}" for i in range(len(manifest))]) if manifest else []
            )
            if all(blob is not None for blob in blobs):
                kept = [File(m["name"], m["mime"], blob) for m, blob in zip(manifest, blobs, strict=True)]
        return Cached(preview, None, kept)

    async def put(self, target: Target, preview: Preview, files: list[File] | None) -> None:
        """``files``: the files downloaded for it (None: none were, the room takes no files)."""
        if self.ttl_ms <= 0:
            return
        mapping: dict[str, bytes] = {"preview": preview.to_json()}
        if files is not None and sum(len(f.data) for f in files) <= MAX_CACHED_FILES_BYTES:
            mapping["files"] = orjson.dumps([{"name": f.name, "mime": f.mime} for f in files])
            mapping.update({f"f{i}": f.data for i, f in enumerate(files)})
        await self._replace(self.key(target), mapping, self.ttl_ms)

    async def put_error(self, target: Target, kind: str) -> None:
        ttl = min(self.ttl_ms, round(ERROR_SECONDS * 1000))
        if ttl <= 0:
            return
        await self._replace(self.key(target), {"error": kind}, ttl)

    async def _replace(self, key: str, mapping: Mapping[str, bytes | str], ttl_ms: int) -> None:
        """The entry replaced whole, with its expiry, in one step: a script,
        not a MULTI, which redis-py refuses on Redis Cluster (one key: one slot)."""
        await self._replace_script(keys=[key], args=[ttl_ms, *(item for pair in mapping.items() for item in pair)])


class Dedupe:
    def __init__(self, redis: Redis, prefix: str, window: float) -> None:
        self.window_ms = round(window * 1000)
        self.prefix = prefix
        self._claim = redis.register_script(_CLAIM)

    async def claim(self, account: str, channel: str, target: Target, event_id: str) -> bool:
        """True: this event previews ``target`` in this room (first within the window, or the same event again)."""
        if self.window_ms <= 0:
            return True
        room = hashlib.sha1(f"{account}\x1f{channel}".encode()).hexdigest()[:20]
        key = instagram_seen_key(self.prefix, room, target.cache_key)
        return bool(await self._claim(keys=[key], args=[event_id, self.window_ms]))
