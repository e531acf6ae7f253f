"""The management page over HTTP: sessions, CSRF, lockout, actions, dead
letters, logs and live updates, against the real app on a real listener and
the suite's Redis (tests/admin_rig.py). Hostile input is generated in
tests/test_admin_props.py; the browser's view is tests/test_admin_browser.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from bridge.admin import fleet
from bridge.admin.passwords import PasswordFormatError, hash_password, parse_password
from bridge.bus import Bus, BusSettings
from bridge.cli import main as cli_main
from bridge.config import ConfigError
from bridge.control import announcement, rate_bucket
from bridge.events import Delivery, Event, EventKind
from bridge.keys import (
    alerts_key,
    control_channel,
    dead_letters_key,
    inbound_key,
    instance_key,
    instances_key,
    log_key,
    outbound_key,
    paused_key,
    queue_name,
    rate_key,
    restart_key,
    state_key,
    workers_key,
)
from bridge.lease import lease_key
from tests.admin_rig import PASSWORD, USER, AdminClient, AdminServer, admin_config
from tests.helpers import ROOT, RedisServer, free_port, wait_for
from workers import heartbeat


@pytest.fixture
def client(server: AdminServer, store: sync_redis.Redis) -> Iterator[AdminClient]:
    c = AdminClient(server.base)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def admin(client: AdminClient) -> AdminClient:
    assert client.login().status_code == 303
    return client


def control_keys(store: sync_redis.Redis) -> list[bytes]:
    return sorted(store.keys("tb:paused:*") + store.keys("tb:restart:*"))


# sessions ---------------------------------------------------------------------------------------
GET_PAGES = ["/", "/dead-letters", "/dead-letters/1-0", "/logs", "/logs?level=ERROR", "/nothing-here"]
POSTS = ["/accounts/api.a/pause", "/accounts/api.a/restart", "/dead-letters/replay", "/dead-letters/discard"]


def test_no_page_no_stream_and_no_action_without_a_session(client: AdminClient, store: sync_redis.Redis) -> None:
    for path in GET_PAGES:
        resp = client.http.get(path)
        assert resp.status_code == 303, path
        assert resp.headers["Location"].startswith("/login"), path
        assert "talkbridge" not in resp.text
    assert client.http.get("/").headers["Location"] == "/login"
    login = urllib.parse.urlsplit(client.http.get("/logs?level=ERROR").headers["Location"])
    assert login.path == "/login" and urllib.parse.parse_qs(login.query) == {"next": ["/logs?level=ERROR"]}
    assert client.http.get("/events").status_code == 401
    client.http.cookies.set("tb_admin", "made-up-token")
    assert client.http.get("/").status_code == 303
    for path in POSTS:
        assert client.post(path, id="1-0", csrf="x").status_code == 401, path
    assert control_keys(store) == []
    # the login form and the static files need none
    assert client.http.get("/login").status_code == 200
    assert client.http.get("/static/admin.css").status_code == 200


def test_login_sets_a_strict_httponly_cookie_and_redis_keeps_only_its_hash(
    client: AdminClient, store: sync_redis.Redis
) -> None:
    resp = client.login()
    assert resp.status_code == 303 and resp.headers["Location"] == "/"
    cookie = next(v for v in resp.headers.get_list("set-cookie") if v.startswith("tb_admin="))
    token = cookie.split(";")[0].split("=", 1)[1]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # [admin] SecureCookie defaults to false (plain http on localhost)
    keys = [k.decode() for k in store.keys("tb:admin:session:*")]
    assert len(keys) == 1 and token not in keys[0]
    page = client.http.get("/")
    assert page.status_code == 200 and USER in page.text
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["Cache-Control"] == "no-store"
    # logging out ends the session everywhere
    assert client.post("/logout", csrf=client.csrf()).status_code == 303
    assert store.keys("tb:admin:session:*") == []
    client.http.cookies.set("tb_admin", token)
    assert client.http.get("/").status_code == 303


def test_the_login_form_token_must_come_with_its_cookie(client: AdminClient) -> None:
    resp = client.http.post("/login", data={"login_token": "guess", "user": USER, "password": PASSWORD})
    assert resp.status_code == 403 and "expired" in resp.text
    assert "tb_admin" not in client.http.cookies


def test_wrong_passwords_lock_out_the_client_then_everyone(server: AdminServer, store: sync_redis.Redis) -> None:
    first, second, third = (AdminClient(server.base, f"127.0.0.{n}") for n in (1, 2, 3))
    try:
        for _ in range(3):  # MaxFailedLogins = 3
            resp = first.login(password="wrong")
            assert resp.status_code == 401 and "wrong user name or password" in resp.text
        assert first.login(user="nobody").status_code == 429  # the fourth attempt is not even checked
        locked = first.login()  # the right password, refused while locked out
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) == 60
        assert "too many failed logins" in locked.text
        assert second.login().status_code == 303  # another client is not locked out
        for _ in range(3):  # MaxFailedLoginsAll = 6 failures from everyone
            assert second.login(password="wrong").status_code in (401, 429)
        assert third.login().status_code == 429
    finally:
        for c in (first, second, third):
            c.close()


def test_state_changes_need_the_sessions_csrf_token(admin: AdminClient, store: sync_redis.Redis) -> None:
    token = admin.csrf()
    assert admin.post("/accounts/api.a/pause", next="/").status_code == 403
    assert admin.post("/accounts/api.a/pause", csrf="wrong" + token).status_code == 403
    assert admin.http.post("/accounts/api.a/pause", data={"csrf": token}, headers={"Origin": "http://evil.example"}
                           ).status_code == 403  # fmt: skip
    assert admin.post("/logout").status_code == 403
    assert control_keys(store) == []
    # another session's token does not work either
    other = AdminClient(admin.base)
    try:
        other.login()
        assert admin.post("/accounts/api.a/pause", csrf=other.csrf()).status_code == 403
    finally:
        other.close()
    assert control_keys(store) == []
    resp = admin.post("/accounts/api.a/pause", csrf=token, next="/")
    assert resp.status_code == 303 and resp.headers["Location"] == "/"
    assert store.exists(paused_key("tb", "api.a"))
    assert "api.a paused" in admin.http.get("/").text  # the flash, once
    assert "api.a paused" not in admin.http.get("/").text


def test_pause_resume_and_restart_are_requests_in_redis_announced_on_the_control_channel(
    admin: AdminClient, store: sync_redis.Redis
) -> None:
    pubsub = store.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(control_channel("tb"))
    token = admin.csrf()
    try:
        assert admin.post("/accounts/api.b/pause", csrf=token).status_code == 303
        record = json.loads(store.get(paused_key("tb", "api.b")))
        assert record["by"] == USER and abs(record["at"] - time.time()) < 60
        assert admin.post("/accounts/api.b/pause", csrf=token).status_code == 303  # twice: still one pause
        assert "was paused already" in admin.http.get("/").text
        assert admin.post("/accounts/api.b/restart", csrf=token).status_code == 303
        assert admin.post("/accounts/api.b/restart", csrf=token).status_code == 303
        assert store.get(restart_key("tb", "api.b")) == b"2"
        assert admin.post("/accounts/api.b/resume", csrf=token).status_code == 303
        assert not store.exists(paused_key("tb", "api.b"))
        got: list[bytes] = []
        wait_for(lambda: got.append(m["data"]) if (m := pubsub.get_message(timeout=0.1)) else len(got) >= 5,
                 what="5 control messages")  # fmt: skip
        assert set(got) == {b"api.b"}
        # an account the config does not have, an action nobody offers
        assert admin.post("/accounts/api.zz/pause", csrf=token).status_code == 404
        assert admin.post("/accounts/api.b/delete", csrf=token).status_code == 404
        assert control_keys(store) == [b"tb:restart:{api.b}"]
    finally:
        pubsub.close()


# dead letters ---------------------------------------------------------------------------------------
def delivery_payload(text: str, to: str = "api.b") -> bytes:
    event = Event(kind=EventKind.MESSAGE, account="api.a", channel="api", text=text, sender_name="alice", id=text)
    return Delivery(event, to, "api", "g", "[api/a] <alice> ", text).to_wire()


async def add_dead_letters(url: str, letters: list[tuple[str, bytes, str]]) -> None:
    redis = Redis.from_url(url)
    bus = Bus(redis, BusSettings())
    try:
        for i, (stream, payload, error) in enumerate(letters):
            await bus.dead_letter(stream, f"{i + 1}-0", payload, error, 5)
    finally:
        await redis.aclose()


def rows(html: str) -> list[str]:
    return re.findall(r'<tr data-id="([0-9-]+)">', html)


def test_dead_letters_paged_filtered_inspected_replayed_and_discarded(
    admin: AdminClient, store: sync_redis.Redis, server: AdminServer
) -> None:
    letters = [
        (outbound_key("tb", "api.b"), delivery_payload(f"b{i}"), f"TransientError: 503 #{i}") for i in range(120)
    ]
    letters += [(inbound_key("tb", "api.a"), b"not json", "unreadable event") for _ in range(30)]
    asyncio.run(add_dead_letters(server.redis_url, letters))
    ids = [entry_id.decode() for entry_id, _ in store.xrange(dead_letters_key("tb"))]

    seen: list[str] = []
    url = "/dead-letters"
    while url:
        page = admin.http.get(url)
        assert page.status_code == 200
        seen += rows(page.text)
        older = re.search(r'href="(/dead-letters\?[^"]*before=[0-9-]+)">Older', page.text)
        url = older.group(1).replace("&amp;", "&") if older else ""
    assert seen == ids[::-1]  # every one, newest first, each once
    assert len(rows(admin.http.get("/dead-letters").text)) == 50
    only_a = rows(admin.http.get("/dead-letters?account=api.a").text)
    assert only_a == ids[120:][::-1]

    dashboard = admin.http.get("/").text
    counts = dict(re.findall(r'href="/dead-letters\?account=(api\.[ab])">(\d+)</a>', dashboard))
    assert counts == {"api.a": "30", "api.b": "120"}

    one = ids[5]
    shown = admin.http.get(f"/dead-letters/{one}")
    assert (
        shown.status_code == 200
        and "TransientError: 503 #5" in shown.text
        and "&#34;t&#34;: &#34;b5&#34;" in shown.text
    )
    token = admin.csrf()
    assert admin.post("/dead-letters/replay", csrf=token, id=one, next="/dead-letters").status_code == 303
    [(_, fields)] = store.xrange(outbound_key("tb", "api.b"))
    assert fields[b"d"] == letters[5][1]
    assert admin.post("/dead-letters/discard", csrf=token, id=[ids[0], ids[1]]).status_code == 303
    assert store.xlen(dead_letters_key("tb")) == 147
    assert admin.http.get(f"/dead-letters/{ids[0]}").status_code == 404
    counts = dict(re.findall(r'href="/dead-letters\?account=(api\.[ab])">(\d+)</a>', admin.http.get("/").text))
    assert counts == {"api.a": "30", "api.b": "117"}
    # bad ids: a clear 4xx, nothing replayed or discarded
    for bad in ("x", "1-", "-1", "9" * 50 + "-0", "1-0 OR 1"):
        assert admin.post("/dead-letters/discard", csrf=token, id=bad).status_code == 400, bad
    assert admin.post("/dead-letters/replay", csrf=token).status_code == 400
    assert admin.post("/dead-letters/replay", csrf=token, id=[ids[9]] * 201).status_code == 400
    assert admin.http.get("/dead-letters?before=zz").status_code == 400
    assert admin.http.get("/dead-letters?account=nobody").status_code == 404
    assert store.xlen(dead_letters_key("tb")) == 147 and store.xlen(outbound_key("tb", "api.b")) == 1


# logs --------------------------------------------------------------------------------------------
def test_log_view_filters_by_severity_account_and_instance(admin: AdminClient, store: sync_redis.Redis) -> None:
    records = [
        ("INFO", "api.a", "i1", "not shown: info"),
        ("WARNING", "api.a", "i1", "warned about a"),
        ("ERROR", "api.b", "i2", "b failed"),
        ("CRITICAL", "", "i2", "<script>alert(1)</script> redis lost"),
    ]
    for level, account, instance, message in records:
        store.xadd(log_key("tb"), {"ts": f"{time.time():.3f}", "level": level, "logger": f"talkbridge.{account or 'x'}",
                              "account": account, "instance": instance, "message": message})  # fmt: skip

    def messages(query: str = "") -> list[str]:
        page = admin.http.get("/logs" + query)
        assert page.status_code == 200
        return re.findall(r'<pre class="message">([^<]*(?:&lt;[^<]*)*)</pre>', page.text)

    assert messages() == ["&lt;script&gt;alert(1)&lt;/script&gt; redis lost", "b failed", "warned about a"]
    assert messages("?level=ERROR") == ["&lt;script&gt;alert(1)&lt;/script&gt; redis lost", "b failed"]
    assert messages("?account=api.a") == ["warned about a"]
    assert messages("?instance=i2&level=CRITICAL") == ["&lt;script&gt;alert(1)&lt;/script&gt; redis lost"]
    assert "<script>alert(1)" not in admin.http.get("/").text  # the dashboard's recent warnings escape it too
    assert admin.http.get("/logs?level=DEBUG").status_code == 400
    assert admin.http.get("/logs?account=nobody").status_code == 404


# live updates ---------------------------------------------------------------------------------------
def test_live_updates_follow_the_fleet_and_stop_at_logout(admin: AdminClient, server: AdminServer) -> None:
    with admin.http.stream("GET", "/events") as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"] == "text/event-stream"
        events = sse(stream.iter_lines())
        name, data = next(events)
        assert name == "snapshot" and 'data-account="api.b" data-state="stopped"' in json.loads(data)["accounts"]
        token = admin.csrf()
        assert admin.post("/accounts/api.b/pause", csrf=token).status_code == 303
        name, data = next(events)
        assert 'data-account="api.b" data-state="paused"' in json.loads(data)["accounts"]
        assert admin.post("/logout", csrf=token).status_code == 303
        assert next(events)[0] == "logout"


def sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    name, data = "", ""
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and name:
            yield name, data
            name, data = "", ""


# the dashboard's sources ------------------------------------------------------------------------------
def test_dashboard_shows_owners_states_instances_rates_and_the_worker_queue(
    admin: AdminClient, store: sync_redis.Redis, redis_server: RedisServer
) -> None:
    now = time.time()

    async def a_worker_beats() -> None:  # as run_worker's heartbeat writes it
        client = Redis.from_url(redis_server.url)
        info = announcement(now - 7200) | {"done": "12", "failed": "1", "retried": "2", "running": "3",
                                                    "max_jobs": "10"}  # fmt: skip
        await heartbeat.beat(client, "tb", "worker-box-7-f00", info)
        await client.aclose()

    asyncio.run(a_worker_beats())
    store.zadd(workers_key("tb"), {"worker-dead-1": int((now - 1) * 1000)})  # its heartbeat expired
    store.zadd(instances_key("tb"), {"host-1-abc": int((now + 30) * 1000), "gone-1": int((now - 5) * 1000)})
    store.hset(instance_key("tb", "host-1-abc"), mapping={"version": "9.9.9", "host": "box", "pid": "42",
                                                          "started": f"{now - 7200:.3f}"})  # fmt: skip
    store.set(lease_key("tb", "api.a"), "host-1-abc")
    store.hset(state_key("tb", "api.a"), mapping={"instance": "host-1-abc", "state": "failed",
                                                 "error": "credentials refused (401)", "held": "0"})  # fmt: skip
    bucket = rate_bucket(now)
    store.hset(rate_key("tb", bucket - 1), mapping={"in:api.a": 7, "out:api.a": 5})
    store.hset(rate_key("tb", bucket - 3), mapping={"in:api.a": 3})
    store.hset(rate_key("tb", bucket - 6), mapping={"in:api.a": 1000})  # over a minute ago: not counted
    store.zadd(queue_name("tb"), {"job-1": 1, "job-2": 2})
    # the alert conditions in force (bridge/alerts.py keeps one JSON record per condition)
    store.hset(alerts_key("tb"), mapping={
        "dead-letters": json.dumps({"key": "dead-letters", "severity": "warning", "text": "dead letters growing",
                                    "since": now - 60, "account": ""}),
        "account:api.a:credentials": json.dumps({"key": "account:api.a:credentials", "severity": "critical",
                                                 "text": "api.a: <b>credentials</b> refused", "since": now - 30,
                                                 "account": "api.a"}),
    })  # fmt: skip
    page = admin.http.get("/").text
    row = re.search(r'<tr data-account="api.a".*?</tr>', page, re.S).group(0)
    assert 'data-state="failed"' in row and "credentials refused (401)" in row and "host-1-abc" in row
    assert re.findall(r'<td class="num">(\d+)</td>', row)[:2] == ["10", "5"]
    assert 'data-account="api.b" data-state="stopped"' in page
    assert "9.9.9" in page and "box" in page and "2 h 00 min" in page and "gone-1" not in page
    assert re.search(r"<dt>Worker queue</dt><dd>2</dd>", page)
    assert re.search(r"<dt>Workers alive</dt><dd>1</dd>", page) and "worker-dead-1" not in page
    worker = re.search(r'<tbody id="workers">.*?</tbody>', page, re.S).group(0)
    assert "worker-box-7-f00" in worker and "2 h 00 min" in worker
    assert re.findall(r'<td class="num">(\d+)(?: <small>/ (\d+)</small>)?</td>', worker)[:4] == [
        ("3", "10"),
        ("12", ""),
        ("1", ""),
        ("2", ""),
    ]
    assert re.findall(r'data-alert="([^"]+)"', page) == ["account:api.a:credentials", "dead-letters"]  # worst first
    assert "api.a: &lt;b&gt;credentials&lt;/b&gt; refused" in page


# config and passwords ------------------------------------------------------------------------------------
def test_admin_section_problems_name_the_key(tmp_path: Path, redis_server: RedisServer) -> None:
    cases = [
        ({"password": ""}, "admin.Password: is required with the other"),
        ({"password": "scrypt:4:8:1$salt$00"}, "admin.Password: the hash's key must be 16 to 128 bytes"),
        ({"password": "pbkdf2:md5:1000$salt$" + "ab" * 32}, "admin.Password: pbkdf2 hashes start"),
        ({"password": "scrypt:1000:8:1$salt$" + "ab" * 32}, "admin.Password: scrypt N must be a power of two"),
        ({"bind": "localhost"}, 'admin.BindAddress: "localhost" is not HOST:PORT'),
    ]
    for change, problem in cases:
        with pytest.raises(ConfigError) as caught:
            admin_config(tmp_path, redis_server.url, 1, **change)
        assert any(p.startswith(problem) for p in caught.value.problems), (change, caught.value.problems)
        assert "$salt$" not in str(caught.value)  # never echoes a hash


def test_password_forms(tmp_path: Path) -> None:
    plain = parse_password("s3cret words")
    assert plain.method == "plain" and plain.verify("s3cret words") and not plain.verify("s3cret word")
    scrypt = parse_password(hash_password("pässword", n=1024))
    assert scrypt.method == "scrypt" and scrypt.verify("pässword") and not scrypt.verify("password")
    # Werkzeug's pbkdf2 format: pbkdf2:sha256:ITERATIONS$SALT$HEX of pbkdf2_hmac
    real = hashlib.pbkdf2_hmac("sha256", b"hunter22", b"NaCl", 1000).hex()
    pbkdf2 = parse_password(f"pbkdf2:sha256:1000$NaCl${real}")
    assert pbkdf2.method == "pbkdf2" and pbkdf2.verify("hunter22") and not pbkdf2.verify("hunter2")
    for bad in ("scrypt:", "scrypt:x:8:1$s$" + "00" * 32, "pbkdf2:sha256:10$s$" + "00" * 32, "scrypt:1024:8:1$s$zz"):
        with pytest.raises(PasswordFormatError):
            parse_password(bad)
    # the helper a user runs to make one: reads the password from a pipe, prints the hash
    made = subprocess.run(
        [sys.executable, "-m", "bridge.admin.passwords"], input="a long enough password\n", capture_output=True,
        text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert parse_password(made.stdout.strip()).verify("a long enough password")
    short = subprocess.run([sys.executable, "-m", "bridge.admin.passwords"], input="short\n", capture_output=True,
                           text=True, cwd=ROOT)  # fmt: skip
    assert short.returncode == 2 and short.stdout == ""


def test_a_page_answers_503_while_redis_is_away(tmp_path: Path, redis_server: RedisServer) -> None:
    config = admin_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0", free_port())
    server = AdminServer(config, f"redis://127.0.0.1:{free_port()}/0").start()
    try:
        resp = httpx.get(server.base + "/", cookies={"tb_admin": "x"}, timeout=20)
        assert resp.status_code == 503 and "Redis is unavailable" in resp.text
    finally:
        server.stop()


# the CLI reads and acts through the same functions --------------------------------------------------
def test_cli_status_and_dlq_discard_agree_with_the_page(
    admin: AdminClient, store: sync_redis.Redis, server: AdminServer, tmp_path: Path
) -> None:
    letters = [(outbound_key("tb", "api.a"), delivery_payload(f"a{i}", to="api.a"), "boom") for i in range(4)]
    asyncio.run(add_dead_letters(server.redis_url, letters))
    ids = [entry_id.decode() for entry_id, _ in store.xrange(dead_letters_key("tb"))]
    assert 'href="/dead-letters?account=api.a">4</a>' in admin.http.get("/").text
    assert admin.post("/accounts/api.b/pause", csrf=admin.csrf()).status_code == 303
    config_path = server.config.path

    out = io.StringIO()
    assert cli_main(["dlq", "discard", ids[0], ids[2], "--config", str(config_path)], out=out) == 0
    assert out.getvalue().strip() == "discarded 2 dead letter(s)"
    assert cli_main(["dlq", "discard", "not-an-id", "--config", str(config_path)], out=io.StringIO()) == 2
    # deleted behind the page's back: its tally notices and counts again
    wait_for(lambda: 'href="/dead-letters?account=api.a">2</a>' in admin.http.get("/").text,
             what="the page counting 2 dead letters")  # fmt: skip
    out = io.StringIO()
    assert cli_main(["status", "--config", str(config_path)], out=out) == 0
    lines = out.getvalue().splitlines()
    assert any(line.split()[:1] == ["api.b"] and f"paused by {USER}" in line for line in lines)
    assert lines[-1] == "dead letters: 2"


async def test_the_dead_letter_tally_counts_everything_once_then_only_what_is_new(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    tally = fleet.DeadLetterTally(redis, bus.dlq, chunk=7)  # small chunks: the script's paging runs too
    for i in range(30):
        await bus.dead_letter(bus.outbound("api.a" if i % 3 else "api.b"), f"{i + 1}-0", b"x", "e", 1)
    assert await tally.refresh() == {outbound_key("tb", "api.a"): 20, outbound_key("tb", "api.b"): 10}
    assert tally.recounts == 1
    for i in range(5):
        await bus.dead_letter(bus.inbound("api.b"), f"{i + 100}-0", b"x", "e", 1)
    assert await tally.refresh() == {
        outbound_key("tb", "api.a"): 20,
        outbound_key("tb", "api.b"): 10,
        inbound_key("tb", "api.b"): 5,
    }
    assert await tally.refresh() == {
        outbound_key("tb", "api.a"): 20,
        outbound_key("tb", "api.b"): 10,
        inbound_key("tb", "api.b"): 5,
    }
    assert tally.recounts == 1  # appends and quiet refreshes never read the old letters again
    gone = await fleet.discard(bus, [(await bus.dead_letters(1))[0].id])  # the oldest: an api.b one
    tally.forget(gone)
    assert (await tally.refresh())[outbound_key("tb", "api.b")] == 9 and tally.recounts == 1
    await fleet.replay(bus, [(await bus.dead_letters(1))[0].id])  # behind the tally's back (the CLI)
    assert await tally.refresh() == {
        outbound_key("tb", "api.a"): 19,
        outbound_key("tb", "api.b"): 9,
        inbound_key("tb", "api.b"): 5,
    }
    assert tally.recounts == 2
