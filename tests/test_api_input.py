"""Bad input to a Matterbridge api account: refused with the reason, and
nothing published. The cases change nothing, so they share one daemon (its
module ends before the next test flushes the shared Redis)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis as sync_redis

from bridge.events import event_from_wire
from bridge.keys import inbound_key
from tests.helpers import SENTINEL, Daemon, RedisServer, has_sentinel, through_sentinel
from tests.test_api_e2e import Api, running_bridge


@pytest.fixture(scope="module")
def shared_bridge(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[Api, Api, Daemon, sync_redis.Redis]]:
    """One daemon for tests that change nothing (the bad-input cases); its own
    client, since the ``redis`` fixture flushes per test."""
    with running_bridge(tmp_path_factory.mktemp("shared-bridge"), redis_server) as running:
        yield running


@pytest.mark.parametrize(
    "headers, body, status, reason",
    [
        ({}, {"text": "x", "gateway": "g"}, 400, "missing key"),
        ({"Authorization": "Bearer wrong"}, {"text": "x", "gateway": "g"}, 401, "Unauthorized"),
        ({"Authorization": "token-a"}, {"text": "x", "gateway": "g"}, 400, "missing key"),
        (None, b"{not json", 400, "not valid JSON"),
        (None, b"[1, 2]", 400, "must be a JSON object"),
        (None, {"text": 5, "gateway": "g"}, 400, "text must be a string"),
        (None, {"text": "x", "gateway": "nope"}, 400, 'unknown gateway "nope"'),
        (None, {"text": "", "gateway": "g"}, 400, "text is empty"),
        # (a msg_delete without an id and events of other kinds are accepted: tests/test_parity_api.py)
        (None, {"text": "x", "gateway": "g", "Extra": {"file": {"Name": "a.txt"}}}, 400, "Extra.file must be a list"),
        (None, {"text": "x", "gateway": "g", "Extra": {"file": [{"Name": "../etc", "Data": "eA=="}]}}, 400, "Name"),
        (None, {"text": "x", "gateway": "g", "Extra": {"file": [{"Name": "a.txt", "Data": "%%%"}]}}, 400, "base64"),
        (None, b"x" * (2 << 20), 413, "larger than"),
    ],
)
def test_bad_input_is_refused_and_publishes_nothing(shared_bridge, headers, body, status, reason) -> None:
    a, _b, _daemon, client = shared_bridge
    sent_headers = a.headers if headers is None else headers
    if isinstance(body, bytes):
        resp = httpx.post(
            f"{a.base}/api/message", content=body, headers={**sent_headers, "Content-Type": "application/json"}
        )
    else:
        resp = httpx.post(f"{a.base}/api/message", json=body, headers=sent_headers)
    assert resp.status_code == status
    assert reason in resp.json()["message"]
    # nothing published (these cases share one daemon: nothing but the sentinels at all): a's
    # publishes go in order, so one of this request's would be in the stream before a sentinel posted now

    def published() -> list[str]:
        return [event_from_wire(fields[b"d"]).text for _id, fields in client.xrange(inbound_key("tb", "api.a"))]

    def sentinel() -> None:
        assert a.post(text=SENTINEL, username="u", gateway="g").status_code == 200

    before = len(published())  # the sentinels of the cases before
    assert through_sentinel(sentinel, published, has_sentinel, count=before + 1) == []
