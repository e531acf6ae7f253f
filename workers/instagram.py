"""Instagram link previews (issue 11; seeds 001 and 004): someone posts an
Instagram post, reel, IGTV or profile link in a room where previews are
enabled, and the room gets the media, the caption, the author and the
counts, threaded under the link. docs/instagram.md is the user's guide.

Two halves:

- ``InstagramTrigger`` (the daemon's route loop, every inbound message):
  finds the links (``instagram_urls``), only in rooms where
  ``instagram_enabled``; claims each (room, link) for ``DedupeSeconds``
  so the same link twice in a room runs one job; enqueues ``instagram_preview``
  with a job id made of the event id and the link, so the route loop
  handling the event again after a crash cannot enqueue it twice.
- ``instagram_preview`` (an arq job, any worker), in this order:
  1. the cache (``instagram_cache``): a preview fetched before is answered at
     once, without the limiter and without Instagram;
  2. the circuit breaker (``instagram_breaker``): while Instagram refuses
     us, the job waits (arq ``Retry``) and the room is told once;
  3. the rate limits (``ratelimit``), global and per room on Redis's clock:
     over them the job waits its turn (``Retry`` with the computed wait), and
     a wait longer than ``QueueNoticeSeconds`` tells the room once;
  4. the fetch (``instagram_fetch``: yt-dlp, or the profile JSON), then the
     media downloads where the room takes files (``instagram_media``:
     Instagram's hosts only, capped), the cache, and the reply.

A job is run again when its worker dies (arq runs jobs at least once): every
message it posts has a key made of its job id, so a second run's post is
the same delivery and the room sees it once (workers/results.py). Notices
are posted once per room while it waits (a marker in Redis, owned by the job
that posted it).
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from arq.worker import Retry, func
from redis.asyncio import Redis

from bridge.config import Config
from bridge.events import Attachment, Event, EventKind
from bridge.keys import instagram_notice_key
from workers.deps import DEPS, WorkerDeps
from workers.feature_settings import InstagramSection
from workers.instagram_breaker import Breaker
from workers.instagram_cache import Dedupe, PreviewCache
from workers.instagram_fetch import Fetcher, FetchError, Preview
from workers.instagram_media import Fetched, Refused, TooLarge, Unreachable, download_media
from workers.instagram_reply import File, error_text, paused_text, queued_text, render
from workers.instagram_urls import Target, find_targets
from workers.ratelimit import RateLimiter
from workers.results import can_upload, is_worker_result, post_reply
from workers.triggers import Enqueue

FEATURE = "instagram"
SWITCH = "Instagram"  # the key that enables previews (workers/feature_settings.py INSTAGRAM_ROOM_OPTIONS)
JOB = "instagram_preview"
ALERT_KEY = "instagram:blocked"
SETTINGS = "instagram_settings"  # an arq ctx key: a Settings that replaces the config's (tests, the benchmark)
FETCHER = "instagram_fetcher"  # an arq ctx key: a Fetcher stand-in (bench/jobs.py's no-op one)
# arq counts each Retry as a try. Waits are computed, so a job needs a few;
# this bound only stops a job that would otherwise never end.
MAX_TRIES = 200
TRANSIENT_TRIES = 3  # network failures and Instagram 5xx: tries before "could not fetch"
PART_BYTES = 8 << 20  # files per delivery: the first carries the text, larger sets go on in further ones
MIME_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif",
            "image/heic": "heic", "video/mp4": "mp4", "video/quicktime": "mov", "video/webm": "webm"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Settings:
    """``[instagram]``, plus the breaker's timings (not configurable: Instagram's
    blocks last minutes to hours, the backoff follows them)."""

    requests_per_minute: int = 30
    room_requests_per_minute: int = 6
    period: float = 60.0  # the window the two limits count in
    cache_seconds: float = 86400.0
    dedupe_seconds: float = 60.0
    cookies_file: str = ""
    max_media_bytes: int = 50_000_000
    queue_notice_seconds: float = 5.0
    fetch_timeout: float = 30.0
    max_images: int = 10
    breaker_base: float = 60.0
    breaker_cap: float = 3600.0
    give_up_seconds: float = 3600.0  # a job refused by Instagram this long after it was enqueued ends
    transient_base: float = 5.0

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        s = config.settings(InstagramSection)
        return cls(
            requests_per_minute=s.requests_per_minute,
            room_requests_per_minute=s.room_requests_per_minute,
            period=float(s.rate_window_seconds),
            cache_seconds=float(s.cache_seconds),
            dedupe_seconds=float(s.dedupe_seconds),
            cookies_file=s.cookies_file,
            max_media_bytes=s.max_media_bytes,
            queue_notice_seconds=float(s.queue_notice_seconds),
            fetch_timeout=float(s.fetch_timeout),
            max_images=s.max_images,
        )


def job_id(event: Event, target: Target) -> str:
    return f"ig:{event.id}:{target.cache_key}"


def room_of(account: str, channel: str) -> str:
    return f"{account}/{channel}"


def _source(event: Event) -> dict[str, Any]:
    """What the job needs of the message: its room and id (no text, no files)."""
    slim = Event(kind=EventKind.MESSAGE, account=event.account, channel=event.channel, native_id=event.native_id,
                 sender_name=event.sender_name, id=event.id, timestamp=event.timestamp)  # fmt: skip
    return slim.to_dict()


# the trigger ----------------------------------------------------------------------------


class InstagramTrigger:
    def __init__(self, config: Config, redis: Redis, prefix: str) -> None:
        self.config = config
        self.dedupe = Dedupe(redis, prefix, float(config.settings(InstagramSection).dedupe_seconds))

    async def consider(self, event: Event, enqueue: Enqueue) -> None:
        if event.kind != EventKind.MESSAGE or not event.text or is_worker_result(event):
            return
        targets = find_targets(event.text)
        if not targets or not instagram_enabled(self.config, event.account, event.channel):
            return
        source = _source(event)
        for target in targets:
            if await self.dedupe.claim(event.account, event.channel, target, event.id):
                await enqueue(JOB, source, target.kind, target.ident, _job_id=job_id(event, target))


def instagram_enabled(config: Config, account: str, channel: str) -> bool:
    """Instagram previews in this room? The channel entry's option, else
    any gateway of the room that enables them, else the account's key
    (which falls back to [general]). A room must be enabled explicitly
    (seed 004: the bot ignores URLs elsewhere)."""
    acct = config.accounts.get(account)
    if acct is None:
        return False
    on_channels, on_gateways = config.room_values(SWITCH, account, channel)
    if on_channels:
        return bool(on_channels[0])
    if any(on_gateways):
        return True
    return acct.get(SWITCH) is True


def _enabled_anywhere(config: Config) -> bool:
    return any(instagram_enabled(config, e.account, e.channel) for gw in config.gateways for e in gw.entries) or any(
        instagram_enabled(config, name, "") for name in config.accounts
    )


def trigger(config: Config, redis: Redis, prefix: str) -> InstagramTrigger | None:
    """The trigger, or None when no room has previews enabled."""
    return InstagramTrigger(config, redis, prefix) if _enabled_anywhere(config) else None


# the job ---------------------------------------------------------------------------------

_NOTICE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class Previewer:
    """One run of one job: everything it uses, built from the worker's deps."""

    def __init__(self, deps: WorkerDeps, settings: Settings, job: str, job_try: int, enqueued_at: float,
                 fetcher: Fetcher | None = None) -> None:  # fmt: skip
        self.deps = deps
        self.s = settings
        self.job = job
        self.job_try = job_try
        self.enqueued_at = enqueued_at  # epoch seconds, the enqueuing daemon's clock
        prefix = deps.prefix
        self.cache = PreviewCache(deps.redis, prefix, settings.cache_seconds)
        self.breaker = Breaker(deps.redis, prefix, base=settings.breaker_base, cap=settings.breaker_cap,
                               probe_seconds=max(2 * settings.fetch_timeout, 10.0))  # fmt: skip
        self.limiter = RateLimiter(deps.redis, prefix, FEATURE, limit=settings.requests_per_minute,
                                   room_limit=settings.room_requests_per_minute, period=settings.period)  # fmt: skip
        self.fetcher = fetcher or Fetcher(deps.http, timeout=settings.fetch_timeout, cookies_file=settings.cookies_file,
                                          max_media=settings.max_images, log=deps.log)  # fmt: skip
        self._notice = deps.redis.register_script(_NOTICE)
        self.prefix = prefix

    async def run(self, source: Event, target: Target) -> None:
        log = self.deps.log
        uploads = can_upload(self.deps.config, source.account)
        room = room_of(source.account, source.channel)
        if target.kind == "story":
            await self.reply_error(source, target, "unsupported")
            return
        cached = await self.cache.get(target, files=uploads)
        if cached is not None:
            await self.limiter.leave(self.job, room)
            if cached.error is not None:
                await self.reply_error(source, target, cached.error)
            else:
                assert cached.preview is not None
                await self._reply_preview(source, cached.preview, cached.files, uploads)
            return

        gate = await self.breaker.check(self.job)
        if not gate.fetch:
            await self._wait_blocked(source, gate.wait)
        wait = await self.limiter.acquire(self.job, room)
        if wait > 0:
            if wait > self.s.queue_notice_seconds:
                await self._notice_once(source, "queued", queued_text(wait), wait)
            self._retry(wait, "rate limit")
        started = await self.deps.server_time()
        try:
            preview = await (
                self.fetcher.profile_preview(target) if target.kind == "profile" else self.fetcher.media_preview(target)
            )
        except FetchError as exc:
            await self._failed(source, target, exc, started)
            return
        closed = await self.breaker.success(self.job, started)
        if closed:
            log.warning("instagram: fetching works again after %d refused attempt(s)", closed)
            await self.deps.clear_alert(ALERT_KEY, "Instagram answers again: link previews have resumed.")
        files, notes = (await self._download(preview)) if uploads else (None, [])
        await self.cache.put(target, preview, files)
        await self._reply_preview(source, preview, files, uploads, notes)

    # waiting -------------------------------------------------------------------------
    def _retry(self, wait: float, why: str, kind: str = "failed") -> NoReturn:
        """Run again in ``wait`` seconds (arq ``Retry``), or give up when tries run out."""
        if self.job_try >= MAX_TRIES - 1:
            raise _GiveUp(kind, f"{why}, after {self.job_try} tries")
        self.deps.log.debug("instagram: %s waits %.1fs (%s)", self.job, wait, why)
        raise Retry(defer=max(wait, 0.01))

    async def _wait_blocked(self, source: Event, wait: float) -> NoReturn:
        """The breaker is open: wait for it, unless this job has waited too long already."""
        if time.time() - self.enqueued_at > self.s.give_up_seconds:
            await self.limiter.leave(self.job, room_of(source.account, source.channel))
            raise _GiveUp("rate_limited", "Instagram refused for too long")
        await self._notice_once(source, "paused", paused_text(wait), wait)
        self._retry(wait, "Instagram refuses", "rate_limited")

    async def _notice_once(self, source: Event, kind: str, text: str, wait: float) -> None:
        """One notice of this kind per room while it waits: the job that sets the
        room's marker posts it; the others extend the marker to their own wait."""
        room = hashlib.sha1(room_of(source.account, source.channel).encode()).hexdigest()[:20]
        key = instagram_notice_key(self.prefix, kind, room)
        if await self._notice(keys=[key], args=[self.job, max(1000, round(wait * 1000))]):
            await post_reply(self.deps, source, f"{self.job}:notice:{kind}", text, feature=FEATURE)

    # failures ------------------------------------------------------------------------
    async def _failed(self, source: Event, target: Target, exc: FetchError, started: float) -> None:
        log = self.deps.log
        if exc.blocks:
            trip = await self.breaker.trip(self.job, started)
            if trip.counted:
                log.warning(
                    "instagram: %s; fetching paused for %.0fs (trip %d)", exc.detail[:300], trip.wait, trip.trips
                )
                await self.deps.alert(
                    ALERT_KEY,
                    f"Instagram refuses our requests ({exc.kind.replace('_', ' ')}): previews paused for "
                    f"{trip.wait:.0f}s, trip {trip.trips} in a row. Instagram said: {exc.detail[:200]}"
                    + ("" if self.s.cookies_file else " (No CookiesFile is configured: logged-in fetching gets more.)"),
                    "critical" if trip.trips >= 4 else "error",
                )
            await self._wait_blocked(source, trip.wait)
        if exc.kind == "failed":
            if self.job_try < TRANSIENT_TRIES:
                log.info("instagram: %s for %s, trying again: %s", exc.kind, target.url, exc.detail[:300])
                self._retry(self.s.transient_base * 2 ** (self.job_try - 1), "fetch failed")
            log.warning("instagram: giving up on %s after %d tries: %s", target.url, self.job_try, exc.detail[:300])
        else:
            log.info("instagram: %s: %s", target.url, exc.kind)
            await self.cache.put_error(target, exc.kind)
        await self.reply_error(source, target, exc.kind)

    # downloads and replies -------------------------------------------------------------
    async def _download(self, preview: Preview) -> tuple[list[File], list[str]]:
        """The preview's media as files, in order; what could not be had becomes a note."""
        files: list[File] = []
        notes: list[str] = []
        http, cap, timeout = self.deps.http, self.s.max_media_bytes, self.s.fetch_timeout
        for i, media in enumerate(preview.media, start=1):
            label = ("Video" if media.kind == "video" else "Image") + (f" {i}" if len(preview.media) > 1 else "")
            try:
                got = await download_media(http, media.url, max_bytes=cap, deadline=timeout,
                                           types=("video/",) if media.kind == "video" else ("image/",))  # fmt: skip
            except TooLarge:
                notes.append(f"{label}: larger than {cap / 1e6:g} MB, watch it on Instagram")
                if media.thumbnail:
                    got = await self._try_download(media.thumbnail, ("image/",))
                    if got is not None:
                        files.append(File(f"{preview.ident}_{i}_thumbnail.{_ext(got.mime)}", got.mime, got.data))
                continue
            except (Refused, Unreachable) as exc:
                self.deps.log.warning("instagram: %s of %s not downloaded: %s", label, preview.link, exc)
                notes.append(f"{label}: not available here, see Instagram")
                continue
            files.append(File(f"{preview.ident}_{i}.{_ext(got.mime)}", got.mime, got.data))
        return files, notes

    async def _try_download(self, url: str, types: tuple[str, ...]) -> Fetched | None:
        try:
            return await download_media(
                self.deps.http, url, max_bytes=self.s.max_media_bytes, deadline=self.s.fetch_timeout, types=types
            )
        except (Refused, Unreachable) as exc:
            self.deps.log.warning("instagram: thumbnail not downloaded: %s", exc)
            return None

    async def _reply_preview(self, source: Event, preview: Preview, files: list[File] | None, uploads: bool,
                             notes: list[str] | None = None) -> None:  # fmt: skip
        if uploads and files is None:  # cached without its files (too large to keep, or fetched for a text room)
            files, notes = await self._download(preview)
        text = render(preview, media_links=not uploads, notes=notes or [])
        parts = _parts([_attachment(f) for f in files or []])
        key = f"{self.job}:preview"
        await post_reply(self.deps, source, key, text, attachments=parts[0], feature=FEATURE)
        for i, more in enumerate(parts[1:], start=1):
            await post_reply(self.deps, source, f"{key}:{i}", "", attachments=more, feature=FEATURE)

    async def reply_error(self, source: Event, target: Target, kind: str) -> None:
        await post_reply(self.deps, source, f"{self.job}:reply", error_text(kind, target), feature=FEATURE)


class _GiveUp(Exception):
    """The job ends without a preview; the room is told why (``kind``: an ErrorKind)."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


def _ext(mime: str) -> str:
    return MIME_EXT.get(mime, mime.split("/", 1)[-1][:8] or "bin")


def _attachment(file: File) -> Attachment:
    return Attachment(
        name=file.name, mime=file.mime, size=len(file.data), data_b64=base64.b64encode(file.data).decode()
    )


def _parts(attachments: list[Attachment]) -> list[list[Attachment]]:
    """Files grouped into deliveries of at most PART_BYTES (one file larger than that goes alone)."""
    parts: list[list[Attachment]] = [[]]
    size = 0
    for att in attachments:
        if parts[-1] and size + (att.size or 0) > PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(att)
        size += att.size or 0
    return parts


async def instagram_preview(ctx: dict[str, Any], source: dict[str, Any], kind: str, ident: str) -> None:
    """The arq job: a preview of ``Target(kind, ident)`` for the message ``source``."""
    deps: WorkerDeps = ctx[DEPS]
    settings: Settings = ctx.get(SETTINGS) or Settings.from_config(deps.config)
    event = Event.from_dict(source)
    target = Target(kind, ident)  # type: ignore[arg-type]
    enqueued = ctx.get("enqueue_time")
    previewer = Previewer(deps, settings, ctx.get("job_id") or job_id(event, target), int(ctx.get("job_try") or 1),
                          enqueued.timestamp() if enqueued is not None else time.time(), ctx.get(FETCHER))  # fmt: skip
    try:
        await previewer.run(event, target)
    except _GiveUp as exc:
        deps.log.warning("instagram: %s ends without a preview: %s", target.url, exc)
        await previewer.reply_error(event, target, exc.kind)


FUNCTIONS = [func(instagram_preview, name=JOB, max_tries=MAX_TRIES)]
