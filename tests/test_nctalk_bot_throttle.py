"""The Talk bot adapter against Nextcloud's brute-force throttle and Talk's
own strictness (one-emoji reactions, PHP's trim), with the Talk test server.

Nextcloud's Throttler counts refused signatures per IP for 12 hours: from 8
of them on, every bot request from that IP is held 25 s before Talk handles
it, and a refused one 25 s more before the answer. A correct request is still
done after the wait, so an adapter that times out inside it retries (and
posts) it again; more than 10 in 30 minutes and Talk answers 429 at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bridge.adapter import AccountFailed, PermanentError
from bridge.events import Delivery, Event, EventKind
from tests.talkbot_rig import SECRET, Rig, bot_section, start_rig, write_config
from tests.talkserver import TalkServer
from tests.talkserver.state import Room

ACCOUNT = "nctalkbot.talk"
LOOPBACK = "127.0.0.1"  # the adapter's address as the Talk test server sees it
DELAYED_AFTER = 8  # refused signatures after which Throttler's delay reaches MAX_DELAY (0.1 s * 2**8 > 25 s)


async def talk_server(delay_scale: float) -> TalkServer:
    return await TalkServer(bruteforce_delay_scale=delay_scale).start()


async def bot_room(talk: TalkServer, webhook_url: str = "http://127.0.0.1:9/webhook") -> Room:
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, webhook_url)
    room.bots.add(bot.id)  # enabled without the Join webhook: nothing here proves the secret
    return room


async def make_rig(tmp_path: Path, redis: Redis, talk: TalkServer, **opts: object) -> Rig:
    config = write_config(tmp_path / "talkbridge.toml", bot_section("talk", talk.url, **opts))
    return await start_rig(config, ACCOUNT, redis)


def message(text: str = "hi there", username: str = "[api/a] <carol> ", **kw: object) -> Delivery:
    event = Event(kind=kw.pop("kind", EventKind.MESSAGE), account="api.a", channel="api", sender_name="carol",
                  text=text, native_id="n1", reaction=kw.pop("reaction", None))  # fmt: skip
    return Delivery(event, ACCOUNT, "gen12345", "g", username, text, **kw)  # type: ignore[arg-type]


def earlier_refusals(talk: TalkServer, count: int = DELAYED_AFTER) -> None:
    """Signatures this IP had refused before (a wrong secret since fixed, another bot on the host)."""
    for _ in range(count):
        talk.state.register_attempt(LOOPBACK, "bot")


@pytest.fixture
async def scaled_talk() -> AsyncIterator[TalkServer]:
    # Talk's delays at 1/25: 25 s become 1 s, still twice the adapter Timeout the tests set.
    server = await talk_server(delay_scale=0.04)
    try:
        yield server
    finally:
        await server.stop()


async def test_a_request_held_by_talks_real_throttle_is_posted_once(
    tmp_path: Path, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Talk's real values: this request waits 25 s at Talk. The adapter's
    Timeout (1 s here, 15 s by default) is shorter, yet the request must end
    in Talk's 201, not in a timeout retried (and posted) again."""
    talk = await talk_server(delay_scale=1.0)
    try:
        room = await bot_room(talk)
        earlier_refusals(talk)
        assert talk.state.delay(LOOPBACK, "bot") == talk.state.MAX_DELAY == 25.0
        rig = await make_rig(tmp_path, redis, talk, Timeout=1)
        try:
            with caplog.at_level(logging.WARNING):
                assert await rig.adapter.send(message()) is None
        finally:
            await rig.close()
        assert [m.message for m in talk.messages(room.token)] == ["[api/a] <carol> hi there"]
        assert len(talk.requests("/message")) == 1
        assert any("brute-force" in r.getMessage() and ACCOUNT in r.getMessage() for r in caplog.records)
    finally:
        await talk.stop()


async def test_a_refused_signature_at_a_throttled_ip_stops_the_account(
    tmp_path: Path, redis: Redis, scaled_talk: TalkServer
) -> None:
    room = await bot_room(scaled_talk)
    earlier_refusals(scaled_talk)
    wrong = await make_rig(tmp_path, redis, scaled_talk, secret="wrong-" + "z" * 40, Timeout=0.5)
    try:
        with pytest.raises(AccountFailed, match="401"):  # held before and after: Talk's answer, not a timeout
            await wrong.adapter.send(message())
    finally:
        await wrong.close()
    assert len(scaled_talk.requests("/message")) == 1
    assert scaled_talk.messages(room.token) == []


async def test_an_ip_blocked_by_brute_force_protection_stops_the_account(
    tmp_path: Path, redis: Redis, scaled_talk: TalkServer
) -> None:
    room = await bot_room(scaled_talk)
    earlier_refusals(scaled_talk, scaled_talk.state.MAX_ATTEMPTS + 1)
    rig = await make_rig(tmp_path, redis, scaled_talk, Timeout=0.5)
    try:
        with pytest.raises(AccountFailed, match=r"429.*brute-force"):  # not retried into the block, then dead-lettered
            await rig.adapter.send(message())
        scaled_talk.reset_bruteforce(LOOPBACK)  # occ security:bruteforce:reset 127.0.0.1
        assert await rig.adapter.send(message()) is None
    finally:
        await rig.close()
    assert len(scaled_talk.messages(room.token)) == 1


# Talk's strictness -------------------------------------------------------------------
async def test_a_message_of_only_non_breaking_spaces_is_posted(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    """PHP's trim() leaves U+00A0: Talk posts such a message, so the bridge sends it."""
    room = await bot_room(talk)
    rig = await make_rig(tmp_path, redis, talk)
    try:
        await rig.adapter.send(message("\u00a0\u00a0", username=""))
        await rig.adapter.send(message(" \t\n", username=""))  # empty for Talk: nothing sent (it would be a 400)
    finally:
        await rig.close()
    assert [m.message for m in talk.messages(room.token)] == ["\u00a0\u00a0"]
    assert len(talk.requests("/message")) == 1


async def test_a_reaction_must_be_one_emoji(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    room = await bot_room(talk)
    alice = talk.add_user("alice", "Alice A.")
    msg = await talk.post(room.token, alice, "nice")
    rig = await make_rig(tmp_path, redis, talk)
    try:
        for emoji in ("👍🏽", "🏴󠁧󠁢󠁥󠁮󠁧󠁿", "#️⃣", "👨‍👩‍👧"):  # modifier, tag sequence, keycap, ZWJ sequence: one grapheme each
            await rig.adapter.send(message(kind=EventKind.REACTION, reaction=emoji, target_id=str(msg.id)))
        for text in ("👍👍", "👍 ", "ok"):  # two graphemes, an emoji and a space, text
            with pytest.raises(PermanentError, match="400"):
                await rig.adapter.send(message(kind=EventKind.REACTION, reaction=text, target_id=str(msg.id)))
    finally:
        await rig.close()
    assert list(msg.reactions) == ["👍🏽", "🏴󠁧󠁢󠁥󠁮󠁧󠁿", "#️⃣", "👨‍👩‍👧"]
