"""A persona room's state in Redis (workers/llm.py describes the flow): its
keys, hash-tagged by room so one script may touch them all (the queue of
questions, the questions, the room's history, the lock of the job answering
it, the answers not yet posted, the questions done) and the history's items.
The scripts that change them live with their callers: the trigger's record
(llm_trigger.py), the job's lock and finish (llm_job.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

from bridge.keys import llm_alerted_key, llm_room_key
from workers.llm_client import Persona

MAX_PENDING = 20  # questions waiting in one room; more get a "busy" reply at once
HISTORY_SLACK = 100  # messages kept beyond History: the room talks on while questions wait
HISTORY_TTL = 7 * 86400  # an idle room's history goes after a week
DONE_TTL = 86400  # a question answered is not queued again when its event is routed again
MAX_STORED_CHARS = 4000  # one message's text, in the history


def room_id(account: str, channel: str) -> str:
    return hashlib.sha256(f"{account}\x1f{channel}".encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class RoomKeys:
    """A room's keys, hash-tagged by room so one script may touch them all."""

    prefix: str
    room: str

    def _key(self, part: str) -> str:
        return llm_room_key(self.prefix, self.room, part)

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
    return llm_alerted_key(prefix, persona)


def history_item(item_id: str, role: str, name: str, text: str) -> bytes:
    body = orjson.dumps({"r": role, "n": name, "t": text[:MAX_STORED_CHARS]})
    return item_id.encode() + b"\n" + body


def history_cap(persona: Persona) -> int:
    return persona.history + HISTORY_SLACK
