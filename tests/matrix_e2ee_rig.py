"""The human side of an end-to-end encrypted room: ``Human`` is alice's own
E2E client — matrix-nio with its e2e extra (vodozemac) in its own store, a
directory of hers, independent of the bridge's — and ``encrypted_room``
makes a room with ``m.room.encryption`` from its creation, the bot invited.

Each call syncs once (``timeout=0``: no wait) and does what a client does
after a sync (keys uploaded, queried, claimed; to-device messages sent), so
tests poll it with ``until`` like any other condition."""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from nio import (
    AsyncClient,
    AsyncClientConfig,
    Event,
    LoginResponse,
    MegolmEvent,
    RoomKeyRequest,
    RoomSendResponse,
    SyncResponse,
    ToDeviceMessage,
    ToDeviceResponse,
    UploadResponse,
)
from nio.api import Api

from tests.matrix_rig import BOT_PASSWORD, Room
from tests.synapse_rig import MatrixUser, SynapseServer, unique

HUMAN_PASSWORD = "alice-password-e2e"


@dataclass
class Human:
    """Alice's E2E client (a device of her own, its keys in ``store``)."""

    server: str
    user_id: str
    store: Path
    client: AsyncClient | None = None
    timeline: list[tuple[str, Event]] = field(default_factory=list)
    key_requests: list[RoomKeyRequest] = field(default_factory=list)
    unshared: dict[str, tuple[str, str]] = field(default_factory=dict)  # room -> (session id, key at index 0)

    async def start(self) -> Human:
        self.store.mkdir(parents=True, exist_ok=True)
        config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        self.client = AsyncClient(self.server, self.user_id, store_path=str(self.store), config=config)
        resp = await self.client.login(HUMAN_PASSWORD, device_name="alice's phone")
        assert isinstance(resp, LoginResponse), resp
        await self.sync()
        return self

    def _c(self) -> AsyncClient:
        assert self.client is not None
        return self.client

    async def sync(self) -> None:
        client = self._c()
        resp = await client.sync(timeout=0, full_state=client.next_batch is None)
        assert isinstance(resp, SyncResponse), resp
        for room_id, info in resp.rooms.join.items():
            self.timeline.extend((room_id, e) for e in info.timeline.events)
        self.key_requests.extend(e for e in resp.to_device_events if isinstance(e, RoomKeyRequest))
        if client.should_upload_keys:
            await client.keys_upload()
        if client.should_query_keys:
            await client.keys_query()
        if client.should_claim_keys:
            await client.keys_claim(client.get_users_for_key_claiming())
        await client.send_to_device_messages()

    async def device_of(self, user_id: str) -> str | None:
        """The device id of ``user_id``'s (one) device with keys, once known."""
        client = self._c()
        client.olm.users_for_key_query.add(user_id)
        await self.sync()
        devices = list(client.device_store.active_user_devices(user_id))
        return devices[0].id if devices else None

    async def send(self, room: str, content: dict[str, Any], etype: str = "m.room.message") -> str:
        await self.sync()
        resp = await self._c().room_send(room, etype, content, ignore_unverified_devices=True)
        assert isinstance(resp, RoomSendResponse), resp
        return resp.event_id

    async def text(self, room: str, body: str) -> str:
        return await self.send(room, {"msgtype": "m.text", "body": body})

    async def send_encrypted(self, room: str, etype: str, content: dict[str, Any]) -> str:
        """``content`` encrypted as ``etype`` whatever it is (nio's room_send
        leaves reactions in the clear; Element encrypts them)."""
        await self.sync()
        client = self._c()
        if client.olm.should_share_group_session(room):
            await client.share_group_session(room, ignore_unverified_devices=True)
        wire_type, wire = client.encrypt(room, etype, content)
        method, path, data = Api.room_send(client.access_token, room, wire_type, wire, str(uuid4()))
        resp = await client._send(RoomSendResponse, method, path, data, (room,))
        assert isinstance(resp, RoomSendResponse), resp
        return resp.event_id

    async def send_file(self, room: str, data: bytes, name: str, mime: str, tamper: bool = False) -> str:
        """An encrypted attachment, as Element sends one (``tamper``: its hash is another file's)."""
        client = self._c()
        upload, keys = await client.upload(io.BytesIO(data), content_type="application/octet-stream", filename=name,
                                           encrypt=True, filesize=len(data))  # fmt: skip
        assert isinstance(upload, UploadResponse) and keys, upload
        file = {"url": upload.content_uri, **keys}
        if tamper:
            file["hashes"] = {"sha256": base64.b64encode(hashlib.sha256(b"another file").digest()).decode().rstrip("=")}
        content = {"msgtype": "m.image", "body": name, "filename": name, "file": file,
                   "info": {"mimetype": mime, "size": len(data)}}  # fmt: skip
        return await self.send(room, content)

    async def send_unshared(self, room: str, body: str) -> str:
        """A message under a new Megolm session whose key nobody has been
        given yet (``share_late`` gives it): a key that arrives late."""
        olm = self._c().olm
        olm.create_outbound_group_session(room)
        session = olm.outbound_group_sessions[room]
        self.unshared[room] = (session.id, session.session_key)  # the key from index 0, before it ratchets
        session.shared = True  # encrypt with it without sharing it
        resp = await self._c().room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})
        assert isinstance(resp, RoomSendResponse), resp
        return resp.event_id

    async def share_late(self, room: str, user_id: str) -> None:
        """Give ``user_id``'s devices the key ``send_unshared`` used (as
        ``m.room_key`` over the Olm sessions this client has with them)."""
        client = self._c()
        olm = client.olm
        session_id, session_key = self.unshared.pop(room)
        key = {"algorithm": "m.megolm.v1.aes-sha2", "room_id": room, "session_id": session_id,
               "session_key": session_key}  # fmt: skip
        for device in olm.device_store.active_user_devices(user_id):
            olm_session = olm.session_store.get(device.curve25519)
            assert olm_session is not None, "no Olm session with that device yet: share a message first"
            payload = olm._olm_encrypt(olm_session, device, "m.room_key", key)
            resp = await client.to_device(ToDeviceMessage("m.room.encrypted", user_id, device.id, payload))
            assert isinstance(resp, ToDeviceResponse), resp

    async def from_user(self, sender: str) -> list[Event]:
        """What ``sender`` said that this client decrypted (or could not: MegolmEvent)."""
        await self.sync()
        return [e for _room, e in self.timeline if getattr(e, "sender", None) == sender]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


async def encrypted_room(synapse: SynapseServer, store: Path, **rotation: int) -> tuple[Room, Human]:
    """A room encrypted from its creation by alice, the bot invited; alice's
    E2E client in it. ``rotation``: ``rotation_period_ms``/``_msgs`` of its
    ``m.room.encryption``."""
    bot_login = unique("bot")
    bot = synapse.register(bot_login, BOT_PASSWORD)
    bot.call("POST", "/_matrix/client/v3/logout", {})  # the adapter logs in itself
    bot.close()
    alice: MatrixUser = synapse.register(unique("alice"), HUMAN_PASSWORD)
    alice.call("PUT", f"/_matrix/client/v3/profile/{alice.user_id}/displayname", {"displayname": "Alice"})
    encryption = {"type": "m.room.encryption", "state_key": "",
                  "content": {"algorithm": "m.megolm.v1.aes-sha2", **rotation}}  # fmt: skip
    body = {"name": "room", "invite": [bot.user_id], "preset": "private_chat", "initial_state": [encryption]}
    room_id = alice.call("POST", "/_matrix/client/v3/createRoom", body)["room_id"]
    human = await Human(synapse.url, alice.user_id, store).start()
    return Room(synapse, alice, bot_login, room_id), human


def is_message(event: Event) -> bool:
    return not isinstance(event, MegolmEvent) and getattr(event, "source", {}).get("type") == "m.room.message"
