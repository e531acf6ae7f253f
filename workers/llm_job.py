"""The persona jobs (worker side; workers/llm.py describes the flow):
``persona_reply`` holds a room's lock and answers its queue head-first (the
prompt, ``build_messages``; the call; the reply, posted once; a failure's
short message and the admin's alert), ``persona_busy`` tells a room whose
queue is full that its question is not taken.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from arq.connections import ArqRedis
from arq.worker import Retry
from redis.exceptions import RedisError

from bridge.events import Event, WireError, event_from_wire
from bridge.keys import queue_name
from workers.deps import DEPS, WorkerDeps
from workers.feature_settings import JOB_MARGIN, WorkersSection, personas
from workers.llm_client import LLMError, Persona, complete
from workers.llm_queue import (
    DONE_TTL,
    HISTORY_SLACK,
    HISTORY_TTL,
    MAX_PENDING,
    RoomKeys,
    alerted_key,
    history_cap,
    history_item,
)
from workers.results import post_reply

FEATURE = "llm"
JOB = "persona_reply"
BUSY_JOB = "persona_busy"
LOCK_MARGIN = 3.0  # seconds of lock beyond the model call: fetch history, post, finish
MIN_CALL_TIMEOUT = 0.5
RETRY_DEFER = 2.0  # seconds before a job that met a Redis error runs again

# KEYS: lock. ARGV: token, ttl ms. 1: still ours (renewed).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lock, queue. ARGV: token. 1: released (the queue was empty);
# 0: not released, there is work; -1: the lock is not ours any more.
_RELEASE_IF_EMPTY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('LLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: lock. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: queue, requests, history, done, answer. ARGV: id, history item ("" = none),
# cap, history ttl, done ttl. Idempotent: the history gets the reply once.
_FINISH = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 and ARGV[2] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[2])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[3]), -1)
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('SET', KEYS[4], 'done', 'EX', ARGV[5])
redis.call('DEL', KEYS[5])
return 1
"""


def reply_for_error(persona: Persona, error: LLMError, seconds: float) -> str:
    """The room's short message for a failed call: no detail, no stack trace."""
    name = persona.name
    if error.kind == "timeout":
        return f"Sorry, {name} took too long to answer (more than {seconds:g} s). Please try again."
    if error.kind == "empty":
        return f"Sorry, {name} had no answer to that."
    if not error.alerts:
        return f"Sorry, {name} could not answer that (the model refused the request)."
    return f"Sorry, {name} cannot answer right now (the model service failed). The admin has been told."


def _clean_answer(text: str, persona: Persona) -> str:
    """Drop a leading ``Name:`` the model wrote itself (it saw the others' messages so)."""
    match = re.match(r"\s*" + re.escape(persona.name) + r"\s*:\s*", text, flags=re.IGNORECASE)
    rest = text[match.end() :].strip() if match else ""
    return rest or text


def build_messages(
    persona: Persona, history: Sequence[bytes], request_id: str, sender: str, question: str
) -> list[dict[str, str]]:
    """The system prompt, the last ``History`` messages of the room as the
    question found it, the question.

    "As it found it": what was said before the question, and the persona's
    own replies posted since (to questions asked before this one: it answers
    in order), so it knows what it already said; not what others said after
    the question."""
    prefix = request_id.encode() + b"\n"
    index = next((i for i, item in enumerate(history) if item.startswith(prefix)), None)
    context: list[dict[str, str]] = []
    if index is not None and persona.history > 0:
        for position, raw in enumerate(history):
            if position == index:
                continue
            _, _, body = raw.partition(b"\n")
            try:
                item = orjson.loads(body)
                role, name, text = item["r"], item["n"], item["t"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # a damaged entry is only context
            if role == "assistant":
                context.append({"role": "assistant", "content": str(text)})
            elif position < index:
                context.append({"role": "user", "content": f"{name}: {text}"})
        context = context[-persona.history :]
    return [
        {"role": "system", "content": persona.system()},
        *context,
        {"role": "user", "content": f"{sender}: {question}"},
    ]


@dataclass(slots=True)
class _Request:
    id: str
    persona_key: str
    every: bool
    question: str
    event: Event


def _parse_request(request_id: str, raw: bytes) -> _Request:
    data = orjson.loads(raw)
    return _Request(
        id=request_id,
        persona_key=str(data["persona"]),
        every=bool(data["every"]),
        question=str(data["question"]),
        event=event_from_wire(data["event"]),
    )


class RoomJob:
    """One run of ``persona_reply`` for one room: hold the lock, answer the queue."""

    def __init__(self, deps: WorkerDeps, room: str, job_id: str = "") -> None:
        self.deps = deps
        self.redis = deps.redis
        self.keys = RoomKeys(deps.prefix, room)
        self.job_id = job_id
        self.token = secrets.token_hex(16)
        self.job_timeout = float(deps.config.settings(WorkersSection).job_timeout)
        self.started = time.monotonic()
        self._renew = self.redis.register_script(_RENEW)
        self._release_if_empty = self.redis.register_script(_RELEASE_IF_EMPTY)
        self._release = self.redis.register_script(_RELEASE)
        self._finish = self.redis.register_script(_FINISH)

    def call_timeout(self, persona: Persona) -> float:
        """A persona's Timeout, within arq's JobTimeout (arq cancels a job past it)."""
        return max(MIN_CALL_TIMEOUT, min(persona.timeout, self.job_timeout - JOB_MARGIN))

    def lock_ms(self, seconds: float) -> int:
        return int((seconds + LOCK_MARGIN) * 1000)

    async def run(self) -> str:
        try:
            # short at first: renewed for each request to its call's length
            if not await self.redis.set(self.keys.lock, self.token, nx=True, px=self.lock_ms(0)):
                return "another job answers this room"  # it sees our request: it releases only on an empty queue
            answered = 0
            while True:
                head = await self.redis.lindex(self.keys.queue, 0)
                if head is None:
                    released = await self._release_if_empty(keys=[self.keys.lock, self.keys.queue], args=[self.token])
                    if released != 0:
                        return f"answered {answered}"
                    continue
                request_id = head.decode()
                raw = await self.redis.hget(self.keys.requests, request_id)
                if raw is None:  # finished by a job that held an expired lock meanwhile
                    await self.redis.lrem(self.keys.queue, 0, request_id)
                    continue
                try:
                    request = _parse_request(request_id, raw)
                except (orjson.JSONDecodeError, KeyError, TypeError, WireError) as exc:
                    self.deps.log.error("persona: dropped an unreadable request %s: %s", request_id, exc)
                    await self._finish_request(request_id, b"")
                    continue
                persona = self._persona(request.persona_key)
                seconds = self.call_timeout(persona) if persona else MIN_CALL_TIMEOUT
                if answered and time.monotonic() - self.started + seconds + LOCK_MARGIN > self.job_timeout:
                    await self._hand_off(request_id)
                    return f"answered {answered}, handed the rest on"
                if not await self._renew(keys=[self.keys.lock], args=[self.token, self.lock_ms(seconds)]):
                    return f"answered {answered}, lost the lock"  # held past its expiry: the new holder goes on
                await self.answer(request, persona, seconds)
                answered += 1
        except (RedisError, OSError) as exc:
            await self._let_go()
            self.deps.log.warning("persona: Redis failed in room %s, the job runs again: %s", self.keys.room, exc)
            raise Retry(defer=RETRY_DEFER) from exc
        except BaseException:
            await self._let_go()  # cancelled (worker stopping): arq runs the job again
            raise

    async def _let_go(self) -> None:
        try:
            await asyncio.shield(self._release(keys=[self.keys.lock], args=[self.token]))
        except (RedisError, OSError):
            pass  # it expires
        except asyncio.CancelledError:
            pass

    async def _hand_off(self, request_id: str) -> None:
        """Near arq's JobTimeout: a fresh job answers the rest, after we let go."""
        arq = ArqRedis(connection_pool=self.deps.queue_redis.connection_pool)
        await arq.enqueue_job(
            JOB,
            self.keys.room,
            _job_id=f"llm:{self.keys.room}:next:{request_id}",
            _queue_name=queue_name(self.deps.prefix),
        )
        await self._release(keys=[self.keys.lock], args=[self.token])

    def _persona(self, key: str) -> Persona | None:
        values = personas(self.deps.config).get(key)
        return Persona.from_config(key, values) if values is not None else None

    async def answer(self, request: _Request, persona: Persona | None, seconds: float) -> None:
        """Ask the model (unless a killed run already did), post the reply, finish."""
        stored = await self.redis.get(self.keys.answer(request.id))
        if stored is None:
            text, ok = await self._ask(request, persona, seconds)
            stored = orjson.dumps({"text": text, "ok": ok})
            # NX: a job that held an expired lock may have answered meanwhile; both post the same text
            if not await self.redis.set(self.keys.answer(request.id), stored, nx=True, ex=DONE_TTL):
                stored = await self.redis.get(self.keys.answer(request.id)) or stored
        answer = orjson.loads(stored)
        text, ok = str(answer["text"]), bool(answer["ok"])
        shown = text if request.every or persona is None else f"{persona.name}: {text}"
        await post_reply(self.deps, request.event, f"llm:{request.id}", shown, feature=FEATURE)
        item = b""
        if ok and persona is not None and persona.history > 0:
            item = history_item(f"re:{request.id}", "assistant", persona.name, text)
        await self._finish_request(request.id, item, persona)

    async def _finish_request(self, request_id: str, item: bytes, persona: Persona | None = None) -> None:
        cap = history_cap(persona) if persona else HISTORY_SLACK
        await self._finish(
            keys=[
                self.keys.queue,
                self.keys.requests,
                self.keys.history,
                self.keys.done(request_id),
                self.keys.answer(request_id),
            ],
            args=[request_id, item, cap, HISTORY_TTL, DONE_TTL],
        )

    async def _ask(self, request: _Request, persona: Persona | None, seconds: float) -> tuple[str, bool]:
        """(the reply, whether it is the model's answer)."""
        deps = self.deps
        if persona is None:
            key = request.persona_key
            problem = f"persona {key}: a question waits for it, but this worker's config has no [persona.{key}]"
            await self._alert(key, problem)
            return f"Sorry, the persona {key} is not configured on the workers.", False
        history = await self.redis.lrange(self.keys.history, 0, -1)
        sender = request.event.sender_name or request.event.sender_id
        try:
            messages = build_messages(persona, history, request.id, sender, request.question)
            text = await complete(deps.http, persona, messages, seconds)
        except LLMError as exc:
            where = f"persona {persona.key} ({persona.shown_endpoint}, model {persona.model})"
            if exc.alerts:
                deps.log.error("%s: %s", where, exc.detail)
                await self._alert(persona.key, f"{where}: {exc.detail}")
            else:
                deps.log.warning("%s: %s (room %s)", where, exc.detail, request.event.channel)
                if exc.kind != "timeout":  # it answered (an empty text, a refused question): the service is up
                    await self._service_answers(persona)
            return reply_for_error(persona, exc, seconds), False
        except Exception as exc:  # a bug here must not strand the room's queue behind this question
            deps.log.exception("persona %s: failed on request %s", persona.key, request.id)
            await self._alert(persona.key, f"persona {persona.key}: internal error {type(exc).__name__}: {exc}")
            return f"Sorry, {persona.name} cannot answer right now (an internal error). The admin has been told.", False
        await self._service_answers(persona)
        return _clean_answer(text, persona), True

    async def _alert(self, persona_key: str, text: str) -> None:
        """The admin's alert (deduplicated by its key where it is shown), and a
        note that it is up, so the first good answer clears it."""
        await self.deps.alert(f"{FEATURE}:{persona_key}", text, "error")
        await self.redis.set(alerted_key(self.deps.prefix, persona_key), b"1")

    async def _service_answers(self, persona: Persona) -> None:
        if await self.redis.delete(alerted_key(self.deps.prefix, persona.key)):
            await self.deps.clear_alert(f"{FEATURE}:{persona.key}", f"persona {persona.key} answers again")


async def persona_reply(ctx: dict[str, Any], room: str) -> str:
    """arq job: answer the room's questions, in order, if no other job is."""
    return await RoomJob(ctx[DEPS], room, str(ctx.get("job_id", ""))).run()


async def persona_busy(ctx: dict[str, Any], event_wire: str, persona_key: str) -> str:
    """arq job: tell a room whose queue is full that its question is not taken."""
    deps: WorkerDeps = ctx[DEPS]
    event = event_from_wire(event_wire)
    values = personas(deps.config).get(persona_key)
    name = Persona.from_config(persona_key, values).name if values is not None else persona_key
    text = f"Sorry, {name} has {MAX_PENDING} questions waiting in this room. Please ask again in a few minutes."
    try:
        await post_reply(deps, event, f"llm:{event.id}", text, feature=FEATURE)
    except (RedisError, OSError) as exc:
        raise Retry(defer=RETRY_DEFER) from exc
    return "busy"
