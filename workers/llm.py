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

The modules: ``llm_trigger`` (who is asked; the record script),
``llm_queue`` (a room's keys and history items in Redis), ``llm_job`` (the
jobs: the lock, the prompt, the reply, the failures), ``llm_client``
(``Persona``, the chat completion call and its parser). This one is what
``registry.py`` lists: ``trigger`` and ``FUNCTIONS``.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from bridge.config import Config
from workers.feature_settings import personas
from workers.llm_job import persona_busy, persona_reply
from workers.llm_trigger import PersonaTrigger


def trigger(config: Config, redis: Redis, prefix: str) -> PersonaTrigger | None:
    """The persona trigger, or None when no room has a persona."""
    if not personas(config):
        return None
    return PersonaTrigger(config, redis, prefix)


FUNCTIONS: list[Any] = [persona_reply, persona_busy]
