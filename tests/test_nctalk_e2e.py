"""``talkbridge run`` as a real process with seed 002's gateway: two Talk
test-server instances, a technical user with an app password on each, one
room on each — plus an ``api`` account in the same gateway. Everything
crosses both ways; a SIGKILL loses and repeats nothing."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from bridge.keys import account_key
from tests.helpers import SENTINEL, Daemon, RedisServer, free_port, has_sentinel, through_sentinel, wait_for
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor, Message

A, B = "nctalk.nube-minube1-com", "nctalk.nube-minube2-com"
TOKEN1, TOKEN2 = "token1", "token2"
PW1, PW2 = "Aaaaa-Bbbbb-Ccccc-Ddddd-Eeeee", "Fffff-Ggggg-Hhhhh-Iiiii-Jjjjj"

# Seed 002's matterbridge.toml as its users have it (straight quotes), with
# only Server and the credentials changed; our own sections below it.
SEED_002 = """
## Account 1 - matterbot@nube.nube1.com
[nctalk.nube-minube1-com]
Server="{server1}"
Login="matterbot"
Password="{pw1}"
RemoteNickFormat="[{{NICK}}@{{BRIDGE}}] "
## Account 2 - matterbot@nube.nube2.com
[nctalk.nube-minube2-com]
Server="{server2}"
Login="matterbot"
Password="{pw2}"
RemoteNickFormat="[{{NICK}}@{{BRIDGE}}] "
## Gateway 1
[[gateway]]
name="gateway-minube1-minube2"
enable=true
[[gateway.inout]]
account="nctalk.nube-minube1-com"
channel="token1"
[[gateway.inout]]
account="nctalk.nube-minube2-com"
channel="token2"
"""


@dataclass
class Fed:
    one: ThreadedTalkServer
    two: ThreadedTalkServer
    daemon: Daemon
    redis: sync_redis.Redis
    laura: Actor  # on cloud 1
    marcos: Actor  # on cloud 2
    api_port: int

    def bridged(self, talk: ThreadedTalkServer, token: str) -> list[Message]:
        return [m for m in talk.call("messages", token) if m.actor.id == "matterbot"]

    def api_messages(self) -> list[dict]:
        resp = httpx.get(f"http://127.0.0.1:{self.api_port}/api/messages", headers={"Authorization": "Bearer t"})
        return resp.json()


def write(tmp_path: Path, redis_url: str, one: str, two: str, http: int, api: int | None) -> Path:
    text = SEED_002.format(server1=one, server2=two, pw1=PW1, pw2=PW2)
    if api is not None:
        text += f'\n[api.a]\nBindAddress = "127.0.0.1:{api}"\nToken = "t"\n'
        text += '[[gateway.inout]]\naccount = "api.a"\nchannel = "api"\n'
    text += f'\n[redis]\nURL = "{redis_url}"\n[http]\nBindAddress = "127.0.0.1:{http}"\n'
    text += "[bus]\nLeaseSeconds = 2\nRetryBaseSeconds = 0.05\n"
    path = tmp_path / "matterbridge.toml"
    path.write_text(text)
    return path


def federation(tmp_path: Path, redis_server: RedisServer, with_api: bool = True) -> Iterator[Fed]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    one = ThreadedTalkServer(version=19, bruteforce_delay_scale=0).start()
    two = ThreadedTalkServer(version=22, bruteforce_delay_scale=0).start()
    laura = one.call("add_user", "laura", "Laura")
    bot1 = one.call("add_user", "matterbot", "Matterbot", password=PW1)
    one.call("create_room", "Federada", TOKEN1, (laura, bot1))
    marcos = two.call("add_user", "marcos", "Marcos")
    bot2 = two.call("add_user", "matterbot", "Matterbot", password=PW2)
    two.call("create_room", "Federada", TOKEN2, (marcos, bot2))
    http, api = free_port(), free_port()
    path = write(tmp_path, redis_server.url, one.url, two.url, http, api if with_api else None)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    fed = Fed(one, two, daemon, client, laura, marcos, api)
    try:
        # both rooms' pollers started (a room's first read sets its cursor)
        cursors = [account_key("tb", name, "talk-cursors") for name in (A, B)]
        wait_for(lambda: all(client.hlen(key) for key in cursors), what="both rooms polled")
        yield fed
    finally:
        daemon.stop()
        one.stop()
        two.stop()
        client.close()


@pytest.fixture
def fed(tmp_path: Path, redis_server: RedisServer) -> Iterator[Fed]:
    yield from federation(tmp_path, redis_server)


def test_everything_crosses_both_ways(fed: Fed) -> None:
    f = fed
    # text, RemoteNickFormat
    original = f.one.call("post", TOKEN1, f.laura, "hola desde la nube 1")
    [copy] = wait_for(lambda: f.bridged(f.two, TOKEN2), what="the copy on cloud 2")
    assert copy.message == "[Laura@nube-minube1-com] hola desde la nube 1"
    # a reply on cloud 2 to the copy arrives on cloud 1 threaded on the original
    f.two.call("post", TOKEN2, f.marcos, "respuesta", copy.id)
    [back] = wait_for(lambda: f.bridged(f.one, TOKEN1), what="the reply on cloud 1")
    assert back.message == "[Marcos@nube-minube2-com] respuesta" and back.parent_id == original.id
    # an edit on cloud 1 edits the copy on cloud 2
    f.one.call("edit", TOKEN1, f.laura, original.id, "hola, editado")
    wait_for(lambda: f.two.state.messages[copy.id].message.endswith("hola, editado"), what="the edit")
    assert f.two.state.messages[copy.id].message == "[Laura@nube-minube1-com] hola, editado"
    # a reaction on cloud 2 to the copy lands on the original, by the bridge's user
    f.two.call("react", TOKEN2, f.marcos, copy.id, "🎉")
    wait_for(lambda: f.one.state.messages[original.id].reactions, what="the reaction")
    assert f.one.state.messages[original.id].reactions == {"🎉": ["users/matterbot"]}
    # a file from cloud 2 arrives on cloud 1 as a real file: same bytes, same name
    data = bytes(range(256)) * 30
    f.two.call("post_file", TOKEN2, f.marcos, "informe.pdf", data, "el informe")
    filed = wait_for(lambda: [m for m in f.bridged(f.one, TOKEN1) if m.share is not None], what="the file")
    [shared] = filed
    assert shared.message == "[Marcos@nube-minube2-com] el informe"
    assert f.one.call("file_of", shared, "laura") == data
    assert shared.share.mounts["laura"] == "Talk/informe.pdf"
    # a deletion on cloud 1 deletes the copy on cloud 2
    f.one.call("delete", TOKEN1, f.laura, original.id)
    wait_for(lambda: f.two.state.messages[copy.id].message_type == "comment_deleted", what="the deletion")
    # the api account saw the Talk side too, nick formatted by its own RemoteNickFormat
    seen = wait_for(lambda: [m for m in f.api_messages() if "informe" in m["text"]], what="api")
    assert seen[0]["account"] == B
    # nothing echoed: each side has exactly what the other side said (an echo
    # would arrive before the sentinel said after it on each side)
    through_sentinel(
        lambda: (f.one.call("post", TOKEN1, f.laura, SENTINEL), f.two.call("post", TOKEN2, f.marcos, SENTINEL)),
        lambda: [m.message for m in f.bridged(f.one, TOKEN1) + f.bridged(f.two, TOKEN2)],
        has_sentinel,
        count=2,
        what="a sentinel from each side",
    )
    assert [m.message_type for m in f.bridged(f.two, TOKEN2) if not has_sentinel(m.message)] == ["comment_deleted"]
    assert len([m for m in f.bridged(f.one, TOKEN1) if not has_sentinel(m.message)]) == 2  # the reply and the file


def test_api_to_talk_and_back(fed: Fed) -> None:
    f = fed
    body = {"text": "from the api", "username": "zoe", "gateway": "gateway-minube1-minube2"}
    resp = httpx.post(f"http://127.0.0.1:{f.api_port}/api/message", headers={"Authorization": "Bearer t"}, json=body)
    assert resp.status_code == 200
    wait_for(lambda: f.bridged(f.one, TOKEN1) and f.bridged(f.two, TOKEN2), what="both Talk rooms")
    assert f.bridged(f.one, TOKEN1)[0].message == "[zoe@a] from the api"
    data = base64.b64encode(b"voice bytes").decode()
    resp = httpx.post(f"http://127.0.0.1:{f.api_port}/api/message", headers={"Authorization": "Bearer t"},
                      json={"text": "", "username": "zoe", "gateway": "gateway-minube1-minube2",
                            "Extra": {"file": [{"Name": "nota.ogg", "Data": data}]}})  # fmt: skip
    assert resp.status_code == 200
    filed = wait_for(lambda: [m for m in f.bridged(f.two, TOKEN2) if m.share is not None], what="the api file")
    assert f.two.call("file_of", filed[0], "marcos") == b"voice bytes"


def on_cloud_two(f: Fed) -> list[str]:
    """The copies on cloud 2, once a sentinel said on cloud 1 after them has crossed."""
    return through_sentinel(
        lambda: f.one.call("post", TOKEN1, f.laura, SENTINEL),
        lambda: [m.message for m in f.bridged(f.two, TOKEN2)],
        has_sentinel,
        what="the sentinel on cloud 2",
    )


def test_messages_posted_while_the_daemon_is_dead_arrive_once_in_order(fed: Fed) -> None:
    f = fed
    f.one.call("post", TOKEN1, f.laura, "before")
    wait_for(lambda: f.bridged(f.two, TOKEN2), what="before")
    f.daemon.kill()
    for i in range(5):
        f.one.call("post", TOKEN1, f.laura, f"while down {i}")
    f.daemon.start()
    wait_for(lambda: len(f.bridged(f.two, TOKEN2)) >= 6, what="the five while down")
    got = on_cloud_two(f)
    assert got == ["[Laura@nube-minube1-com] before"] + [f"[Laura@nube-minube1-com] while down {i}" for i in range(5)]


def test_a_kill_between_talks_201_and_the_marker_does_not_post_twice(fed: Fed) -> None:
    f = fed
    f.two.call("stall_next")
    f.one.call("post", TOKEN1, f.laura, "in the window")
    f.two.call("wait_stalled")  # stored on cloud 2, its 201 not sent
    f.daemon.kill()
    f.daemon.start()
    f.one.call("post", TOKEN1, f.laura, "after the restart")
    wait_for(lambda: len(f.bridged(f.two, TOKEN2)) >= 2, what="the next message")
    got = on_cloud_two(f)
    assert got == ["[Laura@nube-minube1-com] in the window", "[Laura@nube-minube1-com] after the restart"]


def test_check_config_accepts_seed_002(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, "redis://127.0.0.1:1/0", "https://nube.minube1.com", "https://nube.minube2.com", 1, None)
    out = subprocess.run([sys.executable, "-m", "bridge.cli", "check-config", str(path)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert A in out.stdout and B in out.stdout and PW1 not in out.stdout
