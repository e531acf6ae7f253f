"""End-to-end encrypted rooms, in-process against the session's real
Synapse, with alice's own E2E client (tests/matrix_e2ee_rig.py: matrix-nio
with its e2e extra, in a store of hers): her encrypted text, reply, edit,
reaction and redaction reach the bus decrypted; the bridge's sends arrive
encrypted and she decrypts them; a late key is waited for (and requested),
an absent one becomes a notice after the bound; a restart is the same
device; a crypto store that cannot be read fails the account. The real
daemons (SIGKILL, takeover) are in tests/test_matrix_e2ee_daemon.py."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nio import MegolmEvent
from nio.crypto.attachments import decrypt_attachment, encrypt_attachment
from redis.asyncio import Redis

from adapters.matrix.crypto import MAGIC, Crypto, decode_snapshot
from adapters.matrix.parse import BAD_FILE_NOTE, UNDECRYPTABLE_NOTE, FileSecret, file_secret
from adapters.matrix.sending import rotation_of
from bridge.adapter import AccountFailed
from bridge.events import Attachment, EventKind
from tests.adapter_rig import gateway
from tests.helpers import metric
from tests.matrix_e2ee_rig import Human, encrypted_room, is_message
from tests.matrix_rig import ACCOUNT, Room, api_event, api_section, delivery, matrix_section, room_config, start_rig
from tests.synapse_rig import SynapseServer, unique
from tests.talkbot_rig import until, write_config
from tests.test_matrix import PNG


def _members(room: Room) -> list[str]:
    return list(room.alice.call("GET", f"/_matrix/client/v3/rooms/{room.room_id}/joined_members")["joined"])


async def _ready(room: Room, human: Human) -> str:
    """The bot joined and its device's keys published: alice's client can share her keys with it."""
    await until(lambda: room.bot_id in _members(room), within=30, what="the bot joined")
    return await until(lambda: human.device_of(room.bot_id), within=30, what="the bot's device keys")


def _wire_type(room: Room, event_id: str) -> str:
    [event] = [e for e in room.alice.messages(room.room_id) if e["event_id"] == event_id]
    return event["type"]


async def _bodies_from_bot(human: Human, room: Room) -> list[str]:
    return [e.source["content"].get("body", "") for e in await human.from_user(room.bot_id) if is_message(e)]


async def test_an_encrypted_room_is_bridged_both_ways(tmp_path: Path, redis: Redis, synapse: SynapseServer) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    rig = await start_rig(room_config(tmp_path, room), redis)
    r = room.room_id
    try:
        await _ready(room, human)
        hello = await human.text(r, "secret hello")
        assert _wire_type(room, hello) == "m.room.encrypted"  # the homeserver sees ciphertext only
        reply = await human.send(r, {"msgtype": "m.text", "body": "> <@x:test.local> secret hello\n\nthe reply",
                                     "m.relates_to": {"m.in_reply_to": {"event_id": hello}}})  # fmt: skip
        fixed = {"msgtype": "m.text", "body": "fixed"}
        await human.send(r, {"msgtype": "m.text", "body": "* fixed", "m.new_content": fixed,
                             "m.relates_to": {"rel_type": "m.replace", "event_id": hello}})  # fmt: skip
        thumbs = {"rel_type": "m.annotation", "event_id": hello, "key": "👍"}
        await human.send_encrypted(r, "m.reaction", {"m.relates_to": thumbs})
        await until(lambda: _through(rig, "the reply"), within=30, what="the reply")  # then redacted, not before
        room.alice.redact(r, reply)
        await human.text(r, "the end")
        events = await until(lambda: _through(rig, "the end"), within=30, what="everything decrypted")
        kinds = [(e.kind, e.text, e.target_id or e.reply_to or "") for e in events]
        assert kinds == [
            (EventKind.MESSAGE, "secret hello", ""),
            (EventKind.MESSAGE, "the reply", hello),
            (EventKind.EDIT, "fixed", hello),
            (EventKind.REACTION, "", hello),
            (EventKind.DELETE, "", reply),
            (EventKind.MESSAGE, "the end", ""),
        ]
        assert events[0].sender_id == room.alice.user_id and events[0].sender_name == "Alice"
        assert events[3].reaction == "👍"
        # the bridge's messages: encrypted on the wire, decrypted by alice
        await rig.adapter.send(delivery(api_event("hi *alice*", native_id="1"), r))
        [body] = await until(lambda: _bodies_from_bot(human, room), within=30, what="alice decrypts the bridge")
        assert body == "[api/a] <bob> hi *alice*"
        assert room.alice.from_user(r, room.bot_id) == []
        assert len(room.alice.from_user(r, room.bot_id, "m.room.encrypted")) == 1
    finally:
        await rig.close()
        await human.close()


async def test_encrypted_files_cross_both_ways_and_a_bad_hash_is_refused(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    rig = await start_rig(room_config(tmp_path, room), redis)
    r = room.room_id
    try:
        await _ready(room, human)
        await human.send_file(r, PNG, "pic.png", "image/png")
        await human.send_file(r, PNG, "bad.png", "image/png", tamper=True)
        await human.text(r, "the end")
        pic, refused, _end = await until(lambda: _through(rig, "the end"), within=30, what="the files")
        [att] = pic.attachments
        assert (att.name, att.mime, base64.b64decode(att.data_b64 or "")) == ("pic.png", "image/png", PNG)
        assert (refused.text, refused.attachments) == (BAD_FILE_NOTE.format(name="bad.png"), [])
        assert metric(rig.metrics, "talkbridge_deliveries_skipped_total", account=ACCOUNT,
                      reason="encrypted_file_refused") == 1  # fmt: skip
        out = Attachment(name="out.png", mime="image/png", data_b64=base64.b64encode(PNG).decode())
        await rig.adapter.send(delivery(api_event("", native_id="f", attachments=[out]), r))
        [event] = await until(lambda: _files_from_bot(human, room), within=30, what="alice gets the file")
        content = event.source["content"]
        assert "url" not in content and content["body"] == "[api/a] <bob> out.png"
        file = content["file"]
        ciphertext = room.alice.download(file["url"])
        assert ciphertext != PNG
        assert decrypt_attachment(ciphertext, file["key"]["k"], file["hashes"]["sha256"], file["iv"]) == PNG
    finally:
        await rig.close()
        await human.close()


async def _files_from_bot(human: Human, room: Room) -> list:  # type: ignore[no-untyped-def]
    return [e for e in await human.from_user(room.bot_id) if is_message(e) and "file" in e.source["content"]]


async def _through(rig, text: str) -> list:  # type: ignore[no-untyped-def]
    events = await rig.events()
    return events if any(e.text == text for e in events) else []


async def test_a_late_key_is_requested_and_the_event_relayed_when_it_arrives(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    rig = await start_rig(room_config(tmp_path, room, SyncTimeoutSeconds=1), redis)
    r = room.room_id
    try:
        bot_device = await _ready(room, human)
        await human.text(r, "first")  # a session the bot has
        await until(lambda: _through(rig, "first"), within=30, what="first")
        late = await human.send_unshared(r, "late secret")
        waiting = rig.adapter.crypto.pending_key
        await until(lambda: _has_field(redis, waiting, late), within=30, what="the event waits for its key")
        session = orjson.loads(await redis.get(waiting))[0][1]["source"]["content"]["session_id"]
        requests = await until(lambda: _requests(human, session), within=30, what="the bot asks alice for the key")
        assert requests[0].requesting_device_id == bot_device
        assert "late secret" not in await rig.texts()
        await human.share_late(r, room.bot_id)
        await until(lambda: _through(rig, "late secret"), within=30, what="decrypted once the key came")
        [event] = [e for e in await rig.events() if e.text == "late secret"]
        assert event.sender_id == room.alice.user_id
        assert orjson.loads(await redis.get(waiting)) == []
    finally:
        await rig.close()
        await human.close()


async def _has_field(redis: Redis, key: str, event_id: str) -> bool:
    raw = await redis.get(key)
    return raw is not None and any(item[0] == event_id for item in orjson.loads(raw))


async def _requests(human: Human, session: str) -> list:  # type: ignore[no-untyped-def]
    await human.sync()
    return [q for q in human.key_requests if q.session_id == session]


async def test_a_key_that_never_comes_is_a_notice_after_the_bound(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    rig = await start_rig(room_config(tmp_path, room, SyncTimeoutSeconds=1, UndecryptableSeconds=1), redis)
    r = room.room_id
    try:
        await _ready(room, human)
        never = await human.send_unshared(r, "never readable")
        [event] = await until(rig.events, within=30, what="the notice")
        assert (event.text, event.sender_id, event.native_id) == (UNDECRYPTABLE_NOTE, room.alice.user_id, never)
        assert metric(rig.metrics, "talkbridge_deliveries_skipped_total", account=ACCOUNT, reason="undecryptable") == 1
    finally:
        await rig.close()
        await human.close()


async def test_room_keys_rotate_as_the_room_says(tmp_path: Path, redis: Redis, synapse: SynapseServer) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice", rotation_period_msgs=2)
    rig = await start_rig(room_config(tmp_path, room), redis)
    r = room.room_id
    try:
        await _ready(room, human)
        for i in range(3):
            await rig.adapter.send(delivery(api_event(f"m{i}", native_id=str(i)), r))
        await until(lambda: _at_least(human, room, 3), within=30, what="alice decrypts all three")
        sessions = [e.session_id for e in await human.from_user(room.bot_id) if is_message(e)]
        assert sessions[0] == sessions[1] != sessions[2]  # a new room key after two messages
    finally:
        await rig.close()
        await human.close()


async def test_a_blacklisted_device_gets_no_room_key(tmp_path: Path, redis: Redis, synapse: SynapseServer) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    laptop = await Human(synapse.url, room.alice.user_id, tmp_path / "laptop").start()  # alice's second device
    assert laptop.client is not None
    blacklisted = f"{room.alice.user_id} {laptop.client.device_id}"
    rig = await start_rig(room_config(tmp_path, room, BlacklistDevices=[blacklisted]), redis)
    r = room.room_id
    try:
        await _ready(room, human)
        await until(lambda: laptop.device_of(room.bot_id), within=30, what="the laptop knows the bot")
        await rig.adapter.send(delivery(api_event("not for the laptop", native_id="1"), r))
        await until(lambda: _bodies_from_bot(human, room), within=30, what="the phone decrypts")
        [event] = await until(lambda: _said_by(laptop, room.bot_id), within=30, what="the laptop gets the event")
        assert isinstance(event, MegolmEvent)  # and no key for it: it stays ciphertext there
        assert await _bodies_from_bot(laptop, room) == []
    finally:
        await rig.close()
        await human.close()
        await laptop.close()


async def _said_by(human: Human, sender: str) -> list:  # type: ignore[type-arg]
    """What ``sender`` said in the room, decrypted or not (not its membership)."""
    return [e for e in await human.from_user(sender) if isinstance(e, MegolmEvent) or is_message(e)]


async def test_a_token_account_is_the_tokens_device(tmp_path: Path, redis: Redis, synapse: SynapseServer) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    bot = synapse.register(unique("tokenbot"))  # MxID + Token: the registration's device is the bridge's
    room.alice.invite(room.room_id, bot.user_id)
    body = matrix_section("test", synapse.url, MxID=bot.user_id, Token=bot.access_token) + api_section()
    config = write_config(tmp_path / "talkbridge.toml", body + gateway("g", (ACCOUNT, room.room_id), ("api.a", "api")))
    rig = await start_rig(config, redis)
    token_room = Room(synapse, room.alice, bot.user_id[1:].split(":")[0], room.room_id)
    try:
        assert (await _ready(token_room, human)) == bot.device_id
        await human.text(room.room_id, "to the token bot")
        await until(lambda: _through(rig, "to the token bot"), within=30, what="decrypted")
        await rig.adapter.send(delivery(api_event("from the token bot", native_id="1"), room.room_id))
        assert await until(lambda: _bodies_from_bot(human, token_room), within=30, what="alice decrypts") == [
            "[api/a] <bob> from the token bot"
        ]
        assert [d["device_id"] for d in synapse.devices(bot.user_id)] == [bot.device_id]
    finally:
        await rig.close()
        await human.close()


async def test_a_restart_is_the_same_device_and_keeps_decrypting(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    config = room_config(tmp_path, room)
    r = room.room_id
    rig = await start_rig(config, redis)
    try:
        device = await _ready(room, human)
        await human.text(r, "before")
        await until(lambda: _through(rig, "before"), within=30, what="before")
        await rig.adapter.send(delivery(api_event("out before", native_id="1"), r))
        await until(lambda: _bodies_from_bot(human, room), within=30, what="alice decrypts")
    finally:
        await rig.close()
    rig = await start_rig(config, redis)  # a new process would do the same: everything from Redis
    try:
        assert rig.adapter.client is not None and rig.adapter.client.device_id == device
        await human.text(r, "after")  # the same Megolm session: the restarted bridge has its key
        await until(lambda: _through(rig, "after"), within=30, what="decrypted after the restart")
        await rig.adapter.send(delivery(api_event("out after", native_id="2"), r))
        bodies = await until(lambda: _at_least(human, room, 2), within=30, what="alice decrypts after the restart")
        assert bodies == ["[api/a] <bob> out before", "[api/a] <bob> out after"]
        assert [d["device_id"] for d in synapse.devices(room.bot_id)] == [device]
        assert "could not be decrypted" not in " ".join(await rig.texts())
    finally:
        await rig.close()
        await human.close()


async def _at_least(human: Human, room: Room, n: int) -> list[str] | None:
    bodies = await _bodies_from_bot(human, room)
    return bodies if len(bodies) >= n else None


async def test_an_unreadable_crypto_store_fails_the_account(
    tmp_path: Path, redis: Redis, synapse: SynapseServer
) -> None:
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    config = room_config(tmp_path, room)
    rig = await start_rig(config, redis)
    try:
        await _ready(room, human)
        key = rig.adapter.crypto.snapshot_key
    finally:
        await rig.close()
        await human.close()
    await redis.set(key, MAGIC + b"not zlib")
    with pytest.raises(AccountFailed, match=ACCOUNT):
        await start_rig(config, redis)
    assert len(synapse.devices(room.bot_id)) == 1  # no new device


@given(st.binary(max_size=200))
def test_any_snapshot_bytes_decode_or_are_refused(raw: bytes) -> None:
    try:
        decode_snapshot(raw)
    except ValueError:
        pass


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
WAITING = st.lists(
    st.tuples(
        st.text(max_size=4),
        st.fixed_dictionaries(
            {
                "room": st.text(max_size=4),
                "channel": st.text(max_size=4),
                "source": st.dictionaries(st.text(max_size=4), JSON),
                "since": st.floats(allow_nan=False, allow_infinity=False),
            },
            optional={"junk": JSON},
        ),
    ).map(list),
    max_size=3,
)


@given(JSON | WAITING)
def test_any_waiting_events_json_restores_to_valid_entries_only(value: object) -> None:
    crypto = Crypto("matrix.x", "k", "p")
    crypto.restore_pending(orjson.dumps(value))
    for eid, pending in crypto.pending.items():
        assert isinstance(eid, str) and isinstance(pending.source, dict) and isinstance(pending.room_id, str)


B64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_", max_size=70)
FILE = st.fixed_dictionaries(
    {"url": st.just("mxc://test.local/abc") | st.text(max_size=8),
     "key": st.fixed_dictionaries({"k": B64}, optional={"alg": st.sampled_from(["A256CTR", "x"]), "kty": JSON}),
     "iv": B64, "hashes": st.fixed_dictionaries({"sha256": B64})},
    optional={"v": st.sampled_from(["v2", "v1"]), "extra": JSON},
)  # fmt: skip


@given(FILE | JSON)
def test_any_file_object_parses_to_bounded_strings_or_is_refused(file: object) -> None:
    found = file_secret(file)
    if found is not None:
        url, secret = found
        assert isinstance(url, str) and isinstance(secret, FileSecret)
        assert all(isinstance(v, str) and 0 < len(v) <= 64 for v in (secret.key, secret.iv, secret.sha256))


def test_a_real_file_object_parses_and_decrypts() -> None:
    ciphertext, keys = encrypt_attachment(PNG)
    found = file_secret({"url": "mxc://test.local/abc", **keys})
    assert found is not None
    url, secret = found
    assert url == "mxc://test.local/abc"
    assert decrypt_attachment(ciphertext, secret.key, secret.sha256, secret.iv) == PNG


@given(st.dictionaries(st.sampled_from(["rotation_period_ms", "rotation_period_msgs", "algorithm"]), JSON))
def test_any_encryption_content_gives_positive_rotation_limits_or_none(content: dict) -> None:  # type: ignore[type-arg]
    for limit in rotation_of(content):
        assert limit is None or (type(limit) is int and limit > 0)
