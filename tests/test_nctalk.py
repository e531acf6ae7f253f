"""The Talk user-account adapter against the Talk test server, in-process:
receiving by long poll (cursor, first-seen rooms, system messages, files,
own messages), sending (replies, splits, edits, deletions, reactions, files,
fallbacks) and what it does when Talk says no."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bridge.adapter import PermanentError, RateLimited, ServerUnavailable, TransientError
from bridge.events import Attachment, Event, EventKind
from bridge.keys import degraded_key
from tests.helpers import has_sentinel, metric
from tests.nctalk_rig import PASSWORD, UserRig, delivery, gateway, load, past_sentinel, start_user_rig, user_section
from tests.talkbot_rig import until
from tests.talkserver import TalkServer
from tests.talkserver.state import Actor

ACCOUNT = "nctalk.cloud"
ROOM, OTHER = "room1234", "room5678"
TALK_VERSION = 19  # the conftest's talk speaks it


@pytest.fixture
def people(talk: TalkServer) -> tuple[Actor, Actor, Actor]:
    bridge = talk.add_user("bridge", "Bridge Bot", password=PASSWORD)
    alice = talk.add_user("alice", "Alice")
    bob = talk.add_user("bob", "Bob")
    talk.create_room("Bridged", ROOM, (alice, bridge, bob))
    talk.create_room("Other", OTHER, (alice, bridge))
    return bridge, alice, bob


def config_text(talk: TalkServer, **extra: object) -> str:
    return (
        user_section("cloud", talk.url, RoomRetryMinSeconds=0.05, RoomRetryMaxSeconds=0.2, PollTimeout=2, **extra)
        + '[api.a]\nBindAddress = "127.0.0.1:0"\nToken = "t"\n'
        + gateway("g", (ACCOUNT, ROOM), (ACCOUNT, OTHER), ("api.a", "api"))
    )


@pytest.fixture
async def rig(tmp_path: Path, talk: TalkServer, people, redis: Redis) -> AsyncIterator[UserRig]:
    r = await start_user_rig(load(tmp_path, config_text(talk)), ACCOUNT, redis)
    try:
        await until(lambda: _has_cursor(r, ROOM), what="the first cursor")
        await until(lambda: _has_cursor(r, OTHER), what="the other room's cursor")
        yield r
    finally:
        await r.close()


def room_failed(rig: UserRig, token: str = ROOM) -> float:
    return metric(rig.metrics, "talkbridge_room_failed", account=ACCOUNT, room=token)


async def _has_cursor(rig: UserRig, token: str) -> bool:
    return await rig.cursor(token) is not None


async def _both_cursors(rig: UserRig) -> bool:
    return await _has_cursor(rig, ROOM) and await _has_cursor(rig, OTHER)


def api_event(text: str = "hello", native_id: str = "api-1", **kw: object) -> Event:
    return Event(kind=EventKind.MESSAGE, account="api.a", channel="api", sender_name="bob", text=text,
                 native_id=native_id, **kw)  # type: ignore[arg-type]  # fmt: skip


# receiving ---------------------------------------------------------------------------
async def test_a_message_in_talk_is_published_with_its_sender_and_the_cursor_moves(rig, talk, people) -> None:
    _bridge, alice, _bob = people
    msg = await talk.post(ROOM, alice, "hello @bob")
    [event] = await until(rig.events, what="the event")
    assert event.kind == EventKind.MESSAGE and event.text == "hello @Bob"
    assert event.sender_id == "users/alice" and event.sender_name == "Alice"
    assert event.native_id == str(msg.id) and event.channel == ROOM
    assert await until(lambda: rig.cursor(ROOM)) == msg.id
    polls = talk.chat_requests(f"/chat/{ROOM}", "GET")
    query = polls[-1].path
    for part in ("lookIntoFuture=1", "setReadMarker=0", "limit=100", f"lastKnownMessageId={msg.id}"):
        assert part in query
    assert polls[-1].headers["OCS-APIRequest"] == "true" and polls[-1].headers["Accept"] == "application/json"


async def test_a_room_seen_first_starts_at_its_newest_message(tmp_path, talk, people, redis) -> None:
    _bridge, alice, _bob = people
    old = [await talk.post(ROOM, alice, f"old {i}") for i in range(3)]
    r = await start_user_rig(load(tmp_path, config_text(talk)), ACCOUNT, redis)
    try:
        await until(lambda: _has_cursor(r, ROOM), what="cursor")
        assert await r.cursor(ROOM) == old[-1].id
        await talk.post(ROOM, alice, "new")
        await until(r.events, what="new")
        assert [e.text for e in await past_sentinel(r, talk, alice, ROOM)] == ["new"]
    finally:
        await r.close()


async def test_backfill_relays_that_many_messages_of_a_new_room(tmp_path, talk, people, redis) -> None:
    _bridge, alice, _bob = people
    for i in range(4):
        await talk.post(ROOM, alice, f"old {i}")
    r = await start_user_rig(load(tmp_path, config_text(talk, Backfill=2)), ACCOUNT, redis)
    try:
        await until(lambda: _at_least(r, 2), what="backfill")
        assert [e.text for e in await past_sentinel(r, talk, alice, ROOM)] == ["old 2", "old 3"]
    finally:
        await r.close()


async def test_own_messages_are_never_published(rig, talk, people) -> None:
    bridge, alice, _bob = people
    await talk.post(ROOM, bridge, "said by the bridge")
    await talk.post(ROOM, alice, "said by alice")
    await until(rig.events, what="alice's")
    assert [e.text for e in await past_sentinel(rig, talk, alice, ROOM)] == ["said by alice"]


async def test_replies_edits_deletions_and_reactions_become_events(rig, talk, people) -> None:
    _bridge, alice, bob = people
    first = await talk.post(ROOM, alice, "first")
    reply = await talk.post(ROOM, bob, "answer", reply_to=first.id)
    await talk.edit(ROOM, alice, first.id, "first, edited")
    await talk.react(ROOM, bob, first.id, "👍")
    await until(lambda: _at_least(rig, 4), what="the reaction")  # seen before it is revoked
    await talk.unreact(ROOM, bob, first.id, "👍")
    await talk.delete(ROOM, bob, reply.id)
    events = await until(lambda: _at_least(rig, 6), what="six events")
    kinds = [e.kind for e in events]
    assert kinds == [EventKind.MESSAGE, EventKind.MESSAGE, EventKind.EDIT, EventKind.REACTION,
                     EventKind.UNREACTION, EventKind.DELETE]  # fmt: skip
    assert events[1].reply_to == str(first.id)
    assert events[2].target_id == str(first.id) and events[2].text == "first, edited"
    assert events[3].reaction == events[4].reaction == "👍" and events[3].sender_id == "users/bob"
    assert events[3].target_id == events[4].target_id == str(first.id)
    assert events[5].target_id == str(reply.id)


async def _at_least(rig: UserRig, n: int) -> list[Event] | None:
    """The events published, once there are ``n`` (a run's sentinels not counted)."""
    events = [e for e in await rig.events() if not has_sentinel(e.text)]
    return events if len(events) >= n else None


async def test_a_reaction_added_and_revoked_between_two_polls_is_not_relayed(rig, talk, people) -> None:
    _bridge, alice, bob = people
    first = await talk.post(ROOM, alice, "first")
    await until(rig.events, what="the message")
    rig.adapter.poll_timeout = 1
    talk.fail_room(ROOM, 503)  # hold the poller off while both happen
    await until(lambda: any(r.status == 503 for r in talk.chat_requests(f"/chat/{ROOM}")), what="a held poll")
    await talk.react(ROOM, bob, first.id, "👍")
    await talk.unreact(ROOM, bob, first.id, "👍")
    talk.heal_room(ROOM)
    await talk.post(ROOM, alice, "after")
    await until(lambda: _at_least(rig, 2), what="after")
    assert [e.kind for e in await past_sentinel(rig, talk, alice, ROOM)] == [EventKind.MESSAGE, EventKind.MESSAGE]


async def test_a_file_is_fetched_over_webdav_with_its_caption(rig, talk, people) -> None:
    _bridge, alice, _bob = people
    data = bytes(range(256)) * 40
    await talk.post_file(ROOM, alice, "photo.jpg", data, caption="look")
    [event] = await until(rig.events, what="the file")
    assert event.text == "look"
    [att] = event.attachments
    assert att.name == "photo.jpg" and base64.b64decode(att.data_b64 or "") == data and att.size == len(data)
    dav = talk.chat_requests("/remote.php/dav/files/bridge/", "GET")
    assert dav and dav[-1].path.endswith("/Talk/photo.jpg")


async def test_a_file_over_media_download_size_is_not_downloaded(tmp_path, talk, people, redis) -> None:
    _bridge, alice, _bob = people
    r = await start_user_rig(load(tmp_path, config_text(talk, MediaDownloadSize=1000)), ACCOUNT, redis)
    try:
        await until(lambda: _has_cursor(r, ROOM), what="cursor")
        await talk.post_file(ROOM, alice, "big.bin", b"x" * 5000)
        [event] = await until(r.events, what="the file")
        [att] = event.attachments
        assert att.data_b64 is None and att.url and att.size == 5000 and event.text == ""
        assert not talk.chat_requests("/remote.php/dav/", "GET")
    finally:
        await r.close()


# sending -----------------------------------------------------------------------------
async def test_a_delivery_is_posted_with_its_reference_id_and_its_id_returned(rig, talk, people) -> None:
    _bridge, alice, _bob = people
    original = await talk.post(ROOM, alice, "question")
    d = delivery(api_event("an answer"), ACCOUNT, ROOM, reply_to=str(original.id))
    native = await rig.adapter.send(d)
    [posted] = [m for m in talk.messages(ROOM) if m.actor.id == "bridge"]
    assert native == str(posted.id)
    assert posted.message == "[api/a] <bob> an answer" and posted.parent_id == original.id
    assert posted.reference_id and len(posted.reference_id) == 64
    # sending it again (a retry) finds it by its referenceId instead of posting twice
    assert await rig.adapter.send(d) == native
    assert len([m for m in talk.messages(ROOM) if m.actor.id == "bridge"]) == 1


async def test_long_text_is_split_at_max_length(rig, talk, people) -> None:
    talk.state.max_chat_length = 50
    await rig.adapter._load_capabilities()
    d = delivery(api_event("word " * 30), ACCOUNT, ROOM, username="")
    await rig.adapter.send(d)
    posted = [m.message for m in talk.messages(ROOM) if m.actor.id == "bridge"]
    assert len(posted) == 3 and all(len(p) <= 50 for p in posted)
    assert " ".join(posted).split() == ["word"] * 30


async def test_edit_delete_and_reaction_act_on_the_copy(rig, talk, people) -> None:
    source = api_event("to be changed")
    native = await rig.adapter.send(delivery(source, ACCOUNT, ROOM))
    edit = Event(kind=EventKind.EDIT, account="api.a", channel="api", text="changed", target_id="api-1")
    await rig.adapter.send(delivery(edit, ACCOUNT, ROOM, target_id=native))
    assert talk.state.messages[int(native)].message == "[api/a] <bob> changed"
    react = Event(kind=EventKind.REACTION, account="api.a", channel="api", reaction="🎉", target_id="api-1")
    await rig.adapter.send(delivery(react, ACCOUNT, ROOM, target_id=native))
    assert talk.state.messages[int(native)].reactions == {"🎉": ["users/bridge"]}
    unreact = Event(kind=EventKind.UNREACTION, account="api.a", channel="api", reaction="🎉", target_id="api-1")
    await rig.adapter.send(delivery(unreact, ACCOUNT, ROOM, target_id=native))
    assert talk.state.messages[int(native)].reactions == {}
    gone = Event(kind=EventKind.DELETE, account="api.a", channel="api", target_id="api-1")
    await rig.adapter.send(delivery(gone, ACCOUNT, ROOM, target_id=native))
    assert talk.state.messages[int(native)].message_type == "comment_deleted"
    # none of it came back as an event: all by the bridge's own account (it would before a sentinel)
    assert await past_sentinel(rig, talk, people[1], ROOM) == []


async def test_an_edit_talk_cannot_make_becomes_a_visible_reply(rig, talk, people) -> None:
    native = await rig.adapter.send(delivery(api_event("old text"), ACCOUNT, ROOM))
    talk.age(int(native), 25 * 3600)  # past Talk's 24 h edit window
    edit = Event(kind=EventKind.EDIT, account="api.a", channel="api", text="new text", target_id="api-1")
    await rig.adapter.send(delivery(edit, ACCOUNT, ROOM, target_id=native))
    assert talk.state.messages[int(native)].message == "[api/a] <bob> old text"
    note = [m for m in talk.messages(ROOM) if m.actor.id == "bridge"][-1]
    assert note.message == "[api/a] <bob> new text (edited)" and note.parent_id == int(native)


async def test_a_file_is_uploaded_and_shared_into_the_room(rig, talk, people) -> None:
    data = b"\x89PNG" + bytes(range(200))
    att = Attachment(name="cat.png", mime="image/png", size=len(data), data_b64=base64.b64encode(data).decode())
    native = await rig.adapter.send(delivery(api_event("a cat", attachments=[att]), ACCOUNT, ROOM))
    msg = talk.state.messages[int(native)]
    assert msg.share is not None and msg.actor.id == "bridge"
    assert msg.message == "[api/a] <bob> a cat"  # the caption
    assert talk.file_of(msg, "alice") == data  # a real file in alice's Talk folder, same bytes and name
    assert msg.share.mounts["alice"] == "Talk/cat.png"


async def test_a_404_room_fails_with_backoff_and_recovers_while_others_flow(rig, talk, people) -> None:
    _bridge, alice, _bob = people
    talk.fail_room(ROOM, 404)
    await until(lambda: room_failed(rig) == 1, what="room failed")
    await talk.post(OTHER, alice, "other room still flows")
    await until(rig.events, what="the other room's message")
    talk.heal_room(ROOM)
    await talk.post(ROOM, alice, "back")
    await until(lambda: _at_least(rig, 2), what="the healed room's message")
    assert room_failed(rig) == 0
    assert (await rig.texts()) == ["other room still flows", "back"]


class Pauses:
    """Records a room's backoff delays and lets each go at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


async def test_a_429_retry_after_is_honoured(rig, talk, people) -> None:
    pauses = rig.adapter.pause = Pauses()
    talk.fail_room(ROOM, 429, {"Retry-After": "7"})
    await until(lambda: len(pauses.delays) >= 3, what="three refused polls")
    talk.heal_room(ROOM)
    assert pauses.delays[:3] == [7.0, 7.0, 7.0]


async def test_a_failing_room_backs_off_exponentially_with_jitter_up_to_the_cap(rig, talk, people) -> None:
    pauses = rig.adapter.pause = Pauses()
    talk.fail_room(ROOM, 503)
    await until(lambda: len(pauses.delays) >= 6, what="six failures")
    talk.heal_room(ROOM)
    low, high = 0.05, 0.2  # RoomRetryMinSeconds, RoomRetryMaxSeconds
    for i, delay in enumerate(pauses.delays[:6]):
        step = min(low * 2**i, high)
        assert step / 2 <= delay <= step
    assert room_failed(rig) == 1
    assert b"room room1234" in (await rig.redis.get(degraded_key("tb", "nctalk.cloud")) or b"")


async def test_a_revoked_password_stops_the_account_after_one_burst_and_resumes_when_fixed(
    tmp_path, talk, people, redis
) -> None:
    _bridge, alice, _bob = people
    r = await start_user_rig(load(tmp_path, config_text(talk, RefusedRetrySeconds=0.5)), ACCOUNT, redis)
    try:
        await until(lambda: _both_cursors(r), what="both rooms polled")
        talk.revoke_password("bridge", PASSWORD)
        await talk.post(ROOM, alice, "wakes the poll")
        await talk.post(OTHER, alice, "wakes the other")
        await until(lambda: metric(r.metrics, "talkbridge_account_failed", account=ACCOUNT) == 1, what="account failed")
        burst = len([q for q in talk.user_requests if q.status == 401])
        assert 1 <= burst <= 2  # at most one per room's poll in flight
        # a send waits for the account (no request of its own) ...
        send = asyncio.create_task(r.adapter.send(delivery(api_event("while refused"), ACCOUNT, ROOM)))
        # ... while one probe per RefusedRetrySeconds asks again, and only that
        await until(lambda: len([q for q in talk.user_requests if q.status == 401]) >= burst + 2, what="two probes")
        refused = [q for q in talk.user_requests if q.status == 401]
        assert all("/cloud/capabilities" in q.path for q in refused[burst:])
        assert not send.done() and not [m for m in talk.messages(ROOM) if m.actor.id == "bridge"]
        assert b"credentials refused" in (await redis.get(degraded_key("tb", "nctalk.cloud")) or b"")
        # fixed on the server: the next probe passes, polling and sending resume
        talk.grant_password("bridge", PASSWORD)
        native = await asyncio.wait_for(send, 30)
        [posted] = [m for m in talk.messages(ROOM) if m.actor.id == "bridge"]
        assert native == str(posted.id) and posted.message == "[api/a] <bob> while refused"
        await talk.post(OTHER, alice, "after the fix")
        await until(lambda: _at_least(r, 3), what="the messages posted while refused, and after")
        said = [e.text for e in await past_sentinel(r, talk, alice, ROOM, OTHER)]
        assert sorted(said) == ["after the fix", "wakes the other", "wakes the poll"]
        assert metric(r.metrics, "talkbridge_account_failed", account=ACCOUNT) == 0
        assert await redis.get(degraded_key("tb", "nctalk.cloud")) is None
        assert r.task is not None and not r.task.done()  # receive never ended: it waited
    finally:
        await r.close()


async def test_a_password_refused_at_connect_is_probed_not_polled(tmp_path, talk, people, redis) -> None:
    talk.revoke_password("bridge", PASSWORD)
    r = await start_user_rig(load(tmp_path, config_text(talk, RefusedRetrySeconds=0.5)), ACCOUNT, redis)
    try:
        await until(lambda: len([q for q in talk.user_requests if q.status == 401]) >= 3, what="three probes")
        assert all("/cloud/capabilities" in q.path for q in talk.user_requests)  # never a room's poll
        talk.grant_password("bridge", PASSWORD)
        await until(lambda: _both_cursors(r), what="both rooms polled")
    finally:
        await r.close()


async def test_a_send_to_a_room_that_answers_404_is_retried_not_dropped(rig, talk, people) -> None:
    talk.fail_room(ROOM, 404)
    with pytest.raises(TransientError):
        await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))
    talk.fail_room(ROOM, 429, {"Retry-After": "7"})
    with pytest.raises(RateLimited) as caught:
        await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))
    assert caught.value.retry_after == 7


async def test_talk_away_is_server_unavailable_and_a_room_refusing_is_not(rig, talk, people) -> None:
    """The core waits for a server that takes no request (bridge.adapter.
    ServerUnavailable: no attempts spent, never dead-lettered for it); a room
    that answers is this room's trouble and keeps its retry budget."""
    talk.set_maintenance(True)  # occ maintenance:mode --on: 503 + X-Nextcloud-Maintenance-Mode
    with pytest.raises(ServerUnavailable, match="503"):
        await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))
    talk.set_maintenance(False)
    for status in (502, 504):  # a proxy before a Talk that is down, or slow to start
        talk.fail_room(ROOM, status)
        with pytest.raises(ServerUnavailable):
            await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))
    talk.fail_room(ROOM, 500)  # Talk failed on this request: the budget applies
    with pytest.raises(TransientError) as caught:
        await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))
    assert not isinstance(caught.value, ServerUnavailable)
    talk.heal_room(ROOM)
    assert await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))  # and then it is sent
    # Talk's server gone (stopped, restarting): connection refused
    await talk.stop()
    failures = []
    for _ in range(2):  # the first may meet a kept-alive connection the server closed: an attempt spent
        try:
            await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))
        except TransientError as exc:
            failures.append(exc)
            if isinstance(exc, ServerUnavailable):
                break
    assert isinstance(failures[-1], ServerUnavailable) and "ClientConnectorError" in str(failures[-1]), failures


async def test_a_reaction_talk_refuses_is_permanent(rig, talk, people) -> None:
    native = await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))
    bad = Event(kind=EventKind.REACTION, account="api.a", channel="api", reaction="abc", target_id="api-1")
    with pytest.raises(PermanentError):
        await rig.adapter.send(delivery(bad, ACCOUNT, ROOM, target_id=native))


# rooms Talk closes to the account (tests/talkserver/chat_api.py: ChatApi.refused) ---------
def _bridge_posts(talk: TalkServer, token: str) -> list[str]:
    return [m.message for m in talk.messages(token) if m.actor.id == "bridge"]


async def test_a_send_to_a_read_only_room_fails_with_the_reason_and_posts_once_when_unlocked(rig, talk, people) -> None:
    """Talk answers 403 (RequireReadWriteConversation): a TransientError that
    names it, so the core retries within MaxDeliveries and then dead-letters;
    the room's poll goes on (reading a read-only room is allowed)."""
    talk.set_read_only(ROOM, True)
    sent = delivery(api_event("while locked"), ACCOUNT, ROOM)
    with pytest.raises(TransientError, match=r"answered 403 .*read-only") as caught:
        await rig.adapter.send(sent)
    assert not isinstance(caught.value, (RateLimited, ServerUnavailable))  # the delivery's budget applies
    assert _bridge_posts(talk, ROOM) == []
    with pytest.raises(TransientError, match="403"):  # a retry while still locked: still refused, nothing posted
        await rig.adapter.send(sent)
    assert room_failed(rig) == 0  # the poll is not failing
    talk.set_read_only(ROOM, False)
    native = await rig.adapter.send(sent)
    assert _bridge_posts(talk, ROOM) == ["[api/a] <bob> while locked"]
    assert native == str(talk.messages(ROOM)[-1].id)


async def test_a_send_without_the_chat_permission_fails_with_the_reason(rig, talk, people) -> None:
    bridge, _alice, _bob = people
    talk.allow_chat(ROOM, bridge, False)
    sent = delivery(api_event("no permission"), ACCOUNT, ROOM)
    with pytest.raises(TransientError, match=r"answered 403 .*no chat permission"):
        await rig.adapter.send(sent)
    talk.allow_chat(ROOM, bridge, True)
    await rig.adapter.send(sent)
    assert _bridge_posts(talk, ROOM) == ["[api/a] <bob> no permission"]


async def test_a_room_behind_the_lobby_fails_with_backoff_and_relays_what_was_said_once_lifted(
    rig, talk, people
) -> None:
    """The lobby answers the account (no moderator) 412 on the poll and on a
    send: the room is shown failing with the reason, polled with backoff (a
    pause after every refused poll, no busy loop), and what the moderators
    said meanwhile arrives once when the lobby is lifted."""
    _bridge, alice, _bob = people
    pauses = rig.adapter.pause = Pauses()
    talk.set_lobby(ROOM, True)
    await talk.post(ROOM, alice, "wakes the held poll")  # the poll in flight answers; the next meets the lobby
    await until(lambda: room_failed(rig) == 1, what="room failed")
    assert b"lobby" in (await rig.redis.get(degraded_key("tb", "nctalk.cloud")) or b"")
    await talk.post(ROOM, alice, "said behind the lobby")  # alice owns the room: a moderator
    sent = delivery(api_event("to the lobby"), ACCOUNT, ROOM)
    with pytest.raises(TransientError, match=r"answered 412 .*lobby"):
        await rig.adapter.send(sent)
    await until(lambda: len(pauses.delays) >= 3, what="three refused polls")
    refused = [q for q in talk.user_requests if q.status == 412 and q.method == "GET"]
    assert len(refused) <= len(pauses.delays) + 1  # each refused poll waited its backoff before the next
    talk.set_lobby(ROOM, False)
    await until(lambda: room_failed(rig) == 0, what="room recovered")
    await rig.adapter.send(sent)
    await until(lambda: _at_least(rig, 2), what="the messages said behind the lobby")
    assert [e.text for e in await past_sentinel(rig, talk, alice, ROOM)] == [
        "wakes the held poll",
        "said behind the lobby",
    ]
    assert _bridge_posts(talk, ROOM) == ["[api/a] <bob> to the lobby"]
    assert await rig.redis.get(degraded_key("tb", "nctalk.cloud")) is None


async def test_a_ban_fails_the_room_while_others_flow_and_it_recovers_when_lifted(rig, talk, people) -> None:
    bridge, alice, _bob = people
    talk.ban(ROOM, bridge)
    await talk.post(ROOM, alice, "wakes the held poll")
    await until(lambda: room_failed(rig) == 1, what="room failed")
    assert b"banned" in (await rig.redis.get(degraded_key("tb", "nctalk.cloud")) or b"")
    await talk.post(OTHER, alice, "the other room flows")
    await until(lambda: _at_least(rig, 2), what="the other room's message")
    with pytest.raises(TransientError, match=r"answered 403 .*banned"):
        await rig.adapter.send(delivery(api_event("while banned"), ACCOUNT, ROOM))
    talk.ban(ROOM, bridge, banned=False)
    await talk.post(ROOM, alice, "after the ban")
    await until(lambda: _at_least(rig, 3), what="the message after the ban")
    said = [e.text for e in await past_sentinel(rig, talk, alice, ROOM, OTHER)]
    assert said == ["wakes the held poll", "the other room flows", "after the ban"]
    assert room_failed(rig) == 0
    assert _bridge_posts(talk, ROOM) == []


# channel * ---------------------------------------------------------------------------
async def _members(rig: UserRig) -> set[str]:
    return await rig.adapter.ctx.rooms.members()


async def test_channel_star_follows_the_group_and_public_rooms_the_user_is_in(tmp_path, talk, people, redis) -> None:
    bridge, alice, _bob = people
    talk.create_room("Alice and the bridge", "dm000001", (alice, bridge), type=1)  # one-to-one: private
    talk.create_room("Talk updates", "changes1", (bridge,), type=4)  # the changelog
    text = (
        user_section("cloud", talk.url, RoomRetryMinSeconds=0.05, PollTimeout=2, RoomsRefreshSeconds=0.2)
        + '[api.a]\nBindAddress = "127.0.0.1:0"\nToken = "t"\n'
        + gateway("g", (ACCOUNT, "*"), ("api.a", "api"))
    )
    r = await start_user_rig(load(tmp_path, text), ACCOUNT, redis)
    try:
        await until(lambda: _both_cursors(r), what="both group rooms polled")
        assert await _members(r) == {ROOM, OTHER}  # where a "*" destination delivers
        await talk.post("dm000001", alice, "private")
        await talk.post(ROOM, alice, "in one")
        await talk.post(OTHER, alice, "in the other")
        await until(lambda: _at_least(r, 2), what="both rooms' messages")
        assert sorted((e.channel, e.text) for e in await past_sentinel(r, talk, alice, ROOM, OTHER)) == [
            (ROOM, "in one"), (OTHER, "in the other")]  # fmt: skip
        assert not talk.chat_requests("/chat/dm000001") and not talk.chat_requests("/chat/changes1")
        assert all("noStatusUpdate=1" in q.path for q in talk.chat_requests("/api/v4/room", "GET"))

        # added to a room: polled from its newest message on, and a destination of "*"
        talk.create_room("New", "room9999", (alice, bridge))
        await talk.post("room9999", alice, "before the bridge saw it")
        await until(lambda: r.cursor("room9999"), what="the new room polled")
        await talk.post("room9999", alice, "in the new room")
        events = await until(lambda: _at_least(r, 3), what="the new room's message")
        assert events[-1].text == "in the new room" and "room9999" in await _members(r)

        # removed from one: no longer polled, nor delivered to, its cursor forgotten
        talk.leave_room(OTHER, bridge)
        await until(lambda: OTHER not in r.adapter._followed, what="the room dropped")
        assert await _members(r) == {ROOM, "room9999"} and await r.cursor(OTHER) is None
        await talk.post(ROOM, alice, "still flowing")
        await until(lambda: _at_least(r, 4), what="the other rooms go on")
        assert room_failed(r, OTHER) == 0
    finally:
        await r.close()


async def test_channel_star_with_a_room_list_talk_refuses_keeps_the_rooms(tmp_path, talk, people, redis) -> None:
    _bridge, alice, _bob = people
    text = user_section("cloud", talk.url, PollTimeout=2, RoomsRefreshSeconds=0.1) + gateway("g", (ACCOUNT, "*"))
    r = await start_user_rig(load(tmp_path, text), ACCOUNT, redis)
    try:
        await until(lambda: _both_cursors(r), what="both rooms polled")
        talk.fail_chat_next(500, count=3, method="GET", body=b"<html>proxy</html>", path="/api/v4/room")
        await until(lambda: len([q for q in talk.chat_requests("/api/v4/room") if q.status == 500]) == 3, what="500s")
        await talk.post(ROOM, alice, "still here")
        await until(r.events, what="the message")
        assert await _members(r) == {ROOM, OTHER}
    finally:
        await r.close()
