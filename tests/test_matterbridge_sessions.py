"""The websocket with the stream beside it (adapters/matterbridge/sessions.py
``WebsocketSession``), step by step, with a scripted websocket and stream:
the order in which it hands messages over while the stream hands over the
backlog, once it is caught up, when the websocket falls behind the stream
(a burst larger than the ring), when melody drops a frame, and when the
websocket closes with lines in hand. Real connections: the hostile and
end-to-end tests."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.matterbridge.sessions import Lost, WebsocketSession, stamp_of


def msg(n: int) -> dict[str, Any]:
    """Message ``n``, stamped by the router n microseconds into a second (router order = n order)."""
    return {"text": f"m{n}", "gateway": "gw", "timestamp": f"2026-12-07T23:00:00.{n:06d}000Z", "Extra": None}


class Frames:
    """A websocket whose frames a test sends."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[aiohttp.WSMessage] = asyncio.Queue()

    def send(self, *messages: dict[str, Any]) -> None:
        for m in messages:
            self.queue.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, orjson.dumps(m).decode(), None))

    def hang_up(self) -> None:
        self.queue.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, 1000, "bye"))

    async def receive(self) -> aiohttp.WSMessage:
        return await self.queue.get()

    def exception(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Lines:
    """A stream whose lines a test writes (each ``send`` one read's worth)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
        self.buffered: list[dict[str, Any]] = []

    def send(self, *messages: dict[str, Any]) -> None:
        self.queue.put_nowait(list(messages))

    async def next(self) -> list[dict[str, Any]]:
        return await self.queue.get()

    def complete(self) -> list[dict[str, Any]]:
        out, self.buffered = self.buffered, []
        return out

    async def close(self) -> None:
        return None


async def texts(session: WebsocketSession) -> list[str]:
    return [m["text"] for m in await asyncio.wait_for(session.next(), 5)]


@pytest.fixture
def parts() -> tuple[Frames, Lines, WebsocketSession]:
    ws, stream = Frames(), Lines()
    return ws, stream, WebsocketSession(ws, stream, [])  # type: ignore[arg-type]


def test_a_timestamp_reads_to_the_nanosecond_in_any_zone() -> None:
    assert stamp_of(msg(1)) == stamp_of({"timestamp": "2026-12-08T00:00:00.000001+01:00"})
    assert stamp_of({"timestamp": "2026-12-07T23:00:00Z"}) + 1000 == stamp_of(msg(1))
    assert stamp_of({"timestamp": "yesterday"}) is None and stamp_of({}) is None and stamp_of([]) is None


async def test_the_backlog_comes_first_then_what_the_websocket_held(parts) -> None:
    ws, stream, session = parts
    ws.send(msg(10), msg(11))  # live, while the stream hands over the backlog
    stream.send(msg(1))
    assert await texts(session) == ["m1"]
    stream.send(msg(2), msg(10))  # the stream reaches what the websocket has: caught up
    assert await texts(session) == ["m2", "m10", "m10", "m11"]  # the second m10 is skipped by its digest
    assert not session.catching_up


async def test_a_silent_stream_ends_the_catch_up(parts) -> None:
    ws, stream, session = parts
    ws.send(msg(10))
    stream.send(msg(1))
    assert await texts(session) == ["m1"]
    assert await texts(session) == ["m10"]  # QUIET later


async def test_a_websocket_behind_the_stream_keeps_its_order(parts) -> None:
    """A burst larger than the ring: the stream hands over a message the
    websocket has not brought yet; it waits for it (found by bench/matterbridge.py)."""
    ws, stream, session = parts
    ws.send(msg(1))
    stream.send(msg(1))
    assert await texts(session) == ["m1", "m1"]  # caught up
    stream.send(msg(5))  # newer than the websocket's newest (m1): held
    assert await texts(session) == []
    ws.send(msg(2))
    assert await texts(session) == ["m2"]
    ws.send(msg(5))
    assert await texts(session) == ["m5"]  # the websocket's copy, in its place; the stream's is gone
    ws.send(msg(6))
    assert await texts(session) == ["m6"]


async def test_a_frame_melody_dropped_comes_from_the_stream_before_what_followed_it(parts) -> None:
    ws, stream, session = parts
    ws.send(msg(1))
    stream.send(msg(1))
    assert await texts(session) == ["m1", "m1"]
    stream.send(msg(2))  # the websocket never brings m2
    assert await texts(session) == []
    ws.send(msg(3))
    assert await texts(session) == ["m2", "m3"]


async def test_what_the_stream_gave_is_handed_over_when_the_websocket_closes(parts) -> None:
    ws, stream, session = parts
    ws.send(msg(1))
    stream.send(msg(1))
    assert await texts(session) == ["m1", "m1"]
    stream.send(msg(4))
    assert await texts(session) == []  # held: the websocket may yet bring it
    stream.buffered = [msg(5)]  # read, not yet handed over
    ws.hang_up()
    assert await texts(session) == ["m4", "m5"]  # Matterbridge dequeued them: kept
    with pytest.raises(Lost, match="websocket closed"):
        await session.next()
