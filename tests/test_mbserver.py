"""The test Matterbridge (tests/mbserver) behaves as Matterbridge 1.26 does
(42wim/matterbridge @ e68ddcf5: bridge/api/api.go, the gateway router,
echo, melody, golang-ring -- each module cites what it follows), over real
HTTP and WebSocket on loopback: tokens, the POST answer, routing both ways,
the ring and its three readers, files, parents, Extra, and a restart of
the real process losing the ring."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import free_port, wait_for
from tests.mbserver import MatterbridgeServer
from tests.mbserver.goscan import SyntaxErr, UnexpectedEOF, decode_whole
from tests.mbserver.rig import MatterbridgeProcess
from tests.talkbot_rig import until

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z\Z")


def config(tb: int, two: int) -> dict[str, Any]:
    return {
        "accounts": {
            "api.tb": {"BindAddress": f"127.0.0.1:{tb}", "Token": TOKEN, "Buffer": 3},
            "api.two": {"BindAddress": f"127.0.0.1:{two}"},
            "irc.libera": {"RemoteNickFormat": "[{PROTOCOL}] <{NICK}> "},
            "irc.oftc": {"RemoteNickFormat": "{NICK}@{GATEWAY}/{BRIDGE}/{CHANNEL}/{USERID}"},
            "xmpp.out": {"RemoteNickFormat": "{NOPINGNICK}"},
            "slack.in": {"RemoteNickFormat": "{NICK}"},
        },
        "gateways": [
            {
                "name": "gw1",
                "inout": [
                    {"account": "api.tb", "channel": "api"},
                    {"account": "api.two", "channel": "api"},
                    {"account": "irc.libera", "channel": "#Talk"},
                ],
                "in": [{"account": "slack.in", "channel": "general"}],
                "out": [{"account": "xmpp.out", "channel": "room@muc"}],
            },
            {
                "name": "gw2",
                "inout": [{"account": "api.two", "channel": "api"}, {"account": "irc.oftc", "channel": "#other"}],
            },
        ],
    }


class Mb:
    def __init__(self, server: MatterbridgeServer, http: aiohttp.ClientSession, tb: int, two: int) -> None:
        self.server = server
        self.http = http
        self.tb = f"http://127.0.0.1:{tb}"
        self.two = f"http://127.0.0.1:{two}"

    async def post(self, body: Any, base: str | None = None, **kw: Any) -> tuple[int, Any]:
        headers = kw.pop("headers", AUTH)
        async with self.http.post(f"{base or self.tb}/api/message", json=body, headers=headers, **kw) as r:
            text = await r.text()
            return r.status, json.loads(text) if text.startswith(("{", "[")) else text

    async def drain(self, base: str | None = None) -> list[dict[str, Any]]:
        async with self.http.get(f"{base or self.tb}/api/messages", headers=AUTH) as r:
            assert r.status == 200
            drained: list[dict[str, Any]] = json.loads(await r.text())
            return drained

    async def heard(self, account: str, count: int) -> list[dict[str, Any]]:
        return await until(lambda: len(self.server.heard(account)) >= count and self.server.heard(account),
                           what=f"{count} messages on {account}")  # fmt: skip

    async def ring(self, account: str, count: int) -> None:
        await until(lambda: self.server.ring(account) == count, what=f"{count} in {account}'s ring")


@pytest.fixture
async def mb() -> AsyncIterator[Mb]:
    tb, two = free_port(), free_port()
    async with MatterbridgeServer(config(tb, two)) as server, aiohttp.ClientSession() as http:
        yield Mb(server, http, tb, two)


# --- tokens (echo KeyAuth) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/health", "/api/messages", "/api/stream", "/api/websocket", "/nope"])
async def test_every_route_wants_the_token_missing_is_400_wrong_is_401(mb: Mb, path: str) -> None:
    cases = [
        ({}, 400, "missing key in request header"),
        ({"Authorization": TOKEN}, 400, "invalid key in the request header"),
        ({"Authorization": "Bearer"}, 400, "invalid key in the request header"),
        ({"Authorization": "Bearer wrong"}, 401, "Unauthorized"),
    ]
    for headers, status, message in cases:
        async with mb.http.get(mb.tb + path, headers=headers) as r:
            assert (r.status, await r.json(content_type=None)) == (status, {"message": message})
    async with mb.http.get(mb.tb + "/api/health", headers={"Authorization": f"bearer {TOKEN}"}) as r:
        assert (r.status, await r.text()) == (200, "OK")  # the scheme is compared without case
    async with mb.http.get(mb.tb + "/nope", headers=AUTH) as r:
        assert (r.status, await r.json(content_type=None)) == (404, {"message": "Not Found"})
    async with mb.http.get(mb.two + "/api/health") as r:  # no Token: no KeyAuth at all
        assert (r.status, await r.text(), r.headers["Content-Type"]) == (200, "OK", "text/plain; charset=UTF-8")
    async with mb.http.get(mb.tb + "/api/message", headers=AUTH) as r:
        assert (r.status, r.headers["Allow"]) == (405, "OPTIONS, POST")
    async with mb.http.options(mb.tb + "/api/message", headers=AUTH) as r:  # echo's router answers OPTIONS itself
        assert (r.status, r.headers["Allow"]) == (204, "OPTIONS, POST")
    async with mb.http.head(mb.tb + "/api/health", headers=AUTH) as r:  # a GET route: 405, and no body for a HEAD
        assert (r.status, await r.read()) == (405, b"")


# --- POST /api/message -----------------------------------------------------------------------------------------------


async def test_post_answers_200_with_the_message_its_fixed_fields_and_no_id(mb: Mb) -> None:
    body = {"text": "a <b> & c", "username": "zoe", "gateway": "gw1", "id": "mine", "channel": "x",
            "account": "y", "protocol": "z", "userid": "u1", "avatar": "http://a/z.png"}  # fmt: skip
    async with mb.http.post(mb.tb + "/api/message", json=body, headers=AUTH) as r:
        raw = await r.read()
        assert r.status == 200 and r.headers["Content-Type"] == "application/json; charset=UTF-8"
    assert b"a \\u003cb\\u003e \\u0026 c" in raw  # Go's json escapes HTML characters
    answer = json.loads(raw)
    assert list(answer) == ["text", "channel", "username", "userid", "avatar", "account", "event", "protocol",
                            "gateway", "parent_id", "timestamp", "id", "Extra"]  # fmt: skip
    assert answer | {"timestamp": None} == {
        "text": "a <b> & c", "channel": "api", "username": "zoe", "userid": "u1", "avatar": "http://a/z.png",
        "account": "api.tb", "event": "", "protocol": "api", "gateway": "gw1", "parent_id": "",
        "timestamp": None, "id": "", "Extra": None,
    }  # fmt: skip
    assert GO_TIME.match(answer["timestamp"])


async def test_what_go_refuses_in_a_post(mb: Mb) -> None:
    assert await mb.post({"text": 5}) == (
        400,
        {"message": "Unmarshal type error: expected=string, got=number, field=text, offset=10"},
    )  # json.dumps writes {"text": 5}: the offset is just past the 5, as Go's decoder gives it
    async with mb.http.post(
        mb.tb + "/api/message", data=b'{"a":tru}', headers={**AUTH, "Content-Type": "application/json"}
    ) as r:
        assert await r.json(content_type=None) == {
            "message": "Syntax error: offset=9, error=invalid character '}' in literal true (expecting 'e')"
        }
    assert (await mb.post({"text": "\ud800"}))[1]["text"] == "\ufffd"  # a lone surrogate escape reads as U+FFFD
    status, answer = await mb.post([1, 2])
    assert status == 400 and answer["message"].startswith("Unmarshal type error: expected=config.Message, got=array")
    assert (await mb.post({"text": "x", "timestamp": "yesterday"}))[0] == 400
    assert (await mb.post({"text": "x", "Extra": {"file": "a"}}))[0] == 400
    async with mb.http.post(mb.tb + "/api/message", headers=AUTH) as r:  # no body (Content-Length 0): nothing bound
        assert r.status == 200 and (await r.json(content_type=None))["account"] == "api.tb"
    async with mb.http.post(
        mb.tb + "/api/message", data=b" ", headers={**AUTH, "Content-Type": "application/json"}
    ) as r:
        assert (r.status, await r.json(content_type=None)) == (400, {"message": "EOF"})
    async with mb.http.post(mb.tb + "/api/message", data=b"{}", headers={**AUTH, "Content-Type": "text/plain"}) as r:
        assert (r.status, await r.json(content_type=None)) == (415, {"message": "Unsupported Media Type"})
    # a form is read but config.Message has no form tags: nothing is bound, and an empty message goes nowhere
    async with mb.http.post(mb.tb + "/api/message", data={"text": "hi", "gateway": "gw1"}, headers=AUTH) as r:
        assert r.status == 200 and (await r.json(content_type=None))["text"] == ""
    async with mb.http.post(mb.tb + "/api/message", data=b"text=%zz", headers={**AUTH,
                            "Content-Type": "application/x-www-form-urlencoded"}) as r:  # fmt: skip
        assert (r.status, await r.json(content_type=None)) == (400, {"message": 'invalid URL escape "%zz"'})
    # the keys of a JSON body match without regard to case; what follows the first value is never read
    data = b'{"TEXT": "sentinel", "Gateway": "gw1", "uSeRnAmE": "zoe"} trailing'
    async with mb.http.post(mb.tb + "/api/message", data=data, headers={**AUTH, "Content-Type": "application/json"}):
        pass
    heard = await mb.heard("irc.libera", 1)
    assert [m["text"] for m in heard] == ["sentinel"]  # the form post and the refused ones reached no one


# --- routing ---------------------------------------------------------------------------------------------------------


async def test_a_post_reaches_the_other_accounts_of_its_gateway_with_their_nick_formats_never_itself(mb: Mb) -> None:
    status, _ = await mb.post({"text": "hi", "username": "zoe", "userid": "z1", "gateway": "gw1"})
    assert status == 200
    (irc,) = await mb.heard("irc.libera", 1)
    assert irc | {"timestamp": None} == {
        "text": "hi",
        "channel": "#talk",
        "username": "[api] <zoe> ",
        "userid": "z1",
        "avatar": "",
        "account": "api.tb",
        "event": "",
        "protocol": "api",
        "gateway": "gw1",
        "parent_id": "",
        "timestamp": None,
        "id": "",
        "Extra": None,
    }  # fmt: skip  (the irc channel lowercased by mapChannelConfig)
    (xmpp,) = await mb.heard("xmpp.out", 1)
    assert (xmpp["channel"], xmpp["username"]) == ("room@muc", "z\u200boe")
    await mb.ring("api.two", 1)
    (other,) = await mb.drain(mb.two)
    assert (other["channel"], other["username"], other["account"], other["gateway"]) == ("api", "zoe", "api.tb", "gw1")
    assert mb.server.ring("api.tb") == 0  # no echo to the source
    assert mb.server.heard("slack.in") == [] and mb.server.heard("irc.oftc") == []  # "in" only; another gateway


async def test_the_gateway_a_post_names_is_the_only_one_it_reaches(mb: Mb) -> None:
    await mb.post({"text": "to gw2", "username": "u", "gateway": "gw2"}, base=mb.two, headers={})
    await mb.post({"text": "to none", "username": "u", "gateway": "nope"}, base=mb.two, headers={})
    await mb.post({"text": "to gw1", "username": "u", "gateway": "gw1"}, base=mb.two, headers={})
    (oftc,) = await mb.heard("irc.oftc", 1)
    assert (oftc["text"], oftc["username"], oftc["gateway"]) == ("to gw2", "u@gw2/two/api/", "gw2")
    (libera,) = await mb.heard("irc.libera", 1)
    assert libera["text"] == "to gw1"  # after "to none", which reached no one
    assert mb.server.heard("irc.oftc") == [oftc]


async def test_a_network_message_reaches_the_api_accounts_with_its_origin(mb: Mb) -> None:
    await mb.server.say("irc.libera", "#talk", "hello\x02 there", "bob", userid="b1")
    await mb.server.say("irc.oftc", "#other", "from two", "eve")
    await mb.ring("api.tb", 1)
    await mb.ring("api.two", 2)
    (msg,) = await mb.drain()
    assert msg | {"timestamp": None} == {
        "text": "hello there",
        "channel": "#talk",
        "username": "bob",
        "userid": "b1",
        "avatar": "",
        "account": "irc.libera",
        "event": "",
        "protocol": "irc",
        "gateway": "gw1",
        "parent_id": "",
        "timestamp": None,
        "id": "",
        "Extra": None,
    }  # fmt: skip  (outmessage.tengo strips IRC control characters for non-irc destinations)
    two = await mb.drain(mb.two)
    assert [(m["text"], m["gateway"], m["channel"]) for m in two] == [
        ("hello there", "gw1", "#talk"),
        ("from two", "gw2", "#other"),
    ]  # fmt: skip  (an api account in two gateways)


async def test_msg_delete_is_dropped_by_api_accounts_and_empty_messages_by_the_gateway(mb: Mb) -> None:
    await mb.server.say("irc.libera", "#talk", "gone", "bob", event="msg_delete")
    await mb.server.say("irc.libera", "#talk", "", "bob")
    await mb.server.say("irc.libera", "#talk", "sentinel", "bob")
    heard = await mb.heard("xmpp.out", 2)
    assert [(m["text"], m["event"]) for m in heard] == [("gone", "msg_delete"), ("sentinel", "")]
    await mb.ring("api.tb", 1)
    assert [m["text"] for m in await mb.drain()] == ["sentinel"]


async def test_a_parent_the_gateway_cannot_resolve_arrives_as_msg_parent_not_found(mb: Mb) -> None:
    await mb.post({"text": "re", "username": "u", "gateway": "gw1", "parent_id": "abc"})
    (irc,) = await mb.heard("irc.libera", 1)
    assert irc["parent_id"] == "msg-parent-not-found"
    await mb.server.say("irc.libera", "#talk", "re2", "bob", parent_id="n1")
    await mb.ring("api.tb", 1)
    assert [m["parent_id"] for m in await mb.drain()] == ["msg-parent-not-found"]


async def test_files_cross_both_ways_as_base64_and_extra_passes_untouched(mb: Mb) -> None:
    data = bytes(range(256))
    extra = {"file": [{"Name": "a.bin", "Data": base64.b64encode(data).decode(), "Comment": "c"}],
             "talkbridge": ["mark"], "other": [{"b": 1, "a": [True, None, "x"]}]}  # fmt: skip
    status, answer = await mb.post({"text": "", "username": "u", "gateway": "gw1", "Extra": extra})
    assert status == 200
    sent = {"Name": "a.bin", "Data": base64.b64encode(data).decode(), "Comment": "c", "URL": "", "Size": 0,
            "Avatar": False, "SHA": "", "NativeID": ""}  # fmt: skip
    assert answer["Extra"] == {**extra, "file": [sent]}
    (irc,) = await mb.heard("irc.libera", 1)
    assert irc["Extra"] == {**extra, "file": [sent]}  # a file alone is not an empty message
    await mb.server.say("irc.libera", "#talk", "pic", "bob", extra={"file": [{"Name": "p.png", "Data": "aGk="}]})
    await mb.ring("api.tb", 1)
    (msg,) = await mb.drain()
    assert msg["Extra"]["file"][0]["Data"] == "aGk=" and msg["Extra"]["file"][0]["Name"] == "p.png"
    for file, message in [
        ({"Name": "x", "Data": "%%%"}, "Internal Server Error"),  # base64's error, returned bare
        ({"Name": "x", "Data": 5}, "Internal Server Error"),  # mapstructure: "... got float64"
        ({"Name": "x", "Data": [104, 105]}, "invalid format for data"),  # decoded, but no string
        ({"Name": "x", "Data": [104, -1]}, "Internal Server Error"),  # mapstructure: "-1 overflows uint"
        ({"Name": "x"}, "invalid format for data"),
        ("x", "invalid format for extra"),
        ({"Name": 5, "Data": "aGk="}, None),  # mapstructure's errors ignored: one says "got string"
    ]:
        status, answer = await mb.post({"text": "f", "gateway": "gw1", "Extra": {"file": [file]}})
        assert (status, answer.get("message")) == ((200, None) if message is None else (500, message))


# --- the ring and its readers ----------------------------------------------------------------------------------------


async def test_the_ring_holds_buffer_messages_overwrites_the_oldest_and_a_drain_leaves_the_default_capacity(
    mb: Mb,
) -> None:
    for i in range(5):
        await mb.server.say("irc.libera", "#talk", f"m{i}", "bob")
    await until(lambda: len(mb.server.heard("xmpp.out")) == 5)
    assert mb.server.ring("api.tb") == 3  # Buffer = 3
    assert [m["text"] for m in await mb.drain()] == ["m2", "m3", "m4"]
    async with mb.http.get(mb.tb + "/api/messages", headers=AUTH) as r:
        assert (await r.read(), r.headers["Content-Type"]) == (b"[]\n", "application/json; charset=UTF-8")
    for i in range(12):  # handleMessages put a zero Ring in place: golang-ring's DefaultCapacity, 10
        await mb.server.say("irc.libera", "#talk", f"n{i}", "bob")
    await until(lambda: len(mb.server.heard("xmpp.out")) == 17)
    assert [m["text"] for m in await mb.drain()] == [f"n{i}" for i in range(2, 12)]


async def test_the_stream_greets_then_dequeues_and_what_came_meanwhile_is_handed_over_next_time(mb: Mb) -> None:
    await mb.server.say("irc.libera", "#talk", "before", "bob")
    await mb.ring("api.tb", 1)
    async with mb.http.get(mb.tb + "/api/stream", headers=AUTH) as r:
        assert r.headers["Content-Type"] == "application/json"
        greeting = json.loads(await r.content.readline())
        assert (greeting["event"], greeting["text"], greeting["Extra"]) == ("api_connected", "", None)
        assert json.loads(await r.content.readline())["text"] == "before"
        assert mb.server.ring("api.tb") == 0  # dequeued: gone from the ring
        await mb.server.say("irc.libera", "#talk", "during", "bob")
        assert json.loads(await r.content.readline())["text"] == "during"
    await until(lambda: mb.server.streams("api.tb") == 0, what="the closed stream noticed")
    await mb.server.say("irc.libera", "#talk", "after1", "bob")
    await mb.server.say("irc.libera", "#talk", "after2", "bob")
    await mb.ring("api.tb", 2)  # no stream connected: they wait
    async with mb.http.get(mb.tb + "/api/stream", headers=AUTH) as r:
        lines = [json.loads(await r.content.readline()) for _ in range(3)]
    assert [m["event"] or m["text"] for m in lines] == ["api_connected", "after1", "after2"]


async def test_what_a_stream_wrote_to_a_client_that_then_dies_is_gone(mb: Mb) -> None:
    """Dequeue is the hand-over: no acknowledgement. A client killed after the
    write and before it used the line has lost the message, and Matterbridge
    has nothing left to give the next one."""
    async with mb.http.get(mb.tb + "/api/stream", headers=AUTH) as r:
        await r.content.readline()  # the greeting
        await mb.server.say("irc.libera", "#talk", "in flight", "bob")
        await until(lambda: len(mb.server.heard("xmpp.out")) == 1 and mb.server.ring("api.tb") == 0)
        r.connection.transport.abort()  # the client dies without reading the line
    await until(lambda: mb.server.streams("api.tb") == 0, what="the dead stream noticed")
    async with mb.http.get(mb.tb + "/api/stream", headers=AUTH) as r:
        await r.content.readline()
        await mb.server.say("irc.libera", "#talk", "next", "bob")
        assert json.loads(await r.content.readline())["text"] == "next"  # "in flight" is not handed over again


async def test_websocket_greets_broadcasts_and_leaves_the_ring_full(mb: Mb) -> None:
    async with (
        mb.http.ws_connect(mb.tb + "/api/websocket", headers=AUTH) as a,
        mb.http.ws_connect(mb.tb + "/api/websocket", headers=AUTH) as b,
    ):
        for ws in (a, b):
            assert json.loads(await ws.receive_str())["event"] == "api_connected"
        await mb.server.say("irc.libera", "#talk", "to all", "bob")
        assert json.loads(await a.receive_str())["text"] == "to all"
        assert json.loads(await b.receive_str())["text"] == "to all"
        assert mb.server.ring("api.tb") == 1  # the websocket never dequeues
        await a.send_str(json.dumps({"text": "from a", "username": "al", "gateway": "gw1", "channel": "x"}))
        other = json.loads(await b.receive_str())  # BroadcastOthers, with the fixed fields
        assert (other["text"], other["channel"], other["account"], other["protocol"]) == ("from a", "api", "api.tb",
                                                                                          "api")  # fmt: skip
        await a.send_bytes(json.dumps({"text": "binary", "gateway": "gw1"}).encode())  # no binary handler: ignored
        await a.send_str("{not json")  # logged and dropped
        await mb.server.say("irc.libera", "#talk", "sentinel", "bob")
        assert json.loads(await a.receive_str())["text"] == "sentinel"  # not its own frame, nor the binary one
        assert [m["text"] for m in await mb.heard("irc.libera", 1)] == ["from a"]
        await a.send_str(json.dumps({"text": "x" * 600, "gateway": "gw1"}))  # past melody's MaxMessageSize, 512
        closing = await a.receive()
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1009)  # gorilla: CloseMessageTooBig
    async with mb.http.get(mb.tb + "/api/websocket", headers=AUTH) as r:  # not an upgrade: gorilla's refusal
        assert (r.status, await r.text()) == (400, "Bad Request\n")


async def test_a_websocket_client_that_answers_no_ping_is_cut_off_after_the_pong_wait() -> None:
    port = free_port()
    cfg = config(port, free_port())
    async with MatterbridgeServer(cfg, ping_period=0.2, pong_wait=0.5), aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{port}/api/websocket", headers=AUTH, autoping=False) as ws:
            assert json.loads(await ws.receive_str())["event"] == "api_connected"
            assert (await ws.receive()).type is aiohttp.WSMsgType.PING  # melody's writePump, every PingPeriod
            while (msg := await ws.receive()).type is aiohttp.WSMsgType.PING:
                pass  # unanswered: the read deadline (PongWait) is never extended
            assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)  # cut, no close frame
        async with http.ws_connect(f"http://127.0.0.1:{port}/api/websocket", headers=AUTH) as ws:
            assert json.loads(await ws.receive_str())["event"] == "api_connected"


async def test_stopping_cuts_streams_and_websockets_and_a_start_has_an_empty_ring(mb: Mb) -> None:
    await mb.server.say("irc.libera", "#talk", "lost", "bob")
    await mb.ring("api.tb", 1)
    assert [m["text"] for m in await mb.drain(mb.two)] == ["lost"]  # api.tb keeps its copy
    async with mb.http.get(mb.two + "/api/stream") as stream, mb.http.ws_connect(mb.two + "/api/websocket") as ws:
        await stream.content.readline()
        await ws.receive_str()
        await mb.server.stop()
        assert (await ws.receive()).type is aiohttp.WSMsgType.CLOSED
        assert await stream.content.read() == b""
    await mb.server.start()
    assert mb.server.ring("api.tb") == 0
    async with mb.http.get(mb.tb + "/api/messages", headers=AUTH) as r:
        assert await r.read() == b"[]\n"


# --- the real process ------------------------------------------------------------------------------------------------


def process_config(tb: int, control: int) -> dict[str, Any]:
    cfg = config(tb, free_port())
    cfg["control"] = f"127.0.0.1:{control}"
    return cfg


@pytest.fixture(scope="module")
def process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MatterbridgeProcess, str]]:
    tb = free_port()
    with MatterbridgeProcess(process_config(tb, free_port()), tmp_path_factory.mktemp("mb")) as proc:
        yield proc, f"http://127.0.0.1:{tb}"


def test_a_sigkilled_and_restarted_matterbridge_has_lost_its_ring(process: tuple[MatterbridgeProcess, str]) -> None:
    proc, base = process
    proc.say("irc.libera", "#talk", "buffered", "bob")
    wait_for(lambda: proc.ring("api.tb") == 1, what="the message in the ring")
    proc.kill()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/api/health", headers=AUTH)
    proc.start()
    assert proc.ring("api.tb") == 0
    assert httpx.get(f"{base}/api/messages", headers=AUTH).text == "[]\n"
    proc.say("irc.libera", "#talk", "after", "bob")
    wait_for(lambda: proc.ring("api.tb") == 1, what="routing after the restart")
    assert [m["text"] for m in httpx.get(f"{base}/api/messages", headers=AUTH).json()] == ["after"]


# --- property: any JSON body ------------------------------------------------------------------------------------------

STRING_KEYS = ["text", "Text", "TEXT", "channel", "username", "userid", "avatar", "account", "event", "protocol",
               "gateway", "Gateway", "parent_id", "id", "ID"]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
EXTRA = st.dictionaries(st.text(max_size=6).filter(lambda k: k.lower() != "file"), JSON, max_size=3)
BODY = st.one_of(
    JSON,
    st.dictionaries(
        st.sampled_from([*STRING_KEYS, "timestamp", "Extra", "extra"]) | st.text(max_size=6),
        st.one_of(JSON, EXTRA),
        max_size=6,
    ),
)


def go_status(body: Any) -> int:
    """What Matterbridge answers a JSON body (Extra without files): 400 when
    encoding/json refuses it into config.Message, else 200."""
    if body is None:
        return 200
    if not isinstance(body, dict):
        return 400
    for key, value in body.items():
        name = key.lower()
        if value is None:
            continue
        if name in {k.lower() for k in STRING_KEYS} and not isinstance(value, str):
            return 400
        if name == "timestamp" and not (isinstance(value, str) and GO_TIME.match(value)):
            return 400
        if name == "extra" and (not isinstance(value, dict) or any(
                v is not None and not isinstance(v, list) for v in value.values())):  # fmt: skip
            return 400
    return 200


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODY)
def test_any_json_post_gets_go_s_status_and_the_server_stays_up(
    process: tuple[MatterbridgeProcess, str], body: Any
) -> None:
    _proc, base = process
    response = httpx.post(f"{base}/api/message", content=json.dumps(body), headers={**AUTH,
                          "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == go_status(body), response.text
    assert set(response.json()) == ({"message"} if response.status_code != 200 else set(response.json()))
    assert httpx.get(f"{base}/api/health", headers=AUTH).text == "OK"


TOKENS = st.sampled_from(['{', '}', '[', ']', ',', ':', '"a"', '"\\u00e9"', '"\\x"', '1', '-0.5e3', '01', 'true',
                          'nul', ' ', '\n', '"', '\\', '1.', '-'])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(text=st.lists(TOKENS, max_size=12).map("".join))
def test_the_go_scanner_accepts_exactly_what_a_json_parser_does(text: str) -> None:
    """goscan follows Go's grammar, which is JSON's: a strict parser agrees
    on every token soup (Python's would also take NaN and Infinity: not drawn)."""
    try:
        json.loads(text)
        valid = True
    except ValueError:
        valid = False
    try:
        decode_whole(text.encode())
        accepted = True
    except (SyntaxErr, UnexpectedEOF):
        accepted = False
    assert accepted == valid, text
