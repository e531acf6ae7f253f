"""A job's answer, posted into the room it answers.

The answer is one ``Delivery`` on the room's account's outbound stream: the
adapter that owns the room delivers it with the core's ordering, retries and
dead letters, like any relayed message. Its event id is derived from the
job's ``key``, so posting the same key twice (a job run again after its
worker was killed: arq runs jobs at least once) delivers once: the delivery
loop skips a copy whose delivered-marker exists (bridge/idmap.py).

Answers go to the source room only, not through its gateways: the linked
rooms see the link or the question relayed and, where a feature is enabled
there too, answer it themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from bridge.config import Config
from bridge.events import Attachment, Delivery, Event, EventKind
from workers.deps import WorkerDeps

WORKER_MARK = "worker"  # extra[WORKER_MARK]: the feature that wrote the event
# Protocols whose adapters upload files a delivery carries. The Talk bot API is
# text only (docs/talk-bot.md): its answers carry links instead.
UPLOADS = frozenset({"matrix", "nctalk", "api"})


def result_id(key: str) -> str:
    """The event id of the answer with this key: the same on every run of the job."""
    return hashlib.sha256(f"talkbridge-result\x1f{key}".encode()).hexdigest()[:32]


def can_upload(config: Config, account: str) -> bool:
    acct = config.accounts.get(account)
    return acct is not None and acct.protocol in UPLOADS


def is_worker_result(event: Event) -> bool:
    """Written by a job (never a reason to start another: no loops between features)."""
    return bool(event.extra.get(WORKER_MARK))


def answer(
    config: Config,
    source: Event,
    key: str,
    text: str,
    *,
    feature: str,
    attachments: Sequence[Attachment] = (),
    thread: bool = True,
) -> Delivery:
    """The delivery of an answer to ``source`` in its own room."""
    gateway = next(
        (
            gw.name
            for gw in config.gateways
            for e in gw.entries
            if e.account == source.account and e.channel in (source.channel, "*")
        ),
        "",
    )
    event = Event(
        kind=EventKind.MESSAGE,
        account=source.account,
        channel=source.channel,
        text=text,
        reply_to=source.native_id if thread else None,
        attachments=list(attachments),
        extra={WORKER_MARK: feature},
        id=result_id(key),
    )
    return Delivery(event, source.account, source.channel, gateway, username="", text=text)


async def post_reply(
    deps: WorkerDeps,
    source: Event,
    key: str,
    text: str,
    *,
    attachments: Sequence[Attachment] = (),
    thread: bool = True,
    feature: str = "worker",
) -> None:
    """Post ``text`` (and files) into ``source``'s room, once per ``key``;
    ``thread``: as a reply to ``source``."""
    delivery = answer(deps.config, source, key, text, feature=feature, attachments=attachments, thread=thread)
    pipe = deps.redis.pipeline(transaction=False)
    deps.bus.add_to(pipe, deps.bus.outbound(source.account), delivery.to_wire())
    await pipe.execute()
