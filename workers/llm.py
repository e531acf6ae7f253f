"""LLM persona replies (issue 11, seed 000): ``[persona.NAME]``.

A persona is an OpenAI-compatible chat model (OpenAI, Ollama, vLLM,
llama.cpp's server: ``POST {Endpoint}/chat/completions``) with a system
prompt. It answers in a room

- every message, where the room's account *is* the persona's bot (a Talk bot
  with ``Persona = "NAME"``: seed 000's per-user bots), or
- a message that starts with ``@Name`` (a gateway's or channel's
  ``Persona`` option); the ``@Name`` is stripped before the call.

It never answers a worker's result (``results.is_worker_result``, checked by
``Triggers``) or another Talk bot (``bots/…``: another persona), so two
personas in one room cannot talk to each other forever.

Flow. The trigger (daemon side, in the route loop) records every message of
a persona room in the room's history (a capped Redis list) and, for a
question, appends a *request* to the room's queue — one Lua script, so the
same event routed twice after a crash is recorded and queued once — then
enqueues ``persona_reply(room)`` with the job id ``llm:<event id>``.

One reply at a time per room, in order, on any number of workers: a job
takes the room's lock (``SET NX PX``, renewed before each request) and
answers the queue head-first. A request leaves the queue only after its
reply is on the bus, and the reply's key is ``llm:<event id>``
(``results.post_reply``), so a job run again after its worker died posts it
once; the model's answer is stored before it is posted, so the re-run does
not ask the model again. A job that finds the lock taken ends: the holder
answers its request. The holder lets go only through a script that deletes
the lock *if the queue is empty*, atomically, so a request queued while the
holder is finishing is either seen by the holder or finds the lock free —
none is stranded. A holder killed mid-job leaves its lock to expire (a
persona's Timeout plus a few seconds, always shorter than arq's in-progress
mark of JobTimeout + 10 s) and arq runs its job again. A holder near arq's
JobTimeout hands the rest of the queue to a fresh job.

Failures give the room one short message, threaded on the question, never a
stack trace: a timeout (``Timeout``, seed 000's 55 s) says so; an endpoint
that is down, answers 5xx, refuses the key or answers something that is not
a chat completion also raises an admin alert (``deps.alert``), cleared when
the persona answers again. No call is retried: one question, one call. See
docs/persona.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from arq.connections import ArqRedis
from arq.worker import Retry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.config import Config
from bridge.events import Event, EventKind, WireError, event_from_wire, event_to_wire
from workers.deps import DEPS, WorkerDeps
from workers.results import is_worker_result, post_reply
from workers.triggers import Enqueue, queue_name

FEATURE = "llm"
JOB = "persona_reply"
BUSY_JOB = "persona_busy"
MAX_PENDING = 20  # questions waiting in one room; more get a "busy" reply at once
HISTORY_SLACK = 100  # messages kept beyond History: the room talks on while questions wait
HISTORY_TTL = 7 * 86400  # an idle room's history goes after a week
DONE_TTL = 86400  # a question answered is not queued again when its event is routed again
MAX_STORED_CHARS = 4000  # one message's text, in the history
MAX_PROMPT_CHARS = 8000  # the question sent to the model
MAX_RESPONSE_BYTES = 1_000_000  # a chat completion is a few KiB; more is not one
LOCK_MARGIN = 3.0  # seconds of lock beyond the model call: fetch history, post, finish
JOB_MARGIN = 3.0  # seconds a job keeps free of arq's JobTimeout
MIN_CALL_TIMEOUT = 0.5
RETRY_DEFER = 2.0  # seconds before a job that met a Redis error runs again
MEMO_LIMIT = 4096  # (account, channel) -> persona lookups kept by a trigger
NO_ALERT_STATUSES = frozenset({400, 413, 422})  # this question's fault (too long…), not the service's


@dataclass(frozen=True, slots=True)
class Persona:
    key: str  # the NAME of [persona.NAME]
    name: str  # how it is called: @name
    endpoint: str
    model: str
    api_key: str
    system_prompt: str
    max_tokens: int
    temperature: float
    history: int
    timeout: float

    @classmethod
    def from_config(cls, key: str, values: dict[str, Any]) -> Persona:
        return cls(
            key=key,
            name=str(values.get("Name") or key),
            endpoint=str(values["Endpoint"]),
            model=str(values["Model"]),
            api_key=str(values.get("APIKey") or ""),
            system_prompt=str(values.get("SystemPrompt") or ""),
            max_tokens=int(values.get("MaxTokens", 256)),
            temperature=float(values.get("Temperature", 0.7)),
            history=int(values.get("History", 10)),
            timeout=float(values.get("Timeout", 55)),
        )

    @property
    def url(self) -> str:
        """``Endpoint`` + ``/chat/completions`` (a query string, some proxies' key, stays after it)."""
        parts = urlsplit(self.endpoint)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))

    @property
    def shown_endpoint(self) -> str:
        """The endpoint for logs and alerts: no credentials, no query."""
        parts = urlsplit(self.endpoint)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))

    def system(self) -> str:
        return self.system_prompt or f"You are {self.name}, a helpful assistant in a group chat. Answer briefly."


# ---------------------------------------------------------------------------------------
# Parsing: the trigger's mention, the model's answer
# ---------------------------------------------------------------------------------------
def strip_mention(text: str, name: str) -> str | None:
    """The question after a leading ``@Name`` (any case; a ``:`` or ``,``
    after it is dropped too), or None when the text does not start with one.
    ``@Name`` must end there: ``@Inara2`` or ``@Inara.bot`` is someone else."""
    match = re.match(r"\s*@" + re.escape(name) + r"(?![\w-]|\.[\w-])[\s:,]*", text, flags=re.IGNORECASE | re.UNICODE)
    if match is None:
        return None
    return text[match.end() :].strip()


def question_of(text: str, name: str, every_message: bool) -> str | None:
    """What the persona is asked, or None when the message does not call it."""
    rest = strip_mention(text, name)
    if rest is None:
        rest = text.strip() if every_message else None
    return rest or None


class LLMError(Exception):
    """A chat completion that did not give an answer.

    ``kind``: ``timeout``, ``unreachable`` (connection refused, reset, DNS),
    ``status`` (an HTTP error status), ``malformed`` (not a chat completion),
    ``empty`` (a completion without text)."""

    def __init__(self, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status

    @property
    def alerts(self) -> bool:
        """Whether the admin should hear of it: the service or its config, not this question."""
        if self.kind == "status":
            return self.status not in NO_ALERT_STATUSES
        return self.kind in ("unreachable", "malformed")


_THINK = re.compile(r"\A\s*<think>.*?</think>", flags=re.DOTALL)


def parse_completion(body: bytes) -> str:
    """The assistant's text from an OpenAI chat completion; LLMError otherwise.

    ``content`` may be a string or a list of parts (``{"type": "text",
    "text": …}``); a reasoning model's leading ``<think>…</think>`` is
    dropped."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise LLMError("malformed", f"the answer is not JSON: {_snippet(body)!r}") from None
    if not isinstance(data, dict):
        raise LLMError("malformed", f"the answer is not a JSON object: {_snippet(body)!r}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        error = _error_message(data)
        what = f"an error: {error}" if error else f"no choices: {_snippet(body)!r}"
        raise LLMError("malformed", f"the answer has {what}")
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise LLMError("malformed", "choices[0].message is missing")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if not all(isinstance(p, str) for p in parts):
            raise LLMError("malformed", "choices[0].message.content has a text part without text")
        content = "".join(parts)  # type: ignore[arg-type]
    elif content is None:
        refusal = message.get("refusal")
        content = refusal if isinstance(refusal, str) else ""
    if not isinstance(content, str):
        raise LLMError("malformed", f"choices[0].message.content is {type(content).__name__}, not text")
    text = _THINK.sub("", content).strip()
    if not text:
        reason = first.get("finish_reason")
        raise LLMError("empty", f"the model answered no text (finish_reason {reason!r})")
    return text


def _error_message(data: dict[str, Any]) -> str:
    """OpenAI's ``{"error": {"message": …}}``, or ``{"error": "…"}`` / ``{"detail": …}`` (vLLM, FastAPI)."""
    error = data.get("error", data.get("detail"))
    if isinstance(error, dict):
        error = error.get("message", error)
    if error is None:
        return ""
    return _oneline(error if isinstance(error, str) else json.dumps(error, ensure_ascii=False))


def _oneline(text: str, limit: int = 200) -> str:
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _snippet(body: bytes, limit: int = 80) -> str:
    return _oneline(body[: limit * 4].decode("utf-8", "replace"), limit)


def _status_detail(status: int, body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    error = _error_message(data) if isinstance(data, dict) else ""
    return f"HTTP {status}: {error or _snippet(body) or '(no body)'}"


# ---------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------
async def complete(
    http: httpx.AsyncClient, persona: Persona, messages: Sequence[dict[str, str]], seconds: float
) -> str:
    """One chat completion, within ``seconds`` in all (connect, the
    model's thinking, the answer's bytes); LLMError for anything but an answer."""
    body = {
        "model": persona.model,
        "messages": list(messages),
        "max_tokens": persona.max_tokens,
        "temperature": persona.temperature,
        "stream": False,
    }
    headers = {"Accept": "application/json"}
    if persona.api_key:
        headers["Authorization"] = f"Bearer {persona.api_key}"
    try:
        async with asyncio.timeout(seconds):
            async with http.stream(
                "POST", persona.url, json=body, headers=headers, timeout=httpx.Timeout(seconds)
            ) as resp:
                status = resp.status_code
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise LLMError("malformed", f"the answer is larger than {MAX_RESPONSE_BYTES} bytes", status)
    except (TimeoutError, httpx.TimeoutException):
        raise LLMError("timeout", f"no answer within {seconds:g} s") from None
    except httpx.HTTPError as exc:
        raise LLMError("unreachable", f"{type(exc).__name__}: {_oneline(str(exc)) or 'no detail'}") from None
    if not 200 <= status < 300:
        raise LLMError("status", _status_detail(status, bytes(data)), status)
    return parse_completion(bytes(data))


# ---------------------------------------------------------------------------------------
# Redis layout
# ---------------------------------------------------------------------------------------
def room_id(account: str, channel: str) -> str:
    return hashlib.sha256(f"{account}\x1f{channel}".encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class RoomKeys:
    """A room's keys, hash-tagged by room so one script may touch them all."""

    prefix: str
    room: str

    def _key(self, part: str) -> str:
        return f"{self.prefix}:llm:{{{self.room}}}:{part}"

    @property
    def queue(self) -> str:  # list of request ids (event ids), oldest first
        return self._key("q")

    @property
    def requests(self) -> str:  # hash: request id -> the request (JSON)
        return self._key("req")

    @property
    def history(self) -> str:  # list of "id\\n" + JSON {r, n, t}, oldest first
        return self._key("hist")

    @property
    def lock(self) -> str:
        return self._key("lock")

    def done(self, request: str) -> str:
        return self._key(f"done:{request}")

    def answer(self, request: str) -> str:  # the model's answer, kept until it is posted
        return self._key(f"ans:{request}")


def alerted_key(prefix: str, persona: str) -> str:
    return f"{prefix}:llm:alerted:{persona}"


def history_item(item_id: str, role: str, name: str, text: str) -> bytes:
    body = orjson.dumps({"r": role, "n": name, "t": text[:MAX_STORED_CHARS]})
    return item_id.encode() + b"\n" + body


def history_cap(persona: Persona) -> int:
    return persona.history + HISTORY_SLACK


# KEYS: history, queue, requests, done. ARGV: id, history item ("" = none), cap,
# history ttl, request ("" = not a question), max pending, done ttl.
# Returns 0: nothing to run; 1: queued now; 2: queued before (enqueue the job
# again: the crash may have come before it); -1: the queue is full.
_RECORD = """
local id = ARGV[1]
if ARGV[2] ~= '' then
  local prefix = id .. '\\n'
  local seen = false
  for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    if string.sub(item, 1, #prefix) == prefix then seen = true break end
  end
  if not seen then
    redis.call('RPUSH', KEYS[1], ARGV[2])
    redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
if ARGV[5] == '' or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HEXISTS', KEYS[3], id) == 1 then return 2 end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[6]) then
  redis.call('SET', KEYS[4], 'busy', 'EX', ARGV[7])
  return -1
end
redis.call('HSET', KEYS[3], id, ARGV[5])
redis.call('RPUSH', KEYS[2], id)
return 1
"""

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


# ---------------------------------------------------------------------------------------
# Trigger (daemon side)
# ---------------------------------------------------------------------------------------
class PersonaTrigger:
    """Records persona rooms' messages and queues their questions."""

    def __init__(self, config: Config, redis: Redis, prefix: str) -> None:
        self.config = config
        self.prefix = prefix
        self.personas = {key: Persona.from_config(key, values) for key, values in config.personas.items()}
        self._record = redis.register_script(_RECORD)
        # (account, channel) -> (persona, every message) | None; the config is fixed for the process
        self._memo: dict[tuple[str, str], tuple[Persona, bool] | None] = {}

    def persona_of(self, account: str, channel: str) -> tuple[Persona, bool] | None:
        where = (account, channel)
        try:
            return self._memo[where]
        except KeyError:
            pass
        found = self.config.persona_of(account, channel)
        value = None
        if found is not None and found[0] in self.personas:
            value = (self.personas[found[0]], found[1])
        if len(self._memo) >= MEMO_LIMIT:  # a "*" channel meets rooms without end
            self._memo.clear()
        self._memo[where] = value
        return value

    async def consider(self, event: Event, enqueue: Enqueue) -> None:
        if event.kind != EventKind.MESSAGE:
            return
        found = self.persona_of(event.account, event.channel)
        if found is None:
            return
        persona, every_message = found
        text = event.text
        if not text.strip() or is_worker_result(event):
            return
        question = None
        if not event.sender_id.startswith("bots/"):  # another bot may be another persona: no bot-to-bot loops
            question = question_of(text, persona.name, every_message)
        keys = RoomKeys(self.prefix, room_id(event.account, event.channel))
        item = b""
        if persona.history > 0:
            item = history_item(event.id, "user", event.sender_name or event.sender_id, question or text.strip())
        request = b""
        # what a reply needs of the question (its room, ids, sender): not its files, which may be inline
        source = event_to_wire(dataclasses.replace(event, attachments=[])).decode()
        if question is not None:
            request = orjson.dumps(
                {
                    "persona": persona.key,
                    "every": every_message,
                    "question": question[:MAX_PROMPT_CHARS],
                    "event": source,
                }
            )
        outcome = await self._record(
            keys=[keys.history, keys.queue, keys.requests, keys.done(event.id)],
            args=[event.id, item, history_cap(persona), HISTORY_TTL, request, MAX_PENDING, DONE_TTL],
        )
        if outcome in (1, 2):
            await enqueue(JOB, keys.room, _job_id=f"llm:{event.id}")
        elif outcome == -1:
            await enqueue(BUSY_JOB, source, persona.key, _job_id=f"llm:{event.id}")


def trigger(config: Config, redis: Redis, prefix: str) -> PersonaTrigger | None:
    """The persona trigger, or None when no room has a persona."""
    if not config.personas:
        return None
    return PersonaTrigger(config, redis, prefix)


# ---------------------------------------------------------------------------------------
# Jobs (worker side)
# ---------------------------------------------------------------------------------------
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
        self.job_timeout = float(deps.config.section("workers")["JobTimeout"])
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
        arq = ArqRedis(connection_pool=self.redis.connection_pool)
        await arq.enqueue_job(
            JOB,
            self.keys.room,
            _job_id=f"llm:{self.keys.room}:next:{request_id}",
            _queue_name=queue_name(self.deps.prefix),
        )
        await self._release(keys=[self.keys.lock], args=[self.token])

    def _persona(self, key: str) -> Persona | None:
        values = self.deps.config.personas.get(key)
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
    values = deps.config.personas.get(persona_key)
    name = Persona.from_config(persona_key, values).name if values is not None else persona_key
    text = f"Sorry, {name} has {MAX_PENDING} questions waiting in this room. Please ask again in a few minutes."
    try:
        await post_reply(deps, event, f"llm:{event.id}", text, feature=FEATURE)
    except (RedisError, OSError) as exc:
        raise Retry(defer=RETRY_DEFER) from exc
    return "busy"


FUNCTIONS: list[Any] = [persona_reply, persona_busy]
