"""A Redis Sentinel failover under traffic, every part real and in its own process.

tests/sentinel_rig.py runs one master, two replicas and three sentinels. Two
``talkbridge run`` instances (two api accounts and a Talk bot account in one
gateway, the management page on the first) and a ``talkbridge worker``
(Instagram previews through tests/instagram_rig.py) connect through its
``redis+sentinel://`` URL. While a client POSTs to api.a and Talk sends the
bot its webhooks (each request one message, each answered 200 recorded as
acknowledged; a 503 or a cut connection is the client's to retry, and its
message may arrive or not), and while an Instagram job waits on its fetch,
the master is SIGKILLed. After the sentinels promote a replica:

- every room receives what was acknowledged to it in order and at most once
  (a sentinel posted last, one per source, bounds "nothing more arrives");
- nothing acknowledged is lost, when ``[redis] MinReplicas`` makes an
  acknowledgement wait for a replica. Without it (0, the default) Redis
  replicates asynchronously: a write acknowledged by the master and not yet
  on the promoted replica is gone. That case is run too and its loss is
  printed, not hidden (``-s`` shows the line; docs/operations.md records the
  figures); ``MinReplicas = 1`` is run as soon as the config knows the key;
- every Instagram job ran to one preview;
- ``talkbridge status``, the management page and ``/metrics`` show the
  failover (from which master to which).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bridge.config_keys import RedisSection
from tests.admin_rig import PASSWORD_HASH, USER, AdminClient
from tests.helpers import (
    ROOT,
    SENTINEL,
    ConfigToml,
    Daemon,
    WorkerProcess,
    free_port,
    has_sentinel,
    wait_for,
    wait_quiet,
)
from tests.instagram_rig import FakeInstagram, image_item
from tests.sentinel_rig import SentinelRig, running
from tests.talkbot_rig import SECRET, bot_section
from tests.talkserver import ThreadedTalkServer

TOKEN = "failover1"
ACKED_BEFORE_KILL = (150, 15)  # api messages, Talk webhooks acknowledged before the master is killed
ACKED_AFTER_FAILOVER = (100, 10)  # and after the promoted replica took over
CLIENT_PACE = 0.005  # seconds between one client's requests: a client's pace, not synchronization
LINKS = 3  # Instagram links, one of them held mid-fetch over the failover


@dataclass
class Ledger:
    """One source's requests: acknowledged (200) and ambiguous (anything else)."""

    acked: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)


def post_as(port: int, token: str, text: str, username: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/api/message", headers={"Authorization": f"Bearer {token}"},
                      json={"text": text, "username": username, "gateway": "g"}, timeout=10)  # fmt: skip


def post_link(port: int, code: str) -> bool:
    """An Instagram link from bob in api.b; False while api.b is moving between
    the instances (its port closed: nothing was sent, so sending again is safe)."""
    try:
        resp = post_as(port, "token-b", f"https://www.instagram.com/p/{code}/", "bob")
    except httpx.ConnectError:
        return False
    assert resp.status_code == 200, resp.text
    return True


def post_api(port: int, ledger: Ledger, halt: threading.Event) -> None:
    headers = {"Authorization": "Bearer token-a"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as client:
        for i in range(100_000):
            if halt.is_set():
                return
            text = f"a{i:05d}"
            try:
                resp = client.post("/api/message", json={"text": text, "username": "alice", "gateway": "g"})
                ok = resp.status_code == 200
                assert ok or resp.status_code == 503, resp.text  # never a 500: 503 while there is no master
            except httpx.HTTPError:  # the account restarting (its lease lapsed while Redis was away)
                ok = False
            (ledger.acked if ok else ledger.ambiguous).append(text)
            time.sleep(CLIENT_PACE)


def post_talk(talk: ThreadedTalkServer, alice: object, ledger: Ledger, halt: threading.Event) -> None:
    for i in range(100_000):
        if halt.is_set():
            return
        text = f"t{i:05d}"
        talk.call("post", TOKEN, alice, text)  # returns once the webhook was answered (Talk waits)
        call = [c for c in list(talk.state.webhook_calls) if text.encode() in c.body][-1]
        assert call.status in (200, 503), call  # 503 while there is no master: never a 500, never a hang
        (ledger.acked if call.status == 200 else ledger.ambiguous).append(text)
        time.sleep(CLIENT_PACE)


@dataclass
class Outcome:
    """What one source's messages did in one room."""

    lost: list[str]
    duplicated: list[str]
    in_order: bool
    unexpected: list[str]


def outcome(received: list[str], ledger: Ledger) -> Outcome:
    dup = sorted({t for t in received if received.count(t) > 1})
    return Outcome(
        lost=[t for t in ledger.acked if t not in set(received)],
        duplicated=dup,
        in_order=received == sorted(received),
        unexpected=sorted(set(received) - set(ledger.acked) - set(ledger.ambiguous)),
    )


def body(text: str) -> str:
    """The message a relayed copy carries (the bridge prefixes a nick)."""
    return text.rsplit(" ", 1)[-1]


@pytest.fixture
def sentinel_rig(tmp_path: Path) -> Iterator[SentinelRig]:
    with running(tmp_path / "rig") as rig:
        yield rig


def config(tmp: Path, rig: SentinelRig, talk_url: str, ports: dict[str, int], http: int, admin: int,
           min_replicas: int) -> Path:  # fmt: skip
    tmp.mkdir()
    webhook = f"http://127.0.0.1:{ports['http1']}/webhook/nextcloud/ig"
    toml = ConfigToml().general().raw(bot_section("ig", talk_url, WebhookURL=webhook))
    toml.api("a", ports["a"], "token-a", Buffer=20000).api("b", ports["b"], "token-b", Buffer=20000)
    toml.gateway("g", ("api.a", "api"), ("api.b", "api"), ("nctalkbot.ig", TOKEN), Instagram=True)
    toml.section("redis", URL=rig.url, **({"MinReplicas": min_replicas} if min_replicas else {}))
    toml.section("http", BindAddress=f"127.0.0.1:{http}")
    toml.section("bus", LeaseSeconds=10, RetryBaseSeconds=0.05)
    toml.section("admin", BindAddress=f"127.0.0.1:{admin}", User=USER, Password=PASSWORD_HASH)
    return toml.write(tmp / "talkbridge.toml")


def accounts_connected(*http_ports: int) -> set[str]:
    out: set[str] = set()
    for port in http_ports:
        try:
            accounts = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json().get("accounts", {})
        except (httpx.HTTPError, ValueError):
            continue
        out |= {name for name, state in accounts.items() if state == "connected"}
    return out


class Inbox:
    """api.b's client: GET /api/messages drains, so everything read is kept."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/api/messages"
        self.got: list[str] = []

    def read(self) -> list[str]:
        try:
            resp = httpx.get(self.url, headers={"Authorization": "Bearer token-b"}, timeout=10)
        except httpx.HTTPError:  # restarting after its lease lapsed
            return self.got
        if resp.status_code == 200:
            self.got.extend(m["text"] for m in resp.json())
        return self.got


def run_failover(tmp_path: Path, rig: SentinelRig, monkeypatch: pytest.MonkeyPatch, min_replicas: int) -> None:
    fake = FakeInstagram(tmp_path).start()
    talk = ThreadedTalkServer().start()
    ports = {"a": free_port(), "b": free_port(), "http1": free_port(), "http2": free_port()}
    admin_port = free_port()
    paths = [config(tmp_path / f"d{n}", rig, talk.url, ports, ports[f"http{n}"], free_port() if n == 2 else admin_port,
                    min_replicas) for n in (1, 2)]  # fmt: skip
    daemons = [Daemon(path, ports[f"http{n}"], tmp_path / f"d{n}.log") for n, path in zip((1, 2), paths, strict=True)]
    worker: WorkerProcess | None = None
    halt = threading.Event()
    posters: list[threading.Thread] = []
    try:
        alice = talk.call("add_user", "alice", "Alice")
        talk.call("create_room", "Failover", TOKEN, (alice,))
        bot = talk.call("install_bot", "Bridge", SECRET, f"http://127.0.0.1:{ports['http1']}/webhook/nextcloud/ig")
        talk.call("enable_bot", bot, TOKEN)
        for daemon in daemons:
            daemon.start(ready=False)
        wait_for(lambda: accounts_connected(ports["http1"], ports["http2"]) >= {"api.a", "api.b", "nctalkbot.ig"},
                 timeout=30, what="every account connected on one of the instances")  # fmt: skip
        for name, value in fake.worker_env().items():  # the worker reaches Instagram through the fake's proxy
            monkeypatch.setenv(name, value)
        worker = WorkerProcess(paths[0], tmp_path / "worker.log").start()

        api, webhooks = Ledger(), Ledger()
        posters = [
            threading.Thread(target=post_api, args=(ports["a"], api, halt)),
            threading.Thread(target=post_talk, args=(talk, alice, webhooks, halt)),
        ]
        for poster in posters:
            poster.start()
        # Instagram jobs: links from api.b (their previews answer api.b's room); the last one's
        # post page is held, so its job is mid-fetch when the master dies and finishes after
        codes = [fake.add_post(image_item(f"Failover{i:02d}", caption=f"post {i}")) for i in range(LINKS)]
        fake.hold(f"/p/{codes[-1]}")
        for code in codes:
            wait_for(lambda: post_link(ports["b"], code), what="a link posted")  # noqa: B023 - called at once
        wait_for(lambda: fake.seen(path_prefix=f"/p/{codes[-1]}"), timeout=30, what="the held fetch under way")

        def acked(api_count: int, webhook_count: int) -> bool:
            assert all(poster.is_alive() for poster in posters), "a client thread failed: see its warning"
            return len(api.acked) >= api_count and len(webhooks.acked) >= webhook_count

        wait_for(lambda: acked(*ACKED_BEFORE_KILL), timeout=60, what="traffic acknowledged before the kill")
        old = rig.kill_master()
        at_kill = len(api.acked), len(webhooks.acked)
        new = rig.wait_failover(old)
        fake.release(f"/p/{codes[-1]}")
        after = at_kill[0] + ACKED_AFTER_FAILOVER[0], at_kill[1] + ACKED_AFTER_FAILOVER[1]
        wait_for(lambda: acked(*after), timeout=60, what="traffic acknowledged after the failover")
        halt.set()
        for poster in posters:
            poster.join(30)
            assert not poster.is_alive()

        # One sentinel per source, posted last: api.a's reaches api.b and Talk, Talk's reaches api.b.
        def api_sentinel() -> bool:
            try:
                return post_as(ports["a"], "token-a", SENTINEL, "alice").status_code == 200
            except httpx.HTTPError:  # api.a restarting after its lease lapsed: a client retries
                return False

        wait_for(api_sentinel, what="the api sentinel acknowledged")
        talk.call("post", TOKEN, alice, SENTINEL)
        assert talk.state.webhook_calls[-1].status == 200
        inbox = Inbox(ports["b"])

        def talk_room() -> list[str]:
            return [m.message for m in talk.call("bot_messages", TOKEN, bot)]

        wait_for(lambda: sum(map(has_sentinel, inbox.read())) >= 2 and any(map(has_sentinel, talk_room())),
                 timeout=60, what="the sentinels in api.b and in Talk")  # fmt: skip
        assert sum(map(has_sentinel, inbox.read())) == 2 and sum(map(has_sentinel, talk_room())) == 1
        at_b = [body(t) for t in inbox.got if not has_sentinel(t)]
        at_talk = [body(t) for t in talk_room() if not has_sentinel(t)]
        results = {
            "api.a -> api.b": outcome([t for t in at_b if re.fullmatch(r"a\d{5}", t)], api),
            "api.a -> Talk": outcome([t for t in at_talk if re.fullmatch(r"a\d{5}", t)], api),
            "Talk -> api.b": outcome([t for t in at_b if re.fullmatch(r"t\d{5}", t)], webhooks),
        }
        print(f"\nMinReplicas = {min_replicas}: {len(api.acked)} api POSTs and {len(webhooks.acked)} webhooks "
              f"acknowledged ({len(api.ambiguous)} and {len(webhooks.ambiguous)} not); the master killed after "
              f"{at_kill[0]} and {at_kill[1]}")  # fmt: skip
        for path, result in results.items():
            print(f"  {path}: lost {len(result.lost)} acknowledged {result.lost[:5]}, "
                  f"duplicated {len(result.duplicated)}, in order {result.in_order}")  # fmt: skip
        # The sentinels may fail over a second time before the first promotion settled (seen once in
        # CI on a loaded machine: the remaining replica still resyncing, the new master demoted again).
        final = rig.master_port()
        settled = final == new
        if not settled:
            print(f"  the sentinels failed over again: {old} -> {new} -> {final}")
        for path, result in results.items():
            assert result.in_order, f"{path}: out of order"
            assert result.unexpected == [], f"{path}: never sent: {result.unexpected[:10]}"
            if min_replicas:
                assert result.lost == [], f"{path}: acknowledged and lost: {result.lost[:10]}"
            if path.endswith("Talk") and (not min_replicas or not settled):
                # docs/talk-bot.md's first window, opened by Redis instead of a crash: Talk
                # answered 201 and the record of that delivery, acknowledged by the master,
                # died with it before a replica had it. The next owner posts it again: with
                # one failover, only a message in flight when the master died.
                if settled:
                    assert set(result.duplicated) <= set(api.acked[: at_kill[0]]), f"{path}: {result.duplicated}"
            else:
                # A Redis-backed room: the record is written with the message. A Talk room with
                # MinReplicas: a record is written again until it is on a replica (bridge/delivery_state.py).
                assert result.duplicated == [], f"{path}: delivered twice: {result.duplicated[:10]}"

        # Every Instagram job ran to one preview (a window, not a sentinel:
        # previews come from arq jobs, in no order with any message sent after them).
        def previews() -> list[str]:
            return [t for t in inbox.read() if t.startswith("📷")]

        wait_for(lambda: len(previews()) >= LINKS, timeout=60, what="a preview per link")
        got = wait_quiet(previews)
        assert sorted(t.splitlines()[-1] for t in got) == sorted(f"https://www.instagram.com/p/{c}/" for c in codes)

        # The failover, shown: status, the management page, the metrics.
        last_from, last_to = (old, new) if settled else (new, final)  # the record keeps the last failover
        shown = f"from 127.0.0.1:{last_from} to 127.0.0.1:{last_to}"
        status = subprocess.run([sys.executable, "-m", "bridge.cli", "status", "--config", str(paths[0])],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert f"redis master: 127.0.0.1:{last_to}\n" in status.stdout and shown in status.stdout, status.stdout
        page = AdminClient(f"http://127.0.0.1:{admin_port}")
        try:
            assert page.login().status_code == 303
            assert f": 127.0.0.1:{last_from} → 127.0.0.1:{last_to}</dd>" in page.http.get("/").text
        finally:
            page.close()
        metrics = httpx.get(f"http://127.0.0.1:{ports['http1']}/metrics", timeout=10).text
        seen = "1.0" if settled else "2.0"
        assert f"talkbridge_redis_failovers_total {seen}" in metrics and "talkbridge_redis_up 1.0" in metrics
    finally:
        halt.set()
        for poster in posters:
            poster.join(30)
        if worker is not None:
            worker.stop()
        for daemon in daemons:
            daemon.stop()
        talk.stop()
        fake.stop()


# MinReplicas = 1 (none acknowledged may be lost) once [redis] MinReplicas exists (issue 20, item 2)
MIN_REPLICAS = [0, 1] if "min_replicas" in {f.name for f in dataclasses.fields(RedisSection)} else [0]


@pytest.mark.parametrize("min_replicas", MIN_REPLICAS)
def test_master_killed_under_traffic(
    tmp_path: Path, sentinel_rig: SentinelRig, monkeypatch: pytest.MonkeyPatch, min_replicas: int
) -> None:
    run_failover(tmp_path, sentinel_rig, monkeypatch, min_replicas)
