"""The persona's trigger and jobs, with a real Redis and a real WorkerDeps:
questions queued once, answered in order and one at a time per room however
many jobs run, threaded, with the room's history; failures as one short
message and an admin alert; a job run again after a crash posts once.

The jobs are called as arq calls them (``persona_reply(ctx, room)``), several
at once to stand for several workers; the model is FakeLLM, which holds each
request until the test lets it go."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from bridge.bus import Bus, BusSettings
from bridge.config import Config
from bridge.events import Attachment, Delivery, Event, EventKind, event_from_wire
from tests.helpers import ConfigToml, TomlValue, free_port
from tests.llama_rig import FakeLLM, fake_llm_fixture  # noqa: F401
from tests.talkbot_rig import SECRET, until, until_quiet, write_config
from workers import llm, llm_job, llm_queue
from workers.deps import DEPS, WorkerDeps
from workers.results import WORKER_MARK, result_id
from workers.triggers import queue_name

BOT = "nctalkbot.bot"  # its Persona: every message in its rooms
ROOM = "room1"
API = "api.b"  # a gateway's Persona: only @Inara messages
PREFIX = "tb"


def config_text(endpoint: str, *, timeout: float = 10, history: int = 4, job_timeout: float = 60,
                personas: bool = True) -> str:  # fmt: skip
    persona: dict[str, TomlValue] = {"Persona": "inara"} if personas else {}
    config = ConfigToml().section("nctalkbot.bot", Server="http://127.0.0.1:9", BotSecret=SECRET, **persona)
    config.api("a", free_port()).api("b", free_port()).api("c", free_port())
    config.gateway("bot", (BOT, ROOM), ("api.a", "api"))
    config.gateway("mention", (API, "api"), ("api.c", "api"), **persona)
    config.section("workers", JobTimeout=job_timeout)
    if personas:
        config.section("persona.inara", Name="Inara", Endpoint=endpoint, Model="test-model",
                       SystemPrompt="You are Inara.", History=history, Timeout=timeout)  # fmt: skip
    return config.text()


@dataclass
class Rig:
    config: Config
    redis: Redis
    deps: WorkerDeps
    trigger: llm.PersonaTrigger
    fake: FakeLLM
    tmp: Path
    enqueued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    cleared: list[tuple[str, str]] = field(default_factory=list)
    count: int = 0

    async def enqueue(self, function: str, *args: Any, **kwargs: Any) -> None:
        self.enqueued.append((function, args, kwargs))

    def event(self, text: str, account: str = BOT, channel: str = ROOM, sender: str = "alice", **kw: Any) -> Event:
        self.count += 1
        return Event(
            kind=EventKind.MESSAGE,
            account=account,
            channel=channel,
            sender_id=kw.pop("sender_id", f"users/{sender}"),
            sender_name=sender.capitalize(),
            text=text,
            native_id=str(100 + self.count),
            origin=[f"{account}/{channel}"],
            **kw,
        )

    async def say(self, text: str, **kw: Any) -> Event:
        event = self.event(text, **kw)
        await self.trigger.consider(event, self.enqueue)
        return event

    async def job(self, room: str | None = None, deps: WorkerDeps | None = None) -> str:
        room = room or llm_queue.room_id(BOT, ROOM)
        return await llm.persona_reply({DEPS: deps or self.deps, "job_id": "test"}, room)

    async def replies(self, account: str = BOT) -> list[Delivery]:
        rows = await self.redis.xrange(self.deps.bus.outbound(account))
        return [Delivery.from_wire(fields[b"d"]) for _id, fields in rows]

    def worker_deps(self, config: Config, http: httpx.AsyncClient) -> WorkerDeps:
        async def alert(key: str, text: str, severity: str = "error") -> None:
            self.alerts.append((key, text, severity))

        async def clear_alert(key: str, text: str) -> None:
            self.cleared.append((key, text))

        bus = Bus(self.redis, BusSettings(prefix=PREFIX))
        return WorkerDeps(config, self.redis, bus, http, logging.getLogger("test.worker"), alert, clear_alert)


@pytest.fixture
async def rig(redis: Redis, fake_llm: FakeLLM, tmp_path: Path) -> AsyncIterator[Rig]:
    async with httpx.AsyncClient() as http:
        yield await make_rig(redis, fake_llm, tmp_path, http)


async def make_rig(redis: Redis, fake: FakeLLM, tmp: Path, http: httpx.AsyncClient, **options: Any) -> Rig:
    config = write_config(tmp / "talkbridge.toml", config_text(fake.endpoint, **options))
    trigger = llm.trigger(config, redis, PREFIX)
    assert trigger is not None
    rig = Rig(config, redis, None, trigger, fake, tmp)  # type: ignore[arg-type]
    rig.deps = rig.worker_deps(config, http)
    return rig


# ---------------------------------------------------------------------------------------
# Trigger
# ---------------------------------------------------------------------------------------
async def test_no_persona_no_trigger(redis: Redis, fake_llm: FakeLLM, tmp_path: Path) -> None:
    config = write_config(tmp_path / "t.toml", config_text(fake_llm.endpoint, personas=False))
    assert llm.trigger(config, redis, PREFIX) is None


async def test_every_message_in_the_bots_room_is_a_question_queued_once(rig: Rig) -> None:
    event = await rig.say("what is the time?")
    room = llm_queue.room_id(BOT, ROOM)
    assert rig.enqueued == [("persona_reply", (room,), {"_job_id": f"llm:{event.id}"})]
    # the route loop handles the same event again (a crash before its XACK): the job is
    # enqueued again under the same id (arq refuses it if the first is known), nothing else
    await rig.trigger.consider(event, rig.enqueue)
    assert rig.enqueued[1] == rig.enqueued[0]
    keys = llm_queue.RoomKeys(PREFIX, room)
    assert await rig.redis.lrange(keys.queue, 0, -1) == [event.id.encode()]
    assert len(await rig.redis.lrange(keys.history, 0, -1)) == 1
    request = orjson.loads(await rig.redis.hget(keys.requests, event.id))
    assert request["question"] == "what is the time?" and request["persona"] == "inara" and request["every"]


async def test_in_a_gateways_rooms_only_a_mention_is_a_question(rig: Rig) -> None:
    await rig.say("hello all", account=API, channel="api")
    await rig.say("@Inara2 are you there?", account=API, channel="api")
    assert rig.enqueued == []
    asked = await rig.say("@inara: what is 2+2?", account=API, channel="api")
    assert [e[2]["_job_id"] for e in rig.enqueued] == [f"llm:{asked.id}"]
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(API, "api"))
    request = orjson.loads(await rig.redis.hget(keys.requests, asked.id))
    assert request["question"] == "what is 2+2?" and not request["every"]
    # every message of the room is kept as context, the mention stripped from questions
    history = [orjson.loads(i.partition(b"\n")[2])["t"] for i in await rig.redis.lrange(keys.history, 0, -1)]
    assert history == ["hello all", "@Inara2 are you there?", "what is 2+2?"]


async def test_bots_and_worker_results_are_never_asked(rig: Rig) -> None:
    await rig.say("I am another persona", sender_id="bots/bot-123")
    await rig.say("an answer a job posted", extra={WORKER_MARK: "llm"})
    await rig.say("   ")
    edit = rig.event("@Inara edited")
    edit.kind = EventKind.EDIT
    await rig.trigger.consider(edit, rig.enqueue)
    assert rig.enqueued == []
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(BOT, ROOM))
    assert await rig.redis.llen(keys.queue) == 0
    # the other bot's message is context all the same; the job's own answer is recorded by the job
    assert len(await rig.redis.lrange(keys.history, 0, -1)) == 1


async def test_the_history_is_capped(rig: Rig) -> None:
    for i in range(llm_queue.HISTORY_SLACK + 10):
        await rig.say(f"@Inara2 message {i}")
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(BOT, ROOM))
    assert await rig.redis.llen(keys.history) == 4 + llm_queue.HISTORY_SLACK
    assert 0 < await rig.redis.ttl(keys.history) <= llm_queue.HISTORY_TTL


async def test_a_full_queue_answers_busy_at_once(rig: Rig) -> None:
    for i in range(llm_queue.MAX_PENDING):
        await rig.say(f"question {i}")
    over = await rig.say("one question too many")
    function, args, kwargs = rig.enqueued[-1]
    assert function == "persona_busy" and kwargs == {"_job_id": f"llm:{over.id}"}
    assert await llm.persona_busy({DEPS: rig.deps}, *args) == "busy"
    [reply] = await rig.replies()
    assert "questions waiting" in reply.text and reply.event.reply_to == over.native_id
    assert reply.event.id == result_id(f"llm:{over.id}")
    # handled again, the refused question stays refused (it was answered: busy)
    before = len(rig.enqueued)
    await rig.trigger.consider(over, rig.enqueue)
    assert len(rig.enqueued) == before


# ---------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------
async def test_a_question_gets_the_models_answer_threaded(rig: Rig) -> None:
    await rig.say("the sky is green today", sender="bob")
    asked = await rig.say("what colour is the sky?")
    assert await rig.job() == "answered 2"  # Bob's message is a question too: the bot answers everything
    replies = await rig.replies()
    assert [r.text for r in replies] == [
        "answer 1: Bob: the sky is green today",
        "answer 2: Alice: what colour is the sky?",
    ]
    reply = replies[1]
    assert reply.account == BOT and reply.channel == ROOM
    assert reply.event.reply_to == asked.native_id  # threaded on the question
    assert reply.event.id == result_id(f"llm:{asked.id}") and reply.event.extra == {WORKER_MARK: "llm"}
    # the model saw the room before the question, its own earlier answer as its own
    assert rig.fake.seen[1].body["messages"] == [
        {"role": "system", "content": "You are Inara."},
        {"role": "user", "content": "Bob: the sky is green today"},
        {"role": "assistant", "content": "answer 1: Bob: the sky is green today"},
        {"role": "user", "content": "Alice: what colour is the sky?"},
    ]
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(BOT, ROOM))
    assert await rig.redis.llen(keys.queue) == 0 and await rig.redis.hlen(keys.requests) == 0
    assert not await rig.redis.exists(keys.lock)
    # answered: the same event routed again queues nothing
    rig.enqueued.clear()
    await rig.trigger.consider(asked, rig.enqueue)
    assert rig.enqueued == [] and await rig.redis.llen(keys.queue) == 0


async def test_a_mention_is_answered_under_the_personas_name(rig: Rig) -> None:
    asked = await rig.say("@Inara hi", account=API, channel="api")
    assert await rig.job(llm_queue.room_id(API, "api")) == "answered 1"
    [reply] = await rig.replies(API)
    assert reply.text == "Inara: answer 1: Alice: hi" and reply.event.reply_to == asked.native_id


async def test_many_jobs_answer_a_room_in_order_one_at_a_time(rig: Rig) -> None:
    rig.fake.hold = True
    asked = [await rig.say(f"question {i}") for i in range(4)]
    room = llm_queue.room_id(BOT, ROOM)
    # one job per question, all at once: four workers taking the room's jobs
    jobs = [asyncio.create_task(rig.job(room)) for _ in asked]
    for n in range(1, len(asked) + 1):
        await until(lambda: rig.fake.held() == 1, what=f"request {n} at the model")
        # while the model thinks, no other request for the room is made (a window: the other jobs'
        # requests would keep no order with anything a sentinel could follow)
        assert await until_quiet(lambda: len(rig.fake.seen), quiet=0.5) == n
        rig.fake.release(1)
    results = await asyncio.gather(*jobs)
    assert sorted(results) == ["another job answers this room"] * 3 + ["answered 4"]
    assert rig.fake.max_in_flight == 1
    replies = await rig.replies()
    assert [r.text for r in replies] == [f"answer {i + 1}: Alice: question {i}" for i in range(4)]
    assert [r.event.reply_to for r in replies] == [e.native_id for e in asked]


async def test_a_question_asked_while_the_holder_works_is_answered_by_it(rig: Rig) -> None:
    rig.fake.hold = True
    room = llm_queue.room_id(BOT, ROOM)
    await rig.say("first")
    holder = asyncio.create_task(rig.job(room))
    await until(lambda: rig.fake.held() == 1, what="the first request at the model")
    second = await rig.say("second")
    # the second question's own job finds the room taken and ends at once
    assert await rig.job(room) == "another job answers this room"
    rig.fake.hold = False
    rig.fake.release()
    assert await holder == "answered 2"
    replies = await rig.replies()
    assert [r.text for r in replies] == ["answer 1: Alice: first", "answer 2: Alice: second"]
    assert replies[1].event.reply_to == second.native_id


async def test_the_lock_is_let_go_only_with_an_empty_queue(rig: Rig) -> None:
    """The holder's last step: a question queued after its last look at the
    queue keeps the lock held (the holder goes on), so it is never stranded."""
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(BOT, ROOM))
    release = rig.redis.register_script(llm_job._RELEASE_IF_EMPTY)
    await rig.redis.set(keys.lock, "mine")
    await rig.say("arrived late")
    assert await release(keys=[keys.lock, keys.queue], args=["mine"]) == 0
    assert await rig.redis.get(keys.lock) == b"mine"
    assert await release(keys=[keys.lock, keys.queue], args=["not mine"]) == -1
    await rig.redis.delete(keys.queue)
    assert await release(keys=[keys.lock, keys.queue], args=["mine"]) == 1
    assert not await rig.redis.exists(keys.lock)


async def test_a_rerun_after_a_crash_posts_the_same_answer_once(rig: Rig) -> None:
    """A worker killed after posting but before finishing: the job runs again,
    posts the stored answer under the same key (the delivery loop drops the
    copy) and does not ask the model twice."""
    asked = await rig.say("question")
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(BOT, ROOM))
    stored = orjson.dumps({"text": "the answer", "ok": True})
    await rig.redis.set(keys.answer(asked.id), stored)  # the state the killed run left behind
    assert await rig.job() == "answered 1"
    assert await rig.job() == "answered 0"
    assert rig.fake.seen == []
    [reply] = await rig.replies()
    assert reply.text == "the answer" and reply.event.id == result_id(f"llm:{asked.id}")
    assert not await rig.redis.exists(keys.answer(asked.id))


async def test_a_failing_model_gives_a_short_message_and_one_alert(rig: Rig) -> None:
    rig.fake.answer, rig.fake.status = "scripted", 500
    rig.fake.body = b'{"error": {"message": "CUDA error: out of memory\\n  at ggml.c:123"}}'
    first = await rig.say("question 1")
    await rig.say("question 2")
    assert await rig.job() == "answered 2"
    replies = await rig.replies()
    text = "Sorry, Inara cannot answer right now (the model service failed). The admin has been told."
    assert [r.text for r in replies] == [text, text]
    assert replies[0].event.reply_to == first.native_id
    assert [(k, s) for k, _, s in rig.alerts] == [("llm:inara", "error")] * 2  # the alert's owner deduplicates
    assert "HTTP 500: CUDA error: out of memory at ggml.c:123" in rig.alerts[0][1]
    assert "127.0.0.1" in rig.alerts[0][1] and rig.cleared == []
    # the endpoint answers again: the alert is cleared, once
    rig.fake.answer = "echo"
    await rig.say("question 3")
    await rig.say("question 4")
    assert await rig.job() == "answered 2"
    assert [k for k, _ in rig.cleared] == ["llm:inara"]
    assert [r.text for r in await rig.replies()][2:] == ["answer 3: Alice: question 3", "answer 4: Alice: question 4"]
    # failed answers are not context: only the two answers are the persona's in the history
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(BOT, ROOM))
    roles = [orjson.loads(i.partition(b"\n")[2])["r"] for i in await rig.redis.lrange(keys.history, 0, -1)]
    assert roles.count("assistant") == 2


async def test_a_model_that_does_not_answer_in_time_gets_a_timeout_message(
    redis: Redis, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    async with httpx.AsyncClient() as http:
        rig = await make_rig(redis, fake_llm, tmp_path, http, timeout=0.5)
        fake_llm.hold = True
        asked = await rig.say("a hard question")
        assert await rig.job() == "answered 1"
    [reply] = await rig.replies()
    assert reply.text == "Sorry, Inara took too long to answer (more than 0.5 s). Please try again."
    assert reply.event.reply_to == asked.native_id
    assert rig.alerts == []  # a slow answer is the model's pace, not a fault


async def test_an_unreachable_endpoint_alerts(redis: Redis, fake_llm: FakeLLM, tmp_path: Path) -> None:
    async with httpx.AsyncClient() as http:
        rig = await make_rig(redis, fake_llm, tmp_path, http)
        closed = f"http://127.0.0.1:{free_port()}/v1"
        config = write_config(tmp_path / "worker.toml", config_text(closed))
        await rig.say("hello?")
        assert await rig.job(deps=rig.worker_deps(config, http)) == "answered 1"
    [reply] = await rig.replies()
    assert reply.text.endswith("The admin has been told.")
    [(key, text, _)] = rig.alerts
    assert key == "llm:inara" and "ConnectError" in text


async def test_a_persona_the_worker_does_not_know_is_said_so(rig: Rig) -> None:
    asked = await rig.say("hello")
    other = write_config(rig.tmp / "worker.toml", config_text(rig.fake.endpoint, personas=False))
    assert await rig.job(deps=rig.worker_deps(other, rig.deps.http)) == "answered 1"
    [reply] = await rig.replies()
    assert reply.text == "Sorry, the persona inara is not configured on the workers."
    assert reply.event.reply_to == asked.native_id
    assert [k for k, _, _ in rig.alerts] == ["llm:inara"]


async def test_a_job_near_its_timeout_hands_the_room_on(redis: Redis, fake_llm: FakeLLM, tmp_path: Path) -> None:
    async with httpx.AsyncClient() as http:
        # JobTimeout 4 s: each call may take 1 s (4 - JOB_MARGIN) and the lock 3 s more, so a
        # job answers one question and leaves the rest to a fresh job
        rig = await make_rig(redis, fake_llm, tmp_path, http, job_timeout=4)
        await rig.say("one")
        second = await rig.say("two")
        room = llm_queue.room_id(BOT, ROOM)
        assert await rig.job(room) == "answered 1, handed the rest on"
        keys = llm_queue.RoomKeys(PREFIX, room)
        assert not await redis.exists(keys.lock)
        next_job = f"llm:{room}:next:{second.id}"
        assert await redis.zscore(queue_name(PREFIX), next_job) is not None  # in arq's queue
        assert await rig.job(room) == "answered 1"
    assert [r.text for r in await rig.replies()] == ["answer 1: Alice: one", "answer 2: Alice: two"]


async def test_an_unreadable_request_is_dropped_and_the_queue_goes_on(rig: Rig) -> None:
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(BOT, ROOM))
    await rig.redis.rpush(keys.queue, "broken")
    await rig.redis.hset(keys.requests, "broken", b"{not json")
    await rig.say("fine")
    assert await rig.job() == "answered 1"
    assert [r.text for r in await rig.replies()] == ["answer 1: Alice: fine"]
    assert await rig.redis.llen(keys.queue) == 0 and await rig.redis.hlen(keys.requests) == 0


async def test_a_questions_inline_files_are_not_kept(rig: Rig) -> None:
    photo = Attachment("photo.jpg", "image/jpeg", 3_000_000, data_b64="A" * 4_000_000)
    asked = await rig.say("what is in this photo?", attachments=[photo])
    keys = llm_queue.RoomKeys(PREFIX, llm_queue.room_id(BOT, ROOM))
    raw = await rig.redis.hget(keys.requests, asked.id)
    assert len(raw) < 2000
    stored = event_from_wire(orjson.loads(raw)["event"])
    assert stored.attachments == [] and stored.native_id == asked.native_id and stored.id == asked.id
