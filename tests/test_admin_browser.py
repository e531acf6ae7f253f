"""The management page in a real headless Chromium (tests/browser_rig.py),
against ``talkbridge run`` as a real process: two ``api`` accounts and a
Talk bot (the Talk test server) in one gateway.

An operator logs in, sees the accounts live, pauses one (messages do not
cross to it; they reach the others), resumes it (they all cross, in
order), and replays a dead letter; a wrong password is refused, no page is
reachable without the session, and a state change without the CSRF token
is refused. Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from playwright.sync_api import Browser, Page, expect

from bridge.keys import admin_failed_all_key, admin_failed_key, dead_letters_key, paused_key
from tests.admin_rig import PASSWORD, PASSWORD_HASH, USER
from tests.browser_rig import chromium, screenshot
from tests.helpers import ConfigToml, Daemon, RedisServer, WorkerProcess, free_port, wait_for, wait_quiet
from tests.talkbot_rig import SECRET, bot_section
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Bot

TOKEN = "room1234"
TIMEOUT_MS = 20_000  # Playwright's waits poll until this deadline; it only bounds a failure
expect.set_options(timeout=TIMEOUT_MS)


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.got: list[dict] = []

    def post(self, text: str) -> None:
        resp = httpx.post(f"{self.base}/api/message", json={"text": text, "username": "alice", "gateway": "g"},
                          headers=self.headers, timeout=10)  # fmt: skip
        assert resp.status_code == 200, resp.text

    def texts(self) -> list[str]:
        resp = httpx.get(f"{self.base}/api/messages", headers=self.headers, timeout=10)
        resp.raise_for_status()
        self.got.extend(resp.json())
        return [m["text"] for m in self.got]


@dataclass
class Fleet:
    talk: ThreadedTalkServer
    daemon: Daemon
    worker: WorkerProcess
    a: Api
    b: Api
    bot: Bot
    redis: sync_redis.Redis
    admin: str  # the page's base URL

    def talk_texts(self) -> list[str]:
        return [m.message for m in self.talk.call("bot_messages", TOKEN, self.bot)]


def fleet_config(tmp_path: Path, redis_url: str, talk_url: str, http: int, a: int, b: int, admin: int) -> Path:
    config = ConfigToml().general().api("a", a, "token-a").api("b", b, "token-b")
    config.raw(bot_section("talk", talk_url, WebhookURL=f"http://127.0.0.1:{http}/webhook/nextcloud/talk", Timeout=5))
    config.gateway("g", ("api.a", "api"), ("api.b", "api"), ("nctalkbot.talk", TOKEN))
    config.daemon(redis_url, http, LeaseSeconds=3, RetryBaseSeconds=0.05)
    config.section("admin", BindAddress=f"127.0.0.1:{admin}", User=USER, Password=PASSWORD_HASH, RefreshSeconds=0.5)
    return config.write(tmp_path / "talkbridge.toml")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("admin-browser")
    store = sync_redis.Redis.from_url(redis_server.url)
    store.flushall()
    talk = ThreadedTalkServer().start()
    http, a, b, admin = free_port(), free_port(), free_port(), free_port()
    config = fleet_config(tmp, redis_server.url, talk.url, http, a, b, admin)
    daemon = Daemon(config, http, tmp / "daemon.log")
    daemon.start()
    worker = WorkerProcess(config, tmp / "worker.log").start()  # the fleet's workers are on the page too
    try:
        alice = talk.call("add_user", "alice", "Alice")
        talk.call("create_room", "Bridged", TOKEN, (alice,))
        bot = talk.call("install_bot", "Bridge", SECRET, f"http://127.0.0.1:{http}/webhook/nextcloud/talk")
        talk.call("enable_bot", bot, TOKEN)
        yield Fleet(talk, daemon, worker, Api(a, "token-a"), Api(b, "token-b"), bot, store, f"http://127.0.0.1:{admin}")
    finally:
        worker.stop()
        daemon.stop()
        talk.stop()
        store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()


def log_in(page: Page, base: str, password: str = PASSWORD) -> None:
    page.goto(base + "/")
    expect(page).to_have_url(base + "/login")
    page.get_by_label("User").fill(USER)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def row(page: Page, account: str):  # type: ignore[no-untyped-def]
    return page.locator(f'tr[data-account="{account}"]')


def test_operator_pauses_resumes_and_replays_through_the_page(fleet: Fleet, page: Page) -> None:
    base = fleet.admin
    page.goto(base + "/logs")
    expect(page).to_have_url(base + "/login?next=/logs")
    screenshot(page, "admin-login")

    log_in(page, base)
    expect(page).to_have_url(base + "/")
    for account in ("api.a", "api.b", "nctalkbot.talk"):
        expect(row(page, account)).to_have_attribute("data-state", "connected")
    expect(page.locator("#live-state")).to_have_text("live")  # the SSE stream is up
    expect(page.locator("#instances tr")).to_have_count(1)
    assert fleet.worker.proc is not None
    expect(page.locator("#workers tr")).to_contain_text(f"pid {fleet.worker.proc.pid}")
    expect(row(page, "nctalkbot.talk")).to_contain_text(TOKEN)  # its room

    # pause api.b; the owner applies it (the row says "held")
    row(page, "api.b").get_by_role("button", name="Pause").click()
    expect(page.locator(".flash")).to_contain_text("api.b paused")
    expect(row(page, "api.b")).to_have_attribute("data-state", "paused")
    expect(row(page, "api.b")).to_have_attribute("data-held", "yes")

    sent = [f"while paused {i}" for i in range(3)]
    for text in sent:
        fleet.a.post(text)
    # they cross to Talk, so they were routed; api.b holds them
    wait_for(lambda: [t for t in fleet.talk_texts() if "while paused" in t] == [f"[api/a] <alice> {t}" for t in sent],
             what="the messages in Talk")  # fmt: skip
    expect(row(page, "api.b")).to_have_attribute("data-backlog", "3")  # live, through the SSE stream
    assert wait_quiet(fleet.b.texts) == []  # a held account delivers nothing, a sentinel neither: a window it is
    screenshot(page, "admin-dashboard-paused")

    row(page, "api.b").get_by_role("button", name="Resume").click()
    expect(page.locator(".flash")).to_contain_text("api.b resumed")
    wait_for(lambda: len(fleet.b.texts()) >= 3, what="the held messages at api.b")
    assert fleet.b.texts() == sent  # all of them, in order
    expect(row(page, "api.b")).to_have_attribute("data-state", "connected")
    expect(row(page, "api.b")).to_have_attribute("data-backlog", "0")
    screenshot(page, "admin-dashboard")

    # a delivery Talk refuses for good is dead-lettered; the operator replays it
    fleet.talk.call("fail_next", 400)
    fleet.a.post("refused once")
    wait_for(lambda: fleet.redis.xlen(dead_letters_key("tb")) == 1, what="the dead letter")
    expect(row(page, "nctalkbot.talk").locator("td.num a")).to_have_text("1")
    page.get_by_role("link", name="Dead letters").first.click()
    expect(page.locator("tr[data-id]")).to_have_count(1)
    page.locator("tr[data-id] a").click()
    expect(page.locator("pre.error-text")).to_contain_text("400")
    expect(page.locator("pre.payload")).to_contain_text("refused once")
    screenshot(page, "admin-dead-letter")
    page.get_by_role("button", name="Replay").click()
    expect(page.locator(".flash")).to_contain_text("replayed 1 dead letter(s)")
    wait_for(lambda: "[api/a] <alice> refused once" in fleet.talk_texts(), what="the replayed message in Talk")
    assert fleet.redis.xlen(dead_letters_key("tb")) == 0
    assert fleet.talk_texts().count("[api/a] <alice> refused once") == 1


def test_a_wrong_password_is_refused(fleet: Fleet, page: Page) -> None:
    log_in(page, fleet.admin, password="not the password")
    expect(page.locator(".error")).to_have_text("wrong user name or password")
    expect(page).to_have_url(fleet.admin + "/login")
    screenshot(page, "admin-login-refused")
    assert page.context.cookies() == [] or all(c["name"] != "tb_admin" for c in page.context.cookies())
    fleet.redis.delete(admin_failed_key("tb", "127.0.0.1"), admin_failed_all_key("tb"))


def test_no_page_is_reachable_without_the_session(fleet: Fleet, page: Page) -> None:
    for path in ("/", "/dead-letters", "/logs", "/dead-letters/1-0"):
        page.goto(fleet.admin + path)
        expect(page).to_have_url(f"{fleet.admin}/login" + ("" if path == "/" else "?next=" + path))
        expect(page.locator("form.login")).to_be_visible()
    stream = page.request.get(fleet.admin + "/events")
    assert stream.status == 401
    action = page.request.post(fleet.admin + "/accounts/api.a/pause", form={"csrf": "x"})
    assert action.status == 401 and not fleet.redis.exists(paused_key("tb", "api.a"))


def test_a_state_change_without_the_csrf_token_is_refused(fleet: Fleet, page: Page) -> None:
    log_in(page, fleet.admin)
    expect(row(page, "api.a")).to_have_attribute("data-state", "connected")
    # the session's cookie goes with these requests (same context), the token does not
    refused = page.request.post(fleet.admin + "/accounts/api.a/pause", form={"next": "/"}, max_redirects=0)
    assert refused.status == 403 and "CSRF" in refused.text()
    forged = page.request.post(fleet.admin + "/accounts/api.a/pause", form={"csrf": "forged"}, max_redirects=0)
    assert forged.status == 403
    # the same form with the page's token works (the forms carry it)
    token = page.locator('input[name="csrf"]').first.get_attribute("value")
    ok = page.request.post(fleet.admin + "/accounts/api.a/restart", form={"csrf": token or ""}, max_redirects=0)
    assert ok.status == 303
    assert not fleet.redis.exists(paused_key("tb", "api.a"))
    # the restart was obeyed: the account reconnects under a new lease tenure
    expect(row(page, "api.a")).to_have_attribute("data-state", "connected")
