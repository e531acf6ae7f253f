"""The persona trigger (daemon side, in the route loop; workers/llm.py
describes the flow): whether a message calls a persona (``question_of``:
``@Name``, or every message where the room's account is the persona's bot),
and one script that records the message in the room's history and queues a
question, so an event routed twice is recorded and queued once.
"""

from __future__ import annotations

import dataclasses
import re

import orjson
from redis.asyncio import Redis

from bridge.config import Config
from bridge.events import Event, EventKind, event_to_wire
from workers.feature_settings import personas
from workers.llm_client import Persona
from workers.llm_job import BUSY_JOB, JOB
from workers.llm_queue import DONE_TTL, HISTORY_TTL, MAX_PENDING, RoomKeys, history_cap, history_item, room_id
from workers.results import is_worker_result
from workers.triggers import Enqueue

MAX_PROMPT_CHARS = 8000  # the question sent to the model
MEMO_LIMIT = 4096  # (account, channel) -> persona lookups kept by a trigger
SWITCH = "Persona"  # the key naming a room's persona (workers/feature_settings.py PERSONA_ROOM_OPTIONS)


def room_persona(config: Config, account: str, channel: str) -> tuple[str, bool] | None:
    """The persona answering in this room, and whether it answers every
    message (the account is the persona's bot: its own ``Persona`` key)
    or only those that start with ``@Name`` (a channel entry's option, else
    a gateway's)."""
    acct = config.accounts.get(account)
    if acct is None:
        return None
    own = acct.values.get(SWITCH.lower())
    if own:
        return own, True
    on_channels, on_gateways = config.room_values(SWITCH, account, channel)
    named = next((name for name in (*on_channels, *on_gateways) if name), None)
    return (named, False) if named else None


# ---------------------------------------------------------------------------------------
# Parsing: the mention
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


# ---------------------------------------------------------------------------------------
# Trigger (daemon side)
# ---------------------------------------------------------------------------------------
class PersonaTrigger:
    """Records persona rooms' messages and queues their questions."""

    def __init__(self, config: Config, redis: Redis, prefix: str) -> None:
        self.config = config
        self.prefix = prefix
        self.personas = {key: Persona.from_config(key, values) for key, values in personas(config).items()}
        self._record = redis.register_script(_RECORD)
        # (account, channel) -> (persona, every message) | None; the config is fixed for the process
        self._memo: dict[tuple[str, str], tuple[Persona, bool] | None] = {}

    def persona_of(self, account: str, channel: str) -> tuple[Persona, bool] | None:
        where = (account, channel)
        try:
            return self._memo[where]
        except KeyError:
            pass
        found = room_persona(self.config, account, channel)
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
