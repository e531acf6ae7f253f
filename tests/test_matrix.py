"""The Matrix adapter in-process against the session's real Synapse: login
kept, receiving (first start, every event kind, gaps paged back, invites,
hostile events), sending (formatting, replies, edits, redactions,
reactions, files, transaction ids), encrypted rooms and revoked tokens."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bridge.adapter import AccountFailed, PermanentError
from bridge.events import Attachment, EventKind
from bridge.keys import degraded_key
from tests.helpers import metric
from tests.matrix_rig import ACCOUNT, api_event, delivery, new_room, past_sentinel, room_config, start_rig
from tests.synapse_rig import SynapseServer
from tests.talkbot_rig import until

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAMAAAACCAIAAAASFvFNAAAAEklEQVR4nGP4z8DAwMDAwMDAAAAeAQH/k/mcaQAAAABJRU5ErkJggg=="
)


async def test_login_once_device_kept_and_first_start_skips_history(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room = new_room(synapse)
    room.alice.text(room.room_id, "history before the bridge")
    config = room_config(tmp_path, room)
    rig = await start_rig(config, redis)
    try:
        await until(rig.synced, what="first sync")
        await until(lambda: room.bot_id in _members(room), what="the bot joins on the invite")
        room.alice.text(room.room_id, "after")
        await until(rig.texts, what="a message")
        assert [e.text for e in await past_sentinel(rig, room)] == ["after"]
    finally:
        await rig.close()
    # a second start restores the session: no new device, no new login
    rig = await start_rig(config, redis)
    try:
        room.alice.text(room.room_id, "second run")
        await until(lambda: _has(rig, "second run"), what="second run")
    finally:
        await rig.close()
    assert len(synapse.devices(room.bot_id)) == 1


def _members(room) -> list[str]:  # type: ignore[no-untyped-def]
    state = room.alice.call("GET", f"/_matrix/client/v3/rooms/{room.room_id}/joined_members")
    return list(state["joined"])


async def _has(rig, text: str) -> bool:  # type: ignore[no-untyped-def]
    return text in await rig.texts()


async def test_every_kind_of_event_is_received(tmp_path: Path, redis: Redis, synapse: SynapseServer) -> None:
    room = new_room(synapse)
    rig = await start_rig(room_config(tmp_path, room), redis)
    r, alice = room.room_id, room.alice
    try:
        await until(lambda: room.bot_id in _members(room), what="joined")
        plain = alice.text(r, "plain")
        alice.send(r, {"msgtype": "m.text", "body": "bold", "format": "org.matrix.custom.html",
                       "formatted_body": "<strong>bold</strong> <em>it</em>"})  # fmt: skip
        alice.send(r, {"msgtype": "m.notice", "body": "a notice"})
        alice.send(r, {"msgtype": "m.emote", "body": "waves"})
        alice.send(r, {"msgtype": "m.text", "body": "> <@x:test.local> plain\n\nthe answer",
                       "format": "org.matrix.custom.html",
                       "formatted_body": "<mx-reply><blockquote>plain</blockquote></mx-reply>the answer",
                       "m.relates_to": {"m.in_reply_to": {"event_id": plain}}})  # fmt: skip
        alice.send(r, {"msgtype": "m.text", "body": "* fixed", "m.new_content": {"msgtype": "m.text", "body": "fixed"},
                       "m.relates_to": {"rel_type": "m.replace", "event_id": plain}})  # fmt: skip
        reaction = alice.send(r, {"m.relates_to": {"rel_type": "m.annotation", "event_id": plain, "key": "👍"}},
                              etype="m.reaction")  # fmt: skip
        await until(lambda: _count(rig, 7), what="the reaction")  # seen before it is taken back
        alice.redact(r, reaction)
        alice.redact(r, plain)
        mxc = alice.upload(PNG, "image/png", "dot.png")
        alice.send(r, {"msgtype": "m.image", "body": "dot.png", "url": mxc,
                       "info": {"mimetype": "image/png", "size": len(PNG)}})  # fmt: skip
        events = await until(lambda: _count(rig, 10), within=20, what="ten events")
        kinds = [e.kind for e in events]
        assert kinds == [EventKind.MESSAGE] * 5 + [EventKind.EDIT, EventKind.REACTION, EventKind.UNREACTION,
                                                   EventKind.DELETE, EventKind.MESSAGE]  # fmt: skip
        first, bold, notice, emote, reply, edit, react, unreact, delete, image = events
        assert (first.text, first.native_id, first.sender_name, first.sender_id) == ("plain", plain, "Alice",
                                                                                     alice.user_id)  # fmt: skip
        assert bold.text == "**bold** _it_"
        assert notice.text == "a notice" and emote.extra.get("action") and emote.text == "waves"
        assert (reply.text, reply.reply_to) == ("the answer", plain)
        assert (edit.text, edit.target_id) == ("fixed", plain)
        assert (react.reaction, react.target_id) == ("👍", plain)
        assert (unreact.reaction, unreact.target_id) == ("👍", plain)
        assert delete.target_id == plain
        [att] = image.attachments
        assert (att.name, att.mime, base64.b64decode(att.data_b64 or "")) == ("dot.png", "image/png", PNG)
        assert all(e.channel == r and e.account == ACCOUNT for e in events)
        assert len(await past_sentinel(rig, room)) == 10
    finally:
        await rig.close()


async def _count(rig, n: int):  # type: ignore[no-untyped-def]
    events = await rig.events()
    return events if len(events) >= n else None


async def test_gap_paged_back_once_in_order_and_own_events_dropped(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room = new_room(synapse)
    config = room_config(tmp_path, room, SyncTimelineLimit=5)
    rig = await start_rig(config, redis)
    try:
        await until(lambda: room.bot_id in _members(room), what="joined")
        room.alice.text(room.room_id, "before")
        await until(lambda: _has(rig, "before"), what="before")
        # the bot's own message is never relayed back
        sent = await rig.adapter.send(delivery(api_event("from the bridge"), room.room_id))
        assert sent and sent.startswith("$")
    finally:
        await rig.close()
    for i in range(30):  # while away: far more than a sync's timeline holds
        room.alice.text(room.room_id, f"away {i}")
    rig = await start_rig(config, redis)
    try:
        await until(lambda: _has(rig, "away 29"), what="the gap")
        texts = [e.text for e in await past_sentinel(rig, room)]
        assert texts == ["before"] + [f"away {i}" for i in range(30)]
    finally:
        await rig.close()


async def test_invites_to_other_rooms_are_not_joined_and_aliases_resolve(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room = new_room(synapse, invite_bot=False)
    alias = f"#{room.bot_login}-alias:test.local"
    room.alice.call("PUT", f"/_matrix/client/v3/directory/room/{alias.replace('#', '%23')}", {"room_id": room.room_id})
    other = room.alice.create_room(name="other")
    rig = await start_rig(room_config(tmp_path, room, channel=alias), redis)
    try:
        await until(rig.synced, what="first sync")
        room.alice.invite(other, room.bot_id)
        room.alice.invite(room.room_id, room.bot_id)
        await until(lambda: room.bot_id in _members(room), what="the configured room joined")
        room.alice.text(other, "elsewhere")
        room.alice.text(room.room_id, "here")
        events = await until(lambda: _count(rig, 1), what="the message")
        assert [(e.text, e.channel) for e in events] == [("here", alias)]
        assert room.bot_id not in room.alice.call("GET", f"/_matrix/client/v3/rooms/{other}/joined_members")["joined"]
        assert await redis.hget(rig.adapter.aliases_key, alias) == room.room_id.encode()
    finally:
        await rig.close()


async def test_sending_every_kind(tmp_path: Path, redis: Redis, synapse: SynapseServer) -> None:
    room = new_room(synapse)
    rig = await start_rig(room_config(tmp_path, room), redis)
    r, a = room.room_id, rig.adapter
    try:
        await until(lambda: room.bot_id in _members(room), what="joined")
        source = api_event("**hello** <b>world</b>", native_id="1")
        first = await a.send(delivery(source, r))
        again = await a.send(delivery(source, r))  # a redelivery: same transaction, same event
        assert first == again
        mine = room.alice.from_user(r, room.bot_id)
        assert len(mine) == 1
        content = mine[0]["content"]
        assert content["body"] == "[api/a] <bob> **hello** <b>world</b>"
        assert content["formatted_body"] == "[api/a] &lt;bob&gt; <strong>hello</strong> &lt;b&gt;world&lt;/b&gt;"
        plain = room.alice.text(r, "question")
        reply = await a.send(delivery(api_event("answer", native_id="2"), r, reply_to=plain))
        await a.send(delivery(api_event("edited", kind=EventKind.EDIT, target_id="1"), r, target_id=first))
        await a.send(delivery(api_event(kind=EventKind.REACTION, reaction="🎉", target_id="x"), r, target_id=plain))
        await a.send(delivery(api_event(kind=EventKind.UNREACTION, reaction="🎉", target_id="x"), r, target_id=plain))
        await a.send(delivery(api_event(kind=EventKind.DELETE, target_id="2"), r, target_id=reply))
        png = Attachment("dot.png", "image/png", len(PNG), data_b64=base64.b64encode(PNG).decode())
        image = api_event("", native_id="3", attachments=[png])
        await a.send(delivery(image, r))
        events = room.alice.messages(r)
        by_id = {e["event_id"]: e for e in events}
        assert by_id[reply]["content"].get("m.relates_to") in ({}, None)  # redacted
        assert by_id[reply]["unsigned"].get("redacted_because")
        edit = [e for e in events if e["content"].get("m.relates_to", {}).get("rel_type") == "m.replace"]
        assert edit[0]["content"]["m.new_content"]["body"] == "[api/a] <bob> edited"
        assert edit[0]["content"]["m.relates_to"]["event_id"] == first
        reactions = [e for e in events if e["type"] == "m.reaction"]
        assert len(reactions) == 1 and reactions[0]["unsigned"].get("redacted_because")  # un-reacted
        [img] = [e for e in events if e["content"].get("msgtype") == "m.image"]
        info = img["content"]["info"]
        assert (info["mimetype"], info["size"], info["w"], info["h"]) == ("image/png", len(PNG), 3, 2)
        assert room.alice.download(img["content"]["url"]) == PNG
        assert img["content"]["filename"] == "dot.png"
        # nothing of it comes back in: the bridge's own events are dropped
        assert [e.text for e in await past_sentinel(rig, room)] == ["question"]
    finally:
        await rig.close()


async def test_hostile_events_change_nothing_and_are_logged(
    tmp_path: Path, redis: Redis, synapse: SynapseServer, caplog: pytest.LogCaptureFixture
) -> None:
    room = new_room(synapse)
    rig = await start_rig(room_config(tmp_path, room), redis)
    r = room.room_id
    try:
        await until(lambda: room.bot_id in _members(room), what="joined")
        caplog.set_level(logging.WARNING, logger="talkbridge")
        room.alice.send(r, {"msgtype": "m.video", "body": "v", "url": 7})
        room.alice.send(r, {"msgtype": "m.image", "body": "x", "url": "https://evil.example/x.png"})
        target = room.alice.text(r, "target")
        room.alice.send(r, {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": "k" * 100}},
                            etype="m.reaction")  # fmt: skip
        room.alice.send(r, {"msgtype": "m.text", "body": "*", "m.relates_to": {"rel_type": "m.replace",
                                                                               "event_id": target}})  # fmt: skip
        room.alice.send(r, {"msgtype": "m.text", "body": "x" * 50000, "format": "org.matrix.custom.html",
                            "formatted_body": "<b>" * 2000})  # fmt: skip
        room.alice.text(r, "still fine")
        await until(lambda: _has(rig, "still fine"), what="the good one")
        events = await past_sentinel(rig, room)
        assert [e.text for e in events][-1] == "still fine"
        assert len(events) == 3  # the target, the deep-HTML one (text); the other four are refused
        bad = [rec.getMessage() for rec in caplog.records if "not relayed" in rec.getMessage()]
        assert len(bad) == 4, bad
    finally:
        await rig.close()


async def test_with_encryption_off_an_encrypted_room_is_refused_visibly(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room = new_room(synapse, encrypted=True)
    rig = await start_rig(room_config(tmp_path, room, Encryption=False), redis)
    r = room.room_id
    try:
        await until(lambda: room.bot_id in _members(room), what="joined")
        room.alice.send(r, {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA", "sender_key": "k",
                            "device_id": "D", "session_id": "s"}, etype="m.room.encrypted")  # fmt: skip
        [event] = await until(rig.events, what="the notice")
        assert "encrypted" in event.text and event.sender_id == room.alice.user_id
        degraded = await redis.get(degraded_key("tb", ACCOUNT))
        assert degraded is not None and b"encrypted" in degraded
        with pytest.raises(PermanentError, match="encrypted"):
            await rig.adapter.send(delivery(api_event("hello", native_id="1"), r))
        assert room.alice.from_user(r, room.bot_id) == []
    finally:
        await rig.close()


async def test_a_revoked_token_logs_in_again_once_then_fails_the_account(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room = new_room(synapse)
    config = room_config(tmp_path, room, RetryMaxSeconds=1)
    rig = await start_rig(config, redis)
    try:
        await until(lambda: room.bot_id in _members(room), what="joined")
        [device] = synapse.devices(room.bot_id)
        synapse.revoke(room.bot_id, device["device_id"])
        room.alice.text(room.room_id, "after the revocation")
        await until(lambda: _has(rig, "after the revocation"), within=30, what="re-login")
        assert [d["device_id"] for d in synapse.devices(room.bot_id)] == [device["device_id"]]  # same device
    finally:
        await rig.close()
    # MxID + Token: a revoked token fails the account; no loop of requests
    bot = synapse.register(room.bot_login + "t")
    body = (tmp_path / "talkbridge.toml").read_text()
    body = body.replace(f'Login = "{room.bot_login}"', f'MxID = "{bot.user_id}"')
    body = body.replace('Password = "bot-password-9f3k"', f'Token = "{bot.access_token}"')
    config = room_config.__globals__["write_config"](tmp_path / "talkbridge.toml", body)
    synapse.revoke(bot.user_id, bot.device_id)
    rig = await start_rig(config, redis, receive=False)
    calls = 0
    real = rig.adapter._client().send

    async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return await real(*args, **kwargs)

    rig.adapter._client().send = counted  # type: ignore[method-assign]
    try:
        with pytest.raises(AccountFailed, match="M_UNKNOWN_TOKEN"):
            await rig.adapter.receive()
        with pytest.raises(AccountFailed):
            await rig.adapter.receive()
        with pytest.raises(AccountFailed):
            await rig.adapter.send(delivery(api_event("x", native_id="9"), room.room_id))
        assert calls == 1
        assert metric(rig.metrics, "talkbridge_account_failed", account=ACCOUNT) == 1
    finally:
        await rig.close()


async def test_an_alias_that_does_not_resolve_is_a_failing_room_until_it_does(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    """Reported through the context's health calls: the room's gauge, the
    degraded mark and what the alert watch reads; the next start of the
    sync loop resolves it, reports the recovery and relays from the room."""
    room = new_room(synapse)
    alias = f"#{room.bot_login}-later:test.local"
    rig = await start_rig(room_config(tmp_path, room, channel=alias), redis, receive=False)
    mark = f"tb:degraded:{{{ACCOUNT}}}"
    receiving = asyncio.create_task(rig.adapter.receive())
    try:
        await until(rig.synced, what="first sync")
        assert metric(rig.metrics, "talkbridge_room_failed", account=ACCOUNT, room=alias) == 1
        assert list(rig.adapter.ctx.health.failing_rooms()) == [alias]
        assert f"room {alias}: resolve {alias}: ".encode() in (await redis.get(mark) or b"")
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        room.alice.call(
            "PUT", f"/_matrix/client/v3/directory/room/{alias.replace('#', '%23')}", {"room_id": room.room_id}
        )
        receiving = asyncio.create_task(rig.adapter.receive())  # as the runner starts it again
        await until(lambda: room.bot_id in _members(room), what="the configured room joined")
        assert metric(rig.metrics, "talkbridge_room_failed", account=ACCOUNT, room=alias) == 0
        assert rig.adapter.ctx.health.failing_rooms() == {} and await redis.get(mark) is None
        room.alice.text(room.room_id, "resolved")
        events = await until(lambda: _count(rig, 1), what="the message")
        assert [(e.text, e.channel) for e in events] == [("resolved", alias)]
    finally:
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        await rig.close()
