"""``talkbridge run`` as a real process, a client of a Matterbridge 1.26 (the
suite's tests/mbserver, a real process too) through its api account
``api.tb``, which sits in the Matterbridge gateway ``team`` with an IRC
account. talkbridge's gateway ``g`` joins that Matterbridge gateway to a Talk
room (the Talk test server, a user account) and an ``api`` account of its own.

Shown here: text, ``/me``, files and replies cross both ways; nothing echoes,
also where Matterbridge's config hands our posts back to us; a Matterbridge
killed and restarted loses nothing talkbridge had to post (deliveries wait);
a talkbridge SIGKILLed loses nothing Matterbridge buffered meanwhile and
relays nothing twice; in each of the three receive modes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from bridge.events import event_from_wire
from bridge.keys import account_key, dead_letters_key, inbound_key, installation_mark_key
from tests.helpers import SENTINEL, ConfigToml, Daemon, RedisServer, free_port, has_sentinel, through_sentinel, wait_for
from tests.mbserver.rig import MatterbridgeProcess
from tests.nctalk_rig import PASSWORD, user_section
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor, Message

ROOM = "teamroom"
IRC, MB_API = "irc.libera", "api.tb"
MB_TOKEN, API_TOKEN = "mb-token", "api-token"


@dataclass
class Bridged:
    talk: ThreadedTalkServer
    mb: MatterbridgeProcess
    daemon: Daemon
    api_port: int
    alice: Actor  # in the Talk room
    redis: sync_redis.Redis
    sentinels: int = 0  # sent so far, each side

    # the Talk room -----------------------------------------------------------------
    def in_talk(self, sentinels: bool = False) -> list[Message]:
        """What the bridge's user posted in the room."""
        posted = [m for m in self.talk.call("messages", ROOM) if m.actor.id == "bridge"]
        return [m for m in posted if sentinels or not has_sentinel(m.message)]

    def published(self) -> list[str]:
        """The texts of every event the matterbridge account published (its inbound stream)."""
        rows = self.redis.xrange(inbound_key("tb", "matterbridge.mb"))
        return [event_from_wire(fields[b"d"]).text for _id, fields in rows]

    def delivery_errors(self, kind: str) -> float:
        """The daemon's failed attempts to deliver to Matterbridge, of one kind (its /metrics)."""
        text = httpx.get(f"http://127.0.0.1:{self.daemon.http_port}/metrics", timeout=5).text
        line = f'talkbridge_delivery_errors_total{{account="matterbridge.mb",kind="{kind}"}} '
        return next((float(row[len(line) :]) for row in text.splitlines() if row.startswith(line)), 0.0)

    # IRC, on the Matterbridge side -----------------------------------------------------
    def irc_says(self, text: str, nick: str = "ircbob", **more: Any) -> None:
        self.mb.say(IRC, "#team", text, nick, userid=f"{nick}!u@host", **more)

    def on_irc(self, sentinels: bool = False) -> list[dict[str, Any]]:
        return [m for m in self.mb.heard(IRC) if sentinels or not has_sentinel(m["text"])]

    # talkbridge's own api account ---------------------------------------------------------
    def api_post(self, **message: Any) -> None:
        resp = httpx.post(f"http://127.0.0.1:{self.api_port}/api/message", json={"gateway": "g", **message},
                          headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=5)  # fmt: skip
        assert resp.status_code == 200, resp.text

    def api_messages(self, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Everything the api account was given so far, kept in ``seen`` (each read drains)."""
        resp = httpx.get(f"http://127.0.0.1:{self.api_port}/api/messages",
                         headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=5)  # fmt: skip
        resp.raise_for_status()
        seen.extend(resp.json())
        return seen

    def settle(self) -> None:
        """A sentinel from IRC and one from Talk, each waited for on the other
        side: whatever would echo or arrive twice arrives before them."""

        def say() -> None:
            self.irc_says(SENTINEL)
            self.talk.call("post", ROOM, self.alice, SENTINEL)

        def seen() -> list[str]:
            return [m.message for m in self.in_talk(True)] + [m["text"] for m in self.on_irc(True)]

        self.sentinels += 2
        through_sentinel(say, seen, has_sentinel, count=self.sentinels, what="a sentinel each way")


def mb_config(mb_port: int, control: int, extra_api: int | None = None) -> dict[str, Any]:
    accounts: dict[str, Any] = {
        MB_API: {"BindAddress": f"127.0.0.1:{mb_port}", "Token": MB_TOKEN, "Buffer": 100},
        IRC: {"RemoteNickFormat": "[{PROTOCOL}] <{NICK}> "},
    }
    inout = [{"account": MB_API, "channel": "api"}, {"account": IRC, "channel": "#team"}]
    if extra_api is not None:  # the echo test: the gateway joins two api accounts, and nothing else
        accounts["api.tb2"] = {"BindAddress": f"127.0.0.1:{extra_api}", "Token": MB_TOKEN, "Buffer": 100}
        inout = [{"account": MB_API, "channel": "api"}, {"account": "api.tb2", "channel": "api"}]
    return {"accounts": accounts, "gateways": [{"name": "team", "inout": inout}], "control": f"127.0.0.1:{control}"}


def tb_config(tmp_path: Path, redis_url: str, talk_url: str, http: int, api: int, mb_port: int, *,
              receive: str = "auto", extra_mb: int | None = None) -> Path:  # fmt: skip
    config = ConfigToml().general()
    mb = {"URL": f"http://127.0.0.1:{mb_port}", "Token": MB_TOKEN, "Receive": receive,
          "RemoteNickFormat": "{NICK}@{BRIDGE}", "ReconnectMinSeconds": 0.2, "ReconnectMaxSeconds": 1,
          "PollSeconds": 0.2}  # fmt: skip
    config.section("matterbridge.mb", **mb)
    entries = [("matterbridge.mb", "team"), ("nctalk.user", ROOM), ("api.a", "api")]
    if extra_mb is not None:
        config.section("matterbridge.mb2", **{**mb, "URL": f"http://127.0.0.1:{extra_mb}"})
        entries.append(("matterbridge.mb2", "team"))
    config.api("a", api, API_TOKEN).raw(user_section("user", talk_url, PollTimeout=5))
    config.gateway("g", *entries)
    return config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05).write(tmp_path / "talkbridge.toml")


def start(tmp_path: Path, redis_server: RedisServer, receive: str = "auto", echo: bool = False) -> Iterator[Bridged]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    talk = ThreadedTalkServer(version=21, bruteforce_delay_scale=0).start()
    http, api, mb_port, control = free_port(), free_port(), free_port(), free_port()
    extra = free_port() if echo else None
    alice = talk.call("add_user", "alice", "Alice")
    bridge = talk.call("add_user", "bridge", "Bridge", password=PASSWORD)
    talk.call("create_room", "Team", ROOM, (alice, bridge))
    mb = MatterbridgeProcess(mb_config(mb_port, control, extra), tmp_path).start()
    path = tb_config(tmp_path, redis_server.url, talk.url, http, api, mb_port, receive=receive, extra_mb=extra)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        bridged = Bridged(talk, mb, daemon, api, alice, client)
        if not echo:
            bridged.settle()  # every side connected: the Talk room polled, Matterbridge's ring drained
        yield bridged
    finally:
        daemon.stop()
        mb.stop()
        talk.stop()
        client.close()


@pytest.fixture
def bridged(request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer) -> Iterator[Bridged]:
    """The whole set-up; ``indirect`` parameters: ``receive`` (the mode), ``echo``."""
    yield from start(tmp_path, redis_server, **getattr(request, "param", {}))


@pytest.mark.parametrize(
    "bridged",
    [{"receive": mode} for mode in ("websocket", "stream", "poll")],
    indirect=True,
    ids=lambda p: p["receive"],
)
def test_text_and_files_cross_both_ways_with_nicks_in_each_receive_mode(bridged: Bridged) -> None:
    b = bridged
    b.irc_says("hello from irc")
    b.talk.call("post", ROOM, b.alice, "hello from talk")
    data = b"a file from irc"
    b.irc_says(
        "see file",
        extra={"file": [{"Name": "irc.txt", "Data": base64.b64encode(data).decode(), "Comment": "see file"}]},
    )
    b.talk.call("post_file", ROOM, b.alice, "talk.txt", b"a file from talk", "from talk")
    b.settle()
    texts = [m.message for m in b.in_talk()]
    assert texts[0] == "[irc/libera] <ircbob> hello from irc"  # {PROTOCOL}/{BRIDGE}: where it was written
    [filed] = [m for m in b.in_talk() if m.share is not None]
    assert filed.message == "[irc/libera] <ircbob> see file"
    assert b.talk.call("file_of", filed, "alice") == data
    assert len(texts) == 2
    irc = b.on_irc()
    assert [(m["username"], m["text"]) for m in irc if not (m["Extra"] or {}).get("file")] == [
        ("[api] <Alice@user> ", "hello from talk")
    ]
    [irc_file] = [m for m in irc if (m["Extra"] or {}).get("file")]
    [info] = irc_file["Extra"]["file"]
    assert info["Name"] == "talk.txt" and base64.b64decode(info["Data"]) == b"a file from talk"
    assert len(irc) == 2


def test_actions_and_replies_cross_between_matterbridge_talk_and_the_api(bridged: Bridged) -> None:
    b = bridged
    api_seen: list[dict[str, Any]] = []
    # /me from IRC: an action at the api account, its text in Talk (Talk has no /me)
    b.irc_says("waves", event="user_action")
    at_api = wait_for(lambda: [m for m in b.api_messages(api_seen) if m["text"] == "waves"], what="the action")
    assert at_api[0]["event"] == "user_action" and at_api[0]["username"] == "[irc/libera] <ircbob> "
    assert (at_api[0]["account"], at_api[0]["protocol"]) == (IRC, "irc")  # where it was written, as Matterbridge says
    # /me from the api account: an action on IRC
    b.api_post(text="nods", username="zoe", event="user_action")
    nod = wait_for(lambda: [m for m in b.on_irc() if m["text"] == "nods"], what="the api's action on IRC")
    assert nod[0]["event"] == "user_action" and nod[0]["username"] == "[api] <zoe@a> "

    # a question from IRC, answered in Talk and at the api: both threaded on its copies
    b.irc_says("question from irc")
    [question] = wait_for(lambda: [m for m in b.in_talk() if m.message.endswith("question from irc")], what="q")
    q_api = wait_for(lambda: [m for m in b.api_messages(api_seen) if m["text"] == "question from irc"], what="q api")
    b.talk.call("post", ROOM, b.alice, "answer from talk", question.id)
    b.api_post(text="answer from the api", username="zoe", parent_id=q_api[0]["id"])
    in_talk = wait_for(lambda: [m for m in b.in_talk() if m.message.endswith("answer from the api")], what="a")
    assert in_talk[0].parent_id == question.id  # the api's answer threads on the question's Talk copy
    at_api_answer = wait_for(
        lambda: [m for m in b.api_messages(api_seen) if m["text"] == "answer from talk"], what="talk's answer at api"
    )
    assert at_api_answer[0]["parent_id"] == q_api[0]["id"]
    # towards Matterbridge both answers name their parent; 1.26 resolves no api-given id,
    # so IRC gets them as replies whose parent was not found (Slack shows "[thread]: ")
    answers = wait_for(lambda: [m for m in b.on_irc() if m["text"].startswith("answer from")] or None, what="irc")
    wait_for(lambda: len([m for m in b.on_irc() if m["text"].startswith("answer from")]) == 2, what="both answers")
    answers = [m for m in b.on_irc() if m["text"].startswith("answer from")]
    assert {m["parent_id"] for m in answers} == {"msg-parent-not-found"}

    # a reply made on Matterbridge's side arrives as a message (1.26 gives an api account no parent it can use)
    b.irc_says("a reply from irc", parent_id="1234")
    reply = wait_for(lambda: [m for m in b.in_talk() if m.message.endswith("a reply from irc")], what="irc reply")
    assert reply[0].parent_id is None
    b.settle()
    assert len([m for m in b.in_talk() if m.message.endswith("a reply from irc")]) == 1


@pytest.mark.parametrize("bridged", [{"echo": True}], indirect=True, ids=["echo"])
def test_nothing_echoes_even_when_matterbridge_hands_our_posts_back(bridged: Bridged) -> None:
    """A Matterbridge gateway that joins two api accounts, each with a
    talkbridge account on it, both in the Talk room's gateway: what talkbridge
    posts through one, Matterbridge hands to the other. Without the mark on
    our posts, each Talk message would come back twice."""
    b = bridged
    wait_for(lambda: b.redis.hlen(account_key("tb", "nctalk.user", "talk-cursors")), what="the Talk room polled")

    def handed_back() -> tuple[int, int]:  # what each account was handed: the other's posts
        return tuple(b.redis.zcard(account_key("tb", f"matterbridge.{n}", "mb-seen")) for n in ("mb", "mb2"))

    b.talk.call("post", ROOM, b.alice, "said once in talk")
    wait_for(lambda: handed_back() == (1, 1), what="each post handed to the other account")
    b.talk.call("post", ROOM, b.alice, SENTINEL)
    wait_for(lambda: handed_back() == (2, 2), what="the sentinel handed back too")
    assert b.in_talk(sentinels=True) == []  # nothing came back into the room
    assert b.redis.get(installation_mark_key("tb"))


def test_a_matterbridge_restart_loses_nothing_talkbridge_had_to_post(bridged: Bridged) -> None:
    b = bridged
    b.mb.kill()  # its ring and everything it heard are gone with it
    for i in range(3):
        b.talk.call("post", ROOM, b.alice, f"while matterbridge is down {i}")
    # away for longer than a delivery's attempts (MaxDeliveries, 5) would last: it waits, not spends them
    wait_for(lambda: b.delivery_errors("unavailable") >= 6, timeout=30, what="the deliveries waiting for Matterbridge")
    b.mb.start()
    b.sentinels -= 1  # what IRC heard before (the first settle's sentinel) went with the old process
    wait_for(lambda: len(b.on_irc()) == 3, timeout=30, what="the three posts after Matterbridge is back")
    b.irc_says("after the restart")
    wait_for(lambda: [m for m in b.in_talk() if m.message.endswith("after the restart")], what="irc after restart")
    b.settle()
    assert [m["text"] for m in b.on_irc()] == [f"while matterbridge is down {i}" for i in range(3)]
    assert b.redis.xlen(dead_letters_key("tb")) == 0 and b.delivery_errors("transient") == 0


def test_a_talkbridge_sigkill_loses_nothing_matterbridge_buffered_and_relays_nothing_twice(bridged: Bridged) -> None:
    b = bridged
    for i in range(3):
        b.irc_says(f"before the kill {i}")
    wait_for(lambda: len(b.in_talk()) == 3, what="three relayed before the kill")
    wait_for(lambda: b.mb.ring(MB_API) == 0, what="the stream beside the websocket taking the ring")
    b.daemon.kill()
    for i in range(5):
        b.irc_says(f"while talkbridge is dead {i}")
    wait_for(lambda: b.mb.ring(MB_API) == 5, what="Matterbridge buffering the five")
    b.daemon.start()
    b.settle()
    # the new daemon published the five and the settle's sentinel, nothing of before
    metrics = httpx.get(f"http://127.0.0.1:{b.daemon.http_port}/metrics", timeout=5).text
    assert 'talkbridge_events_in_total{account="matterbridge.mb"} 6.0' in metrics
    assert [m.message.split("> ", 1)[1] for m in b.in_talk()] == [
        *(f"before the kill {i}" for i in range(3)),
        *(f"while talkbridge is dead {i}" for i in range(5)),
    ]


def test_a_sigkill_in_the_middle_of_a_burst_relays_each_message_once_in_order(bridged: Bridged) -> None:
    """Killed while messages arrive, some received and not committed: the ring
    still holds them (1.26's websocket never takes from it), the next daemon
    drains it and relays each once, in IRC's order."""
    b = bridged
    texts = [f"burst {i:02d}" for i in range(40)]
    for text in texts[:20]:
        b.irc_says(text)
    wait_for(lambda: len(b.in_talk()) >= 5, what="the burst under way")
    b.daemon.kill()
    for text in texts[20:]:
        b.irc_says(text)
    b.daemon.start()
    b.settle()
    assert [m.message.split("> ", 1)[1] for m in b.in_talk()] == texts
    # each was published once: what the dead daemon had committed, the stream's hand-over (and the
    # websocket's copy) did not publish again (the id map would have held a second copy back)
    assert sorted(t for t in b.published() if t.startswith("burst")) == texts
