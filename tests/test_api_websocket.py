"""``GET /api/websocket`` on a Matterbridge ``api`` account, as Matterbridge
serves it (42wim/matterbridge, bridge/api/api.go: ``handleWebsocket`` sends
the ``api_connected`` greeting, then the buffered messages, then
``writePump`` writes each new message as one JSON text frame;
``readPump``'s ``ReadJSON`` turns every client frame into a message for the
gateway; pings every 54 s). Through ``talkbridge run`` with two api
accounts in one gateway.

Where Matterbridge drops the connection on a frame it cannot read, a refused
frame gets ``{"event": "api_error", "status": 4xx, "text": reason}`` and
changes nothing; the connection stays usable."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis as sync_redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.api.encoding import API_ERROR, MESSAGE_FIELDS, BadRequest, ws_message
from bridge.keys import account_key, inbound_key
from tests import helpers
from tests.helpers import Daemon, RedisServer, api_pair_config, has_sentinel, through_sentinel
from tests.ingress_props import bodies
from tests.test_api_e2e import Api, running_bridge

INBOUND_A = inbound_key("tb", "api.a")
SENTINEL = {"text": "sentinel", "gateway": "no-such-gateway-sentinel"}  # always refused: marks the end of a reply
UPGRADE = {  # a well-formed WebSocket handshake (RFC 6455's sample key)
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}
TEMPLATES = [
    {"text": "hi", "username": "u", "userid": "u1", "gateway": "g"},
    {"text": "", "event": "msg_delete", "id": "abc", "gateway": "g"},
    {"text": "👍", "event": "reaction_add", "parent_id": "abc", "gateway": "g"},
    {"text": "with a file", "gateway": "g", "Extra": {"file": [{"Name": "a.txt", "Data": "eA=="}]}},
]


@pytest.fixture(scope="module")
def bridge(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[Api, Api, Daemon, sync_redis.Redis]]:
    """One daemon for the module (with a Redis client of its own: the ``redis``
    fixture flushes per test); every test leaves the buffers it used empty."""
    with running_bridge(tmp_path_factory.mktemp("websocket"), redis_server) as running:
        yield running


def ws_url(api: Api) -> str:
    return f"{api.base}/api/websocket"


def last_id(client: sync_redis.Redis, stream: str) -> bytes:
    try:
        return client.xinfo_stream(stream)["last-generated-id"]
    except sync_redis.ResponseError:  # no such stream yet
        return b"0-0"


def published_since(client: sync_redis.Redis, stream: str, since: bytes) -> list[dict]:
    return [json.loads(fields[b"d"])["e"] for _id, fields in client.xrange(stream, min=b"(" + since)]


async def receive_json(ws: aiohttp.ClientWebSocketResponse) -> dict:
    msg = await ws.receive(timeout=15)  # bounds a failure only
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return json.loads(msg.data)


async def test_a_message_over_the_websocket_crosses_to_the_stream_and_back(bridge) -> None:
    a, b, _daemon, _client = bridge
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url(a), headers=a.headers) as ws:
            greeting = await receive_json(ws)
            assert greeting["event"] == "api_connected" and greeting["timestamp"].endswith("Z")
            async with session.get(f"{b.base}/api/stream", headers=b.headers) as stream:
                assert json.loads(await stream.content.readline())["event"] == "api_connected"
                await ws.send_str(json.dumps({"text": "over the websocket", "username": "alice", "gateway": "g"}))
                crossed = json.loads(await asyncio.wait_for(stream.content.readline(), 15))
            assert crossed["text"] == "over the websocket" and crossed["username"] == "[api/a] <alice> "
            assert crossed["account"] == "api.a" and crossed["gateway"] == "g" and crossed["id"]
            # ...and back: b answers the copy, a's websocket gets the reply threaded on its own message
            back = b.post(text="and back", username="bob", gateway="g", parent_id=crossed["id"])
            assert back.status_code == 200
            reply = await receive_json(ws)
            assert reply["text"] == "and back" and reply["username"] == "[api/b] <bob> "
            assert reply["account"] == "api.b" and reply["event"] == "" and reply["parent_id"]
    assert a.messages() == [] and b.messages() == []  # taken from the buffers as they were sent


async def test_buffered_messages_come_first_then_new_ones_in_order(bridge) -> None:
    a, b, _daemon, client = bridge
    for i in range(3):
        assert a.post(text=f"m{i}", username="alice", gateway="g").status_code == 200
    # a second copy in b's buffer would be there before a sentinel posted after the three
    buffered = through_sentinel(
        lambda: a.post(text=helpers.SENTINEL, username="alice", gateway="g"),
        lambda: [
            json.loads(fields[b"d"])["text"] for _id, fields in client.xrange(account_key("tb", "api.b", "apibuf"))
        ],
        has_sentinel,
    )
    assert len(buffered) == 3
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(b), headers=b.headers) as ws:
        assert (await receive_json(ws))["event"] == "api_connected"
        got = [(await receive_json(ws))["text"] for _ in range(4)]
        assert a.post(text="m3", username="alice", gateway="g").status_code == 200
        got.append((await receive_json(ws))["text"])
    assert got == ["m0", "m1", "m2", helpers.SENTINEL, "m3"]


async def test_the_bearer_rules_of_every_route_hold(bridge) -> None:
    a, _b, _daemon, _client = bridge
    async with aiohttp.ClientSession() as session:
        for headers, status, reason in (
            ({}, 400, "missing key in request header"),
            ({"Authorization": "token-a"}, 400, "missing key in request header"),
            ({"Authorization": "Bearer nope"}, 401, "Unauthorized"),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(ws_url(a), headers=headers)
            assert refused.value.status == status
            async with session.get(ws_url(a), headers={**headers, **UPGRADE}) as resp:
                assert resp.status == status and (await resp.json())["message"] == reason
        async with session.get(ws_url(a), headers=a.headers) as plain:  # a GET that asks for no upgrade
            assert plain.status == 400
            reason = "/api/websocket needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)"
            assert (await plain.json())["message"] == reason


@pytest.mark.parametrize(
    "frame, reason",
    [
        ("{not json", "frame is not valid JSON: "),
        (b"\xff\xfe{}", "frame is not valid JSON: "),
        ("[1, 2]", "a frame must be a JSON object (one message)"),
        ('"text"', "a frame must be a JSON object (one message)"),
        ('{"text": 5, "gateway": "g"}', "text must be a string"),
        ('{"text": "x", "gateway": "nope"}', 'unknown gateway "nope" for api.a (it sends into: g)'),
        ('{"text": "", "gateway": "g"}', "text is empty and there is no file"),
        ('{"text": "x", "gateway": "g", "Extra": {"file": [{"Name": "../x", "Data": "eA=="}]}}', "Extra.file[0].Name"),
        ('{"event": "reaction_add", "text": "👍", "gateway": "g"}', "reaction_add needs parent_id"),
    ],
)
async def test_a_bad_frame_gets_its_reason_and_changes_nothing(bridge, frame: str | bytes, reason: str) -> None:
    a, b, _daemon, client = bridge
    since = last_id(client, INBOUND_A)
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(a), headers=a.headers) as ws:
        await receive_json(ws)  # the greeting
        await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
        refusal = await receive_json(ws)
        assert refusal["event"] == API_ERROR and refusal["status"] == 400
        assert refusal["text"].startswith(reason), refusal
        # the connection is still good: the next frame crosses
        await ws.send_str(json.dumps({"text": "after the refusal", "username": "alice", "gateway": "g"}))
        [crossed] = b.wait_messages(1)
        assert crossed["text"] == "after the refusal"
    assert [e["text"] for e in published_since(client, INBOUND_A, since)] == ["after the refusal"]


async def test_a_frame_of_megabytes_ends_the_connection_and_changes_nothing(bridge) -> None:
    """Never buffered: its header says it is over [http] MaxBodyBytes (1 MiB
    here) and the server closes at once with 1009. Whether the client reads
    that close frame depends on TCP (it is still sending what the server will
    not read, and an unread buffer is closed with a reset); either way the
    connection ends and nothing is published."""
    a, _b, _daemon, client = bridge
    since = last_id(client, INBOUND_A)
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(a), headers=a.headers) as ws:
        await receive_json(ws)
        with contextlib.suppress(ConnectionError):
            await ws.send_str(json.dumps({"text": "x" * (2 << 20), "gateway": "g"}))
        ending = await ws.receive(timeout=15)
        assert ending.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        assert ws.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG, aiohttp.WSCloseCode.ABNORMAL_CLOSURE, None)
    assert published_since(client, INBOUND_A, since) == []
    async with aiohttp.ClientSession() as session, session.get(f"{a.base}/api/health", headers=a.headers) as resp:
        assert await resp.text() == "OK"  # the account is fine


def test_a_frame_over_max_body_bytes_is_closed_with_1009(tmp_path: Path, redis_server: RedisServer) -> None:
    path, (pa, _pb, http) = api_pair_config(tmp_path, redis_server.url)
    # its own key prefix beside the module's daemon on the same Redis; a small limit: the frame arrives whole
    text = (
        path.read_text()
        .replace("[http]\n", "[http]\nMaxBodyBytes = 1024\n")
        .replace("[redis]\n", '[redis]\nKeyPrefix = "small"\n')
    )
    path.write_text(text)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    a = Api(pa, "token-a")
    client = sync_redis.Redis.from_url(redis_server.url)

    async def run() -> int | None:
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(a), headers=a.headers) as ws:
            await receive_json(ws)
            await ws.send_str(json.dumps({"text": "y" * 1100, "gateway": "g"}))
            closing = await ws.receive(timeout=15)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
            return ws.close_code

    try:
        since = last_id(client, "small:in:api.a")
        assert asyncio.run(run()) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        assert published_since(client, "small:in:api.a", since) == []
    finally:
        daemon.stop()
        client.close()


def test_stopping_the_daemon_closes_websockets_going_away(tmp_path: Path) -> None:
    """SIGTERM with a client on /api/websocket: 1001 for the client, a clean
    exit, no traceback (the embedded Redis stops with the daemon)."""
    path, (pa, _pb, http) = api_pair_config(tmp_path, None)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    a = Api(pa, "token-a")

    async def run() -> int | None:
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(a), headers=a.headers) as ws:
            await receive_json(ws)
            stopping = asyncio.get_running_loop().run_in_executor(None, daemon.stop)
            closing = await ws.receive(timeout=30)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert await stopping == 0
            return ws.close_code

    try:
        assert asyncio.run(run()) == aiohttp.WSCloseCode.GOING_AWAY
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log() and " ERROR " not in daemon.log(), daemon.log()


# generated input -------------------------------------------------------------------------
FRAMES = st.one_of(bodies(TEMPLATES), st.text(max_size=300).map(str.encode))


@settings(max_examples=300, deadline=None)
@given(data=FRAMES)
def test_the_frame_parser_gives_a_message_or_a_400(data: bytes) -> None:
    for frame in (data, data.decode("utf-8", "replace")):
        try:
            message = ws_message(frame)
        except BadRequest as exc:
            assert exc.status == 400 and exc.reason
            continue
        assert set(message) <= set(MESSAGE_FIELDS)


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(data=FRAMES, as_text=st.booleans())
def test_any_frame_is_refused_with_a_reason_or_published_once(bridge, data: bytes, as_text: bool) -> None:
    """Over the live route: a frame is answered with one api_error (a 4xx and
    a reason) and nothing is published, or it is accepted quietly and
    published at most once (a deletion of no message reaches nobody); the
    connection stays open either way."""
    a, b, _daemon, client = bridge
    text: str | None = None
    if as_text:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    since = last_id(client, INBOUND_A)

    async def exchange() -> list[dict]:
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(a), headers=a.headers) as ws:
            await receive_json(ws)
            await (ws.send_str(text) if text is not None else ws.send_bytes(data))
            await ws.send_str(json.dumps(SENTINEL))
            replies = []
            while True:
                reply = await receive_json(ws)
                if reply.get("event") == API_ERROR and "no-such-gateway-sentinel" in reply.get("text", ""):
                    return replies
                replies.append(reply)

    replies = asyncio.run(exchange())
    published = published_since(client, INBOUND_A, since)
    assert all(r.get("event") == API_ERROR for r in replies), replies
    if replies:
        [refusal] = replies
        assert 400 <= refusal["status"] < 500 and refusal["text"]
        assert published == []
    else:
        assert len(published) <= 1
    b.messages()  # what crossed, taken out of b's buffer
