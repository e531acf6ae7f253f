"""The Instagram trigger and job (workers/instagram.py) with a real Redis,
yt-dlp's real extractor against the fake Instagram (tests/instagram_rig.py),
and a real WorkerDeps.

The job is called as arq calls it (``instagram_preview(ctx, source, kind,
ident)``); an arq ``Retry`` it raises is honoured as arq does, by running it
again after the defer it names. Answers are read from the room's outbound
stream, where the core's delivery loop would pick them up."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.worker import Retry
from redis.asyncio import Redis

from bridge.bus import Bus, BusSettings
from bridge.config import Config
from bridge.events import Delivery, Event, EventKind
from tests.helpers import ConfigToml, free_port
from tests.instagram_rig import (
    CDN,
    CDN2,
    FOREIGN,
    JPEG,
    MP4,
    FakeInstagram,
    carousel_item,
    cdn_url,
    image_item,
    profile_json,
    video_item,
)
from tests.talkbot_rig import SECRET, until, write_config
from workers import instagram
from workers.deps import DEPS, WorkerDeps
from workers.instagram import ALERT_KEY, JOB, SETTINGS, Settings
from workers.results import WORKER_MARK, result_id

PREFIX = "tb"
UP = "api.a"  # takes files
BOT = "nctalkbot.bot"  # text only (the Talk bot API)
OFF = "api.c"  # previews not enabled
ROOM = "room1"


def config_text(enabled: bool = True, dedupe: float = 60) -> str:
    config = ConfigToml().section("nctalkbot.bot", Server="http://127.0.0.1:9", BotSecret=SECRET)
    config.api("a", free_port()).api("b", free_port()).api("c", free_port())
    config.gateway("previews", (UP, "api"), (BOT, ROOM), **({"Instagram": True} if enabled else {}))
    config.gateway("plain", ("api.b", "api"), (OFF, "api"))
    return config.section("instagram", DedupeSeconds=dedupe).text()


FAST = Settings(breaker_base=0.3, breaker_cap=0.6, fetch_timeout=10, transient_base=0.05)


@dataclass
class Rig:
    config: Config
    redis: Redis
    deps: WorkerDeps
    fake: FakeInstagram
    settings: Settings = FAST
    enqueued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    cleared: list[tuple[str, str]] = field(default_factory=list)
    enqueued_at: dict[str, datetime] = field(default_factory=dict)  # arq keeps a job's enqueue time across tries
    count: int = 0

    @property
    def trigger(self) -> instagram.InstagramTrigger:
        trigger = instagram.trigger(self.config, self.redis, PREFIX)
        assert trigger is not None
        return trigger

    async def enqueue(self, function: str, *args: Any, **kwargs: Any) -> None:
        self.enqueued.append((function, args, kwargs))

    def event(self, text: str, account: str = UP, channel: str = "api", **kw: Any) -> Event:
        self.count += 1
        return Event(kind=EventKind.MESSAGE, account=account, channel=channel, sender_id="u1", sender_name="Alice",
                     text=text, native_id=str(100 + self.count), origin=[f"{account}/{channel}"], **kw)  # fmt: skip

    async def say(self, text: str, account: str = UP, channel: str = "api", **kw: Any) -> Event:
        event = self.event(text, account, channel, **kw)
        await self.trigger.consider(event, self.enqueue)
        return event

    async def run(self, job: tuple[str, tuple[Any, ...], dict[str, Any]], job_try: int = 1) -> float | None:
        """One run of an enqueued job as arq runs it; the defer of a Retry, or None when it ended."""
        function, args, kwargs = job
        assert function == JOB
        enqueued = self.enqueued_at.setdefault(kwargs["_job_id"], datetime.now(UTC))
        ctx = {DEPS: self.deps, SETTINGS: self.settings, "job_id": kwargs["_job_id"], "job_try": job_try,
               "enqueue_time": enqueued}  # fmt: skip
        try:
            await instagram.instagram_preview(ctx, *args)
        except Retry as retry:
            return (retry.defer_score or 0) / 1000
        return None

    async def run_to_end(self, job: tuple[str, tuple[Any, ...], dict[str, Any]]) -> int:
        """Run it, and again after each Retry's defer (arq's protocol), until it ends; its tries."""
        tries = 1
        while (defer := await self.run(job, tries)) is not None:
            await asyncio.sleep(defer)
            tries += 1
        return tries

    async def replies(self, account: str = UP) -> list[Delivery]:
        rows = await self.redis.xrange(self.deps.bus.outbound(account))
        return [Delivery.from_wire(fields[b"d"]) for _id, fields in rows]


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeInstagram]:
    rig = FakeInstagram(tmp_path_factory.mktemp("fake-instagram")).start()
    try:
        yield rig
    finally:
        rig.stop()


async def make_rig(redis: Redis, fake: FakeInstagram, tmp: Path, http: httpx.AsyncClient, **options: Any) -> Rig:
    config = write_config(tmp / "talkbridge.toml", config_text(**options))
    rig = Rig(config, redis, None, fake)  # type: ignore[arg-type]

    async def alert(key: str, text: str, severity: str = "error") -> None:
        rig.alerts.append((key, text, severity))

    async def clear_alert(key: str, text: str) -> None:
        rig.cleared.append((key, text))

    bus = Bus(redis, BusSettings(prefix=PREFIX))
    rig.deps = WorkerDeps(config, redis, bus, http, logging.getLogger("test.instagram"), alert, clear_alert)
    return rig


@pytest.fixture
async def rig(redis: Redis, fake: FakeInstagram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    for name, value in fake.worker_env().items():  # yt-dlp reaches the fake as through an egress proxy
        monkeypatch.setenv(name, value)
    fake.requests.clear()
    fake.refused.clear()
    fake.mode = "ok"
    async with httpx.AsyncClient(proxy=fake.proxy_url, verify=fake.client_ssl(), follow_redirects=False) as http:
        yield await make_rig(redis, fake, tmp_path, http)


def link(code: str, path: str = "p") -> str:
    return f"https://www.instagram.com/{path}/{code}/?igsh=xyz"


def files(delivery: Delivery) -> list[tuple[str, str, bytes]]:
    return [(a.name, a.mime, base64.b64decode(a.data_b64 or "")) for a in delivery.event.attachments]


# ---------------------------------------------------------------------------------------
# the trigger
# ---------------------------------------------------------------------------------------
async def test_only_rooms_with_previews_enabled_start_jobs(rig: Rig) -> None:
    event = await rig.say(f"look {link('CodeOne001')} and instagram.com/natgeo")
    assert [(f, a[1:], k) for f, a, k in rig.enqueued] == [
        (JOB, ("post", "CodeOne001"), {"_job_id": f"ig:{event.id}:media:CodeOne001"}),
        (JOB, ("profile", "natgeo"), {"_job_id": f"ig:{event.id}:profile:natgeo"}),
    ]
    source = Event.from_dict(rig.enqueued[0][1][0])
    assert (source.account, source.channel, source.native_id, source.id) == (UP, "api", event.native_id, event.id)
    assert source.text == ""  # the job gets the room and the message id, not the text
    rig.enqueued.clear()
    await rig.say(link("CodeOne002"), account=OFF)  # not enabled there
    await rig.say("no link here")
    await rig.say(link("CodeOne003"), extra={WORKER_MARK: "instagram"})  # a job's own answer
    edit = rig.event(link("CodeOne004"))
    edit.kind = EventKind.EDIT
    await rig.trigger.consider(edit, rig.enqueue)
    assert rig.enqueued == []
    await rig.say(link("CodeOne005"), account=BOT, channel=ROOM)  # the Talk bot's room is enabled too
    assert [a[2] for _, a, _ in rig.enqueued] == ["CodeOne005"]


async def test_no_enabled_room_no_trigger(redis: Redis, tmp_path: Path) -> None:
    config = write_config(tmp_path / "off.toml", config_text(enabled=False))
    assert instagram.trigger(config, redis, PREFIX) is None


async def test_the_same_link_twice_in_a_room_runs_one_job(redis: Redis, fake: FakeInstagram, tmp_path: Path) -> None:
    async with httpx.AsyncClient() as http:
        rig = await make_rig(redis, fake, tmp_path, http, dedupe=0.5)
    first = await rig.say(link("Dedupe0001"))
    await rig.say(f"again: {link('Dedupe0001', 'reel')}")  # the same media by another path
    assert len(rig.enqueued) == 1
    # the route loop handling the first event again: the same job id, which arq refuses
    await rig.trigger.consider(first, rig.enqueue)
    assert [k["_job_id"] for _, _, k in rig.enqueued] == [f"ig:{first.id}:media:Dedupe0001"] * 2
    # another room is another preview
    await rig.say(link("Dedupe0001"), account=BOT, channel=ROOM)
    assert len(rig.enqueued) == 3
    # after the window the room gets it again

    async def again() -> bool:
        await rig.say(link("Dedupe0001"))
        return len(rig.enqueued) == 4

    await until(again, within=10, what="a new job once the dedupe window is over")


# ---------------------------------------------------------------------------------------
# previews
# ---------------------------------------------------------------------------------------
async def test_an_image_post_is_uploaded_with_its_caption_author_and_counts(rig: Rig) -> None:
    code = rig.fake.add_post(image_item("ImagePost1", username="alice", caption="sunset", likes=1234, comments=5))
    event = await rig.say(link(code))
    assert await rig.run(rig.enqueued[0]) is None
    [reply] = await rig.replies()
    assert reply.event.text.splitlines() == [
        "📷 Post by @alice (Alice Person)",
        "sunset",
        "❤️ 1,234 · 💬 5",
        f"https://www.instagram.com/p/{code}/",
    ]
    assert files(reply) == [(f"{code}_1.jpg", "image/jpeg", JPEG)]
    assert reply.event.reply_to == event.native_id and reply.account == UP and reply.channel == "api"
    assert reply.event.extra == {WORKER_MARK: "instagram"}
    assert reply.event.id == result_id(f"ig:{event.id}:media:{code}:preview")


async def test_a_reel_uploads_its_video(rig: Rig) -> None:
    code = rig.fake.add_post(video_item("ReelVideo1", caption="watch", duration=75.4))
    await rig.say(link(code, "reel"))
    await rig.run(rig.enqueued[0])
    [reply] = await rig.replies()
    assert reply.event.text.startswith("🎬 Reel by @alice") and "⏱ 1:15" in reply.event.text
    assert files(reply) == [(f"{code}_1.mp4", "video/mp4", MP4)]


async def test_a_carousel_uploads_every_item_in_order(rig: Rig) -> None:
    children = [image_item("Carousel1a"), video_item("Carousel1b"), image_item("Carousel1c")]
    code = rig.fake.add_post(carousel_item("Carousel01", children))
    await rig.say(link(code))
    await rig.run(rig.enqueued[0])
    [reply] = await rig.replies()
    assert [(n, m) for n, m, _ in files(reply)] == [
        (f"{code}_1.jpg", "image/jpeg"),
        (f"{code}_2.mp4", "video/mp4"),
        (f"{code}_3.jpg", "image/jpeg"),
    ]
    assert "3 items" in reply.event.text


async def test_a_room_that_takes_no_files_gets_links_and_nothing_is_downloaded(rig: Rig) -> None:
    children = [image_item("TextOnly1a"), video_item("TextOnly1b")]
    code = rig.fake.add_post(carousel_item("TextOnly01", children))
    await rig.say(link(code), account=BOT, channel=ROOM)
    await rig.run(rig.enqueued[0])
    [reply] = await rig.replies(BOT)
    assert reply.event.attachments == []
    assert f"Image 1: {cdn_url('TextOnly1a.jpg')}" in reply.event.text
    assert f"Video 2: {cdn_url('TextOnly1b.mp4', CDN2)}" in reply.event.text
    assert rig.fake.seen(CDN) == [] and rig.fake.seen(CDN2) == []


async def test_a_video_over_the_size_limit_becomes_its_thumbnail_and_a_link(rig: Rig) -> None:
    rig.settings = Settings(max_media_bytes=len(MP4) - 1, fetch_timeout=10)
    code = rig.fake.add_post(video_item("TooBigVid1"))
    await rig.say(link(code, "reel"))
    await rig.run(rig.enqueued[0])
    [reply] = await rig.replies()
    assert files(reply) == [(f"{code}_1_thumbnail.jpg", "image/jpeg", JPEG)]
    assert f"Video: larger than {(len(MP4) - 1) / 1e6:g} MB, watch it on Instagram" in reply.event.text
    assert reply.event.text.endswith(f"https://www.instagram.com/reel/{code}/")


async def test_media_outside_instagram_is_never_fetched(rig: Rig) -> None:
    item = image_item("Foreign001", image=f"https://{FOREIGN}/steal.jpg")
    code = rig.fake.add_post(item)
    await rig.say(link(code))
    await rig.run(rig.enqueued[0])
    [reply] = await rig.replies()
    assert reply.event.attachments == [] and "Image: not available here, see Instagram" in reply.event.text
    assert rig.fake.refused == []  # nothing even asked the proxy for the foreign host


async def test_a_profile(rig: Rig) -> None:
    rig.fake.profiles["natgeo"] = profile_json("natgeo", followers=283_000_000, posts=("Recent0001",))
    rig.fake.add_media(cdn_url("natgeo_pic.jpg"), JPEG, "image/jpeg")
    await rig.say("https://www.instagram.com/NatGeo/")
    await rig.run(rig.enqueued[0])
    [reply] = await rig.replies()
    lines = reply.event.text.splitlines()
    assert lines[0] == "👤 @natgeo (Natgeo Person)"
    assert "283M followers · 56 following · 101 posts" in lines
    assert "• https://www.instagram.com/p/Recent0001/ post Recent0001" in lines
    assert files(reply) == [("natgeo_1.jpg", "image/jpeg", JPEG)]


async def test_a_story_is_not_supported(rig: Rig) -> None:
    await rig.say("https://www.instagram.com/stories/someone/3141592653589/")
    await rig.run(rig.enqueued[0])
    [reply] = await rig.replies()
    assert reply.event.text == "Instagram stories cannot be previewed."
    assert rig.fake.requests == []


@pytest.mark.parametrize(
    ("code", "setup", "text"),
    [
        ("Private001" + "p" * 28, None, "🔒 This Instagram post is private: no preview."),
        ("Deleted001", None, "This Instagram post is not available (deleted, or never public)."),
        ("Restrict01", {"title": "Restricted Video", "description": "You must be 18"},
         "This Instagram post is restricted (age or region): no preview without a logged-in account."),
    ],
)  # fmt: skip
async def test_private_deleted_and_restricted_posts_get_a_short_answer(
    rig: Rig, code: str, setup: dict[str, str] | None, text: str
) -> None:
    if setup is not None:
        rig.fake.add_post(image_item(code), ruling=setup)
    await rig.say(link(code))
    await rig.run(rig.enqueued[0])
    [reply] = await rig.replies()
    assert reply.event.text == text and reply.event.attachments == []
    assert rig.alerts == []  # one post's problem, not Instagram refusing us
    # the answer is cached for a while: the same link in another room asks Instagram nothing
    rig.fake.requests.clear()
    await rig.say(link(code), account=BOT, channel=ROOM)
    await rig.run(rig.enqueued[1])
    assert [r.event.text for r in await rig.replies(BOT)] == [text]
    assert rig.fake.requests == []


# ---------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------
async def test_a_cached_preview_is_answered_without_asking_instagram(rig: Rig, tmp_path: Path) -> None:
    rig = await make_rig(rig.redis, rig.fake, tmp_path, rig.deps.http, dedupe=0)  # no dedupe: the cache answers
    code = rig.fake.add_post(carousel_item("Cached0001", [image_item("Cached001a"), video_item("Cached001b")]))
    await rig.say(link(code))
    await rig.run(rig.enqueued[0])
    [first] = await rig.replies()
    rig.fake.requests.clear()
    # shared again, by another path to the same media, and in a text-only room
    await rig.say(link(code, "reel"))
    await rig.say(link(code), account=BOT, channel=ROOM)
    assert await rig.run(rig.enqueued[1]) is None and await rig.run(rig.enqueued[2]) is None
    assert rig.fake.requests == []  # neither Instagram nor its CDN was asked
    [_, again] = await rig.replies()
    assert files(again) == files(first) and again.event.text == first.event.text
    [text_only] = await rig.replies(BOT)
    assert "Image 1: " in text_only.event.text and text_only.event.attachments == []


# ---------------------------------------------------------------------------------------
# Instagram refusing us: the breaker
# ---------------------------------------------------------------------------------------
async def test_instagram_refusing_pauses_everyone_tells_the_room_once_and_the_admin(rig: Rig) -> None:
    one = rig.fake.add_post(image_item("Blocked001"))
    two = rig.fake.add_post(image_item("Blocked002"))
    rig.fake.mode = "login_wall"  # Instagram's anonymous rate limit
    await rig.say(link(one))
    await rig.say(link(two))
    defer = await rig.run(rig.enqueued[0])
    assert defer is not None and 0 < defer <= FAST.breaker_base
    [(key, text, severity)] = rig.alerts
    assert key == ALERT_KEY and severity == "error" and "rate-limit" in text and "CookiesFile" in text
    fetches = len(rig.fake.extractions())
    # the other job does not ask Instagram while the breaker is open, and the room is not told twice
    assert await rig.run(rig.enqueued[1]) is not None
    assert len(rig.fake.extractions()) == fetches
    [notice] = await rig.replies()
    assert notice.event.text.startswith("⏳ Instagram is limiting us right now, previews are paused")
    assert notice.event.reply_to is not None
    # Instagram answers again: the first job back probes, succeeds, the alert is cleared
    rig.fake.mode = "ok"
    tries = await asyncio.gather(rig.run_to_end(rig.enqueued[0]), rig.run_to_end(rig.enqueued[1]))
    assert min(tries) >= 1
    assert [k for k, _ in rig.cleared] == [ALERT_KEY]
    texts = [r.event.text for r in await rig.replies()]
    assert len(texts) == 3 and sum(t.startswith("📷 Post by") for t in texts) == 2
    assert len(rig.alerts) == 1


async def test_failing_again_doubles_the_pause_and_gives_up_in_the_end(rig: Rig) -> None:
    rig.settings = Settings(breaker_base=0.2, breaker_cap=0.4, give_up_seconds=1.0, fetch_timeout=10)
    code = rig.fake.add_post(image_item("Refused001"))
    rig.fake.mode = "rate_limited"  # 429s
    await rig.say(link(code))
    tries = await rig.run_to_end(rig.enqueued[0])
    assert tries >= 3
    assert len(rig.alerts) >= 2 and all(k == ALERT_KEY for k, _, _ in rig.alerts)
    texts = [r.event.text for r in await rig.replies()]
    assert texts[0].startswith("⏳ Instagram is limiting us")
    assert texts[-1] == "Instagram kept refusing us for too long: no preview for this link, sorry. Try again later."
    assert rig.cleared == []


async def test_a_broken_instagram_is_tried_a_few_times_then_the_room_is_told(rig: Rig) -> None:
    code = rig.fake.add_post(image_item("Broken0001"))
    rig.fake.mode = "broken"  # 500s: not a refusal, no breaker
    await rig.say(link(code))
    assert await rig.run_to_end(rig.enqueued[0]) == instagram.TRANSIENT_TRIES
    [reply] = await rig.replies()
    assert reply.event.text == "Could not fetch this Instagram link right now. Try again later."
    assert rig.alerts == [] and len(rig.fake.extractions()) == instagram.TRANSIENT_TRIES


# ---------------------------------------------------------------------------------------
# rate limits: queued, not dropped
# ---------------------------------------------------------------------------------------
async def test_over_the_room_limit_links_wait_their_turn_with_one_notice(rig: Rig) -> None:
    rig.settings = Settings(room_requests_per_minute=1, requests_per_minute=10, period=0.8, queue_notice_seconds=0.3,
                            fetch_timeout=10)  # fmt: skip
    codes = [rig.fake.add_post(image_item(f"Queued000{i}")) for i in range(3)]
    await rig.say(" ".join(link(c) for c in codes))
    other = rig.fake.add_post(image_item("OtherRoom1"))
    await rig.say(link(other), account=BOT, channel=ROOM)
    jobs = rig.enqueued
    tries = await asyncio.gather(*(rig.run_to_end(job) for job in jobs))
    assert tries[3] == 1 and max(tries[:3]) >= 2  # the other room has its own limit; this one waited
    texts = [r.event.text for r in await rig.replies()]
    notices = [t for t in texts if t.startswith("⏳")]
    assert len(notices) == 1 and notices[0].startswith("⏳ Instagram preview queued (rate limit): about ")
    assert sorted(t.splitlines()[-1] for t in texts if t.startswith("📷")) == sorted(
        f"https://www.instagram.com/p/{c}/" for c in codes
    )
    starts = sorted(s.at for s in rig.fake.extractions())
    assert len(starts) == 4


async def test_a_job_run_again_posts_the_same_answer(rig: Rig) -> None:
    """arq runs a job again when its worker died: the second run's answer has the
    first one's id, so the delivery loop delivers it once (workers/results.py)."""
    code = rig.fake.add_post(image_item("TwiceRun01"))
    await rig.say(link(code))
    await rig.run(rig.enqueued[0])
    await rig.run(rig.enqueued[0], job_try=2)
    first, second = await rig.replies()
    assert first.event.id == second.event.id and first.key == second.key
