"""The management page against an attacker: bursts of logins sent at once,
a lockout kept up from other addresses, DNS rebinding (a foreign ``Host``),
stream ids Redis refuses, and what ``check-config`` warns about. Against the
real app on a real listener and the suite's Redis (tests/admin_rig.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from bridge.admin.passwords import PasswordCheck
from bridge.cli import main as cli_main
from bridge.config import ConfigError
from bridge.keys import admin_failed_all_key, admin_failed_key, dead_letters_key, log_key, outbound_key, paused_key
from bridge.metrics import Metrics
from bridge.rejections import RejectionLog
from tests.admin_rig import PASSWORD, USER, AdminClient, AdminServer, admin_config
from tests.helpers import LogLines, RedisServer, free_port
from tests.test_admin_web import add_dead_letters, delivery_payload

LIMIT, LIMIT_ALL = 3, 6  # the rig's MaxFailedLogins, MaxFailedLoginsAll


class CountingCheck:
    """The configured password check, counting how many ran and how many at
    once; each takes ``cost`` seconds more (what a real scrypt costs)."""

    def __init__(self, check: PasswordCheck, cost: float = 0.0) -> None:
        self.check = check
        self.cost = cost
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def verify(self, password: str) -> bool:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.cost:
                time.sleep(self.cost)  # the hash's work, not a wait for anything
            return self.check.verify(password)
        finally:
            with self._lock:
                self.running -= 1


def counting(server: AdminServer, cost: float = 0.0) -> CountingCheck:
    assert server.app is not None
    settings = server.app.auth.settings
    check = CountingCheck(settings.password, cost)
    server.app.auth.settings = dataclasses.replace(settings, password=check)  # type: ignore[arg-type]
    return check


@pytest.fixture
def checks(server: AdminServer, store: sync_redis.Redis) -> Iterator[CountingCheck]:
    assert server.app is not None
    settings = server.app.auth.settings
    try:
        yield counting(server, cost=0.02)  # a burst's requests overlap as they do with the real hash's cost
    finally:
        server.app.auth.settings = settings


async def burst(base: str, source: str, passwords: list[str]) -> list[int]:
    """One login form, then every password POSTed at once from ``source``."""
    transport = httpx.AsyncHTTPTransport(local_address=source, limits=httpx.Limits(max_connections=len(passwords)))
    async with httpx.AsyncClient(base_url=base, transport=transport, timeout=120) as http:
        form = await http.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token is not None, form.text

        async def attempt(password: str) -> int:
            data = {"login_token": token.group(1), "user": USER, "password": password, "next": "/"}
            return (await http.post("/login", data=data)).status_code

        return list(await asyncio.gather(*(attempt(p) for p in passwords)))


async def bursts(base: str, sources: dict[str, list[str]]) -> dict[str, list[int]]:
    answers = await asyncio.gather(*(burst(base, source, pw) for source, pw in sources.items()))
    return dict(zip(sources, answers, strict=True))


# bursts ------------------------------------------------------------------------------------------------
def test_a_burst_of_wrong_passwords_checks_only_the_limits_worth(server: AdminServer, checks: CountingCheck) -> None:
    statuses = asyncio.run(burst(server.base, "127.0.0.2", [f"guess {i}" for i in range(200)]))
    assert checks.calls == LIMIT
    assert sorted(statuses) == [401] * LIMIT + [429] * (200 - LIMIT)


def test_a_burst_from_many_addresses_stops_at_the_overall_limit(server: AdminServer, checks: CountingCheck) -> None:
    sources = {f"127.0.0.{n}": [f"guess {n}.{i}" for i in range(40)] for n in range(2, 7)}
    answers = asyncio.run(bursts(server.base, sources))
    assert checks.calls == LIMIT_ALL
    every = [status for statuses in answers.values() for status in statuses]
    assert every.count(401) == LIMIT_ALL and every.count(429) == 200 - LIMIT_ALL
    assert all(statuses.count(401) <= LIMIT for statuses in answers.values())


def test_password_checks_run_a_few_at_a_time(server: AdminServer, store: sync_redis.Redis) -> None:
    assert server.app is not None
    settings = server.app.auth.settings
    check = counting(server, cost=0.05)
    try:
        sources = {f"127.0.0.{n}": [f"guess {n}.{i}" for i in range(10)] for n in range(2, 4)}
        asyncio.run(bursts(server.base, sources))
    finally:
        server.app.auth.settings = settings
    assert check.calls == LIMIT_ALL
    assert check.most_at_once <= 2  # auth.PASSWORD_CHECKS_AT_ONCE


def test_attackers_holding_the_overall_limit_do_not_lock_out_a_known_address(
    server: AdminServer, checks: CountingCheck, store: sync_redis.Redis
) -> None:
    admin, stranger = AdminClient(server.base, "127.0.0.1"), AdminClient(server.base, "127.0.0.9")
    try:
        assert admin.login().status_code == 303  # the administrator's address is known from now on
        assert admin.post("/logout", csrf=admin.csrf()).status_code == 303
        assert int(store.get(admin_failed_all_key("tb")) or 0) == 0  # a correct login took its attempt back
        sources = {f"127.0.0.{n}": [f"guess {n}.{i}" for i in range(20)] for n in range(2, 6)}
        asyncio.run(bursts(server.base, sources))
        assert int(store.get(admin_failed_all_key("tb"))) >= LIMIT_ALL
        # the attackers' own addresses and new ones are refused, even with the right password…
        for refused in (AdminClient(server.base, "127.0.0.2"), stranger):
            resp = refused.login()
            assert resp.status_code == 429 and "too many failed logins" in resp.text
            refused.close()
        # …the known address with no failures of its own logs in, however often the attack is renewed
        for _ in range(2):
            asyncio.run(bursts(server.base, {"127.0.0.2": ["again"] * 10, "127.0.0.7": ["again"] * 10}))
            assert admin.login().status_code == 303
            assert admin.post("/logout", csrf=admin.csrf()).status_code == 303
        assert checks.calls == LIMIT_ALL + 3  # the attack's first window, and the administrator's 3 logins
        # the known address keeps its own limit
        for _ in range(LIMIT):
            assert admin.login(password="wrong").status_code == 401
        assert admin.login().status_code == 429
    finally:
        admin.close()
        stranger.close()


def test_with_known_addresses_off_the_overall_limit_refuses_everyone(
    tmp_path: Path, redis_server: RedisServer, store: sync_redis.Redis
) -> None:
    config = admin_config(tmp_path, redis_server.url, free_port(), extra="KnownAddressDays = 0")
    server = AdminServer(config, redis_server.url).start()
    admin = AdminClient(server.base)
    try:
        assert admin.login().status_code == 303
        asyncio.run(bursts(server.base, {"127.0.0.2": ["x"] * 10, "127.0.0.3": ["x"] * 10}))
        assert admin.login().status_code == 429
        assert not store.keys("tb:admin:known:*")
    finally:
        admin.close()
        server.stop()


def test_ipv6_clients_are_counted_by_their_64(server: AdminServer) -> None:
    assert server.app is not None
    auth = server.app.auth
    assert auth._fail_key("2001:db8:1:2:aaaa::1") == auth._fail_key("2001:db8:1:2:bbbb::9")
    assert auth._fail_key("2001:db8:1:2::1") != auth._fail_key("2001:db8:1:3::1")
    assert auth._fail_key("::ffff:192.0.2.7") == auth._fail_key("192.0.2.7")
    assert auth._fail_key("127.0.0.1") == admin_failed_key("tb", "127.0.0.1")


# DNS rebinding ------------------------------------------------------------------------------------------
def test_a_foreign_host_name_gets_nothing(server: AdminServer, store: sync_redis.Redis) -> None:
    admin = AdminClient(server.base)
    try:
        assert admin.login().status_code == 303
        csrf = admin.csrf()
        rebound = f"evil.example:{server.port}"
        for headers in ({"Host": rebound}, {"Host": rebound, "Origin": f"http://{rebound}"}):
            for path in ("/", "/login", "/logs", "/static/admin.css", "/favicon.ico", "/nothing-here"):
                resp = admin.http.get(path, headers=headers)
                assert resp.status_code == 421, (path, headers)
                assert "talkbridge" not in resp.text and "set-cookie" not in resp.headers
            resp = admin.http.post("/accounts/api.a/pause", data={"csrf": csrf}, headers=headers)
            assert resp.status_code == 421
            form = admin.http.get("/login")  # a fresh form, from the page's own name
            token = re.search(r'name="login_token" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
            login = {"login_token": token, "user": USER, "password": PASSWORD}
            resp = admin.http.post("/login", data=login, headers=headers)
            assert resp.status_code == 421 and "tb_admin" not in resp.headers.get("set-cookie", "")
        assert not store.exists(paused_key("tb", "api.a"))
        for missing_or_bad in ("", "127.0.0.1:x", "[::1", "127.0.0.1:80:80", "a b"):
            assert admin.http.get("/login", headers={"Host": missing_or_bad}).status_code == 421, missing_or_bad
        # the page's names on any port: an SSH tunnel from another local port
        for good in ("localhost:8080", "LOCALHOST", "127.0.0.1", "[::1]:4281", "localhost.:1"):
            assert admin.http.get("/login", headers={"Host": good}).status_code == 200, good
        page = admin.http.get("/", headers={"Host": "localhost:8080"})
        assert page.status_code == 200 and USER in page.text
    finally:
        admin.close()


def test_configured_hosts_replace_the_defaults(tmp_path: Path, redis_server: RedisServer) -> None:
    config = admin_config(tmp_path, redis_server.url, free_port(), extra='Hosts = ["Admin.Example.org", "[::1]"]')
    server = AdminServer(config, redis_server.url).start()
    try:
        with httpx.Client(base_url=server.base, timeout=20) as http:
            answers = {"admin.example.org": 200, "admin.example.org:443": 200, "[::1]:1": 200, "localhost": 421,
                       f"127.0.0.1:{server.port}": 421, "example.org": 421}  # fmt: skip
            for host, status in answers.items():
                assert http.get("/login", headers={"Host": host}).status_code == status, host
            # the Origin must still be the Host the request names
            headers = {"Host": "admin.example.org:8443", "Origin": "http://admin.example.org"}
            resp = http.post("/login", headers=headers, data={"login_token": "x"})
            assert resp.status_code == 403 and "another site" in resp.text
            headers["Origin"] = "https://admin.example.org:8443"
            resp = http.post("/login", headers=headers, data={"login_token": "x"})
            assert resp.status_code == 403 and "expired" in resp.text  # past the Origin: no login form cookie
    finally:
        server.stop()


# ids Redis refuses --------------------------------------------------------------------------------------
def test_ids_redis_refuses_are_a_400(server: AdminServer, store: sync_redis.Redis, tmp_path: Path) -> None:
    asyncio.run(add_dead_letters(server.redis_url, [(outbound_key("tb", "api.b"), delivery_payload("x"), "e")]))
    store.xadd(log_key("tb"), {"ts": "1", "level": "ERROR", "message": "m", "account": "", "instance": "i"})
    admin = AdminClient(server.base)
    try:
        assert admin.login().status_code == 303
        for zero in ("0-0", "00-000", "0000000000000000000000000000000000000-0"):
            for path in (f"/dead-letters?before={zero}", f"/logs?before={zero}", f"/dead-letters/{zero}"):
                resp = admin.http.get(path)
                assert resp.status_code == 400, (path, resp.status_code, resp.text[:200])
            resp = admin.post("/dead-letters/discard", csrf=admin.csrf(), id=zero)
            assert resp.status_code == 400
        # the smallest and largest ids Redis takes are pages like any other
        for edge in ("0-1", "1-0", "18446744073709551615-18446744073709551615", "000001-0"):
            assert admin.http.get(f"/dead-letters?before={edge}").status_code == 200, edge
            assert admin.http.get(f"/logs?before={edge}").status_code == 200, edge
        assert store.xlen(dead_letters_key("tb")) == 1
    finally:
        admin.close()
    assert cli_main(["dlq", "discard", "0-0", "--config", str(server.config.path)], out=io.StringIO()) == 2


# check-config ------------------------------------------------------------------------------------------
def check_config(path: Path) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = cli_main(["check-config", str(path)], out=out)
    return code, [line for line in out.getvalue().splitlines() if line.startswith("warning: admin.")]


def test_check_config_warns_about_dangerous_admin_settings(tmp_path: Path, redis_server: RedisServer) -> None:
    def warnings(**change: str) -> list[str]:
        config = admin_config(tmp_path, redis_server.url, 4281, **change)
        code, found = check_config(config.path)
        assert code == 0
        return found

    assert warnings() == []  # the rig's: localhost, a hash
    open_plain = warnings(bind="0.0.0.0:4281", password="a")
    assert len(open_plain) == 3, open_plain
    assert open_plain[0].startswith('warning: admin.BindAddress: "0.0.0.0:4281" can be reached from other hosts')
    assert open_plain[1].startswith('warning: admin.Hosts: BindAddress "0.0.0.0:4281" listens on every address')
    assert open_plain[2].startswith("warning: admin.Password: a password shorter than 12 characters")
    assert all('"a"' not in line for line in open_plain)  # never the password
    assert warnings(bind="192.0.2.1:4281") == [
        'warning: admin.BindAddress: "192.0.2.1:4281" can be reached from other hosts over plain HTTP '
        "(SecureCookie = false): the password and the session cookie cross the network readable; keep it on "
        "127.0.0.1 behind an SSH tunnel, or serve it through an HTTPS proxy and set SecureCookie = true"
    ]
    assert warnings(bind="0.0.0.0:4281", extra='SecureCookie = true\nHosts = ["admin.example.org"]') == []
    assert warnings(bind="[::1]:4281", password="twelve chars") == []
    with pytest.raises(ConfigError) as caught:
        admin_config(tmp_path, redis_server.url, 4281, extra='Hosts = ["https://admin.example.org", "a:80", 7, ""]')
    problems = [p for p in caught.value.problems if p.startswith("admin.Hosts")]
    assert [p.split(":")[0] for p in problems] == [f"admin.Hosts[{i}]" for i in range(4)], problems


# the log under a burst ----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refused_logins_are_counted_and_logged_in_summary(server: AdminServer, checks: CountingCheck) -> None:
    """Whoever reaches the form can send thousands of wrong passwords: every
    one is counted in the metric, the log gets the first of each cause at
    once and then one line a minute with the count (bridge/rejections.py)."""
    assert server.app is not None
    log = logging.getLogger("tests.admin.rejections")
    log.propagate = False
    lines = LogLines()
    log.addHandler(lines)
    clock = Clock()
    app = server.app
    saved = app.rejections, app.metrics
    app.rejections, app.metrics = RejectionLog(log, clock=clock), Metrics()
    try:
        statuses = asyncio.run(burst(server.base, "127.0.0.2", [f"guess {i}" for i in range(200)]))
        assert statuses.count(401) == LIMIT and statuses.count(429) == 200 - LIMIT
        assert len(lines.lines) == 2, lines.lines  # the first wrong password, the first locked out
        firsts = sorted(line.split(": ", 2)[1] for line in lines.lines)  # in either order: a 429 needs no hash
        assert firsts == ["login refused (bad_password) from 127.0.0.2", "login refused (locked_out) from 127.0.0.2"]

        def rejected(reason: str) -> float | None:
            return app.metrics.registry.get_sample_value(
                "talkbridge_ingress_rejected_total", {"account": "admin", "reason": reason}
            )

        assert rejected("bad_password") == LIMIT and rejected("locked_out") == 200 - LIMIT
        clock.now += 60
        app.rejections.flush()
        assert len(lines.lines) == 4, lines.lines
        assert f"admin: {LIMIT - 1:,} logins refused (bad_password)" in lines.lines[2] + lines.lines[3]
        assert f"admin: {200 - LIMIT - 1:,} logins refused (locked_out)" in lines.lines[2] + lines.lines[3]
    finally:
        app.rejections, app.metrics = saved
        log.removeHandler(lines)
