"""The management page's load time with 50 accounts and 10,000 dead letters.

Starts a redis-server (or uses ``--redis-url``), fills it with
``--dead-letters`` dead letters (real delivery payloads, spread over the
accounts) and ``--log-records`` WARN+ log records, then starts
``talkbridge run`` as its own process with ``--accounts`` api accounts
(paired in gateways) and the admin page. Once every account is connected it
logs in and times, over loopback, the whole answer of:

- the dashboard, the first time (the dead-letter tally counts them all,
  inside Redis) and then repeatedly, spaced past the snapshot cache so each
  load reads the fleet again;
- the dashboard after more dead letters arrived (the tally counts only those);
- dead-letter pages: the newest, one deep in the stream, one account's;
- the log view.

With ``--browser`` it also times the dashboard in headless Chromium
(navigation start to the load event), as a person would see it.

    python bench/admin_page.py
    python bench/admin_page.py --accounts 50 --dead-letters 10000 --browser
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis as sync_redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.admin.passwords import hash_password  # noqa: E402
from bridge.embedded_redis import find_redis_server  # noqa: E402
from bridge.events import Delivery, Event, EventKind  # noqa: E402

PASSWORD = "bench password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(path: Path, redis_url: str, accounts: int, http: int, admin: int) -> None:
    lines = []
    for i in range(accounts):
        lines += [f"[api.acct{i:02d}]", f'BindAddress = "127.0.0.1:{free_port()}"', f'Token = "token-{i}"', ""]
    for g in range(0, accounts - 1, 2):
        lines += ["[[gateway]]", f'name = "g{g}"', "enable = true"]
        for i in (g, g + 1):
            lines += ["[[gateway.inout]]", f'account = "api.acct{i:02d}"', 'channel = "api"']
    lines += [
        "[redis]", f'URL = "{redis_url}"', "[http]", f'BindAddress = "127.0.0.1:{http}"', "[admin]",
        f'BindAddress = "127.0.0.1:{admin}"', 'User = "admin"', f'Password = "{hash_password(PASSWORD)}"',
        "RefreshSeconds = 0.5",
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def fill(store: sync_redis.Redis, accounts: int, dead_letters: int, log_records: int, start: int = 0) -> None:
    pipe = store.pipeline(transaction=False)
    for i in range(start, start + dead_letters):
        to = f"api.acct{i % accounts:02d}"
        event = Event(EventKind.MESSAGE, f"api.acct{(i + 1) % accounts:02d}", "api", "u1", "alice",
                      f"message {i} " + "lorem ipsum " * 20)  # fmt: skip
        payload = Delivery(event, to, "api", "g", "[api/x] <alice> ", event.text).to_wire()
        pipe.xadd("tb:dlq", {b"stream": f"tb:out:{{{to}}}", b"entry": f"{i + 1}-0",
                             b"error": "TransientError: 503 Service Unavailable", b"attempts": "5",
                             b"at": f"{time.time():.3f}", b"d": payload})  # fmt: skip
        if len(pipe) >= 1000:
            pipe.execute()
    for i in range(log_records):
        level = ("WARNING", "ERROR", "CRITICAL")[i % 3]
        record = {
            "ts": f"{time.time():.3f}",
            "level": level,
            "logger": "talkbridge.x",
            "account": f"api.acct{i % accounts:02d}",
            "instance": "bench",
            "message": f"record {i}: trouble",
        }
        pipe.xadd("tb:log", record, maxlen=10_000, approximate=True)  # type: ignore[arg-type]
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()


def timed(client: httpx.Client, path: str) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    resp = client.get(path)
    elapsed = time.perf_counter() - started
    assert resp.status_code == 200, (path, resp.status_code, resp.text[:200])
    return elapsed, resp


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary(name: str, values: list[float]) -> None:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    print(f"{name:<44} n={len(values):<3} p50 {ms(statistics.median(values)):>9}  p95 {ms(p95):>9}  "
          f"max {ms(values[-1]):>9}")  # fmt: skip


def browser_load(base: str, runs: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page()
        page.goto(base + "/login")
        page.fill('input[name="user"]', "admin")
        page.fill('input[name="password"]', PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        for _ in range(runs):
            time.sleep(0.3)  # past the snapshot cache: each load reads the fleet
            page.goto(base + "/", wait_until="load")
            out.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd") / 1000)
        browser.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=50)
    p.add_argument("--dead-letters", type=int, default=10_000)
    p.add_argument("--log-records", type=int, default=10_000)
    p.add_argument("--loads", type=int, default=30)
    p.add_argument("--redis-url", default="")
    p.add_argument("--browser", action="store_true", help="also time the dashboard in headless Chromium")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="admin-bench-"))
    redis_proc = None
    url = args.redis_url
    if not url:
        port = free_port()
        redis_proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
    store = sync_redis.Redis.from_url(url)
    while True:
        try:
            store.ping()
            break
        except sync_redis.ConnectionError:
            time.sleep(0.05)
    store.flushall()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
          f"redis {store.info()['redis_version']}")  # fmt: skip
    started = time.perf_counter()
    fill(store, args.accounts, args.dead_letters, args.log_records)
    print(f"filled: {store.xlen('tb:dlq')} dead letters, {store.xlen('tb:log')} log records "
          f"in {time.perf_counter() - started:.1f} s")  # fmt: skip

    http, admin = free_port(), free_port()
    path = tmp / "talkbridge.toml"
    config(path, url, args.accounts, http, admin)
    log = open(tmp / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "bridge.cli", "run", "--config", str(path)], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{admin}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{http}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"daemon not ready: {(tmp / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.1)
        client = httpx.Client(base_url=base, timeout=30)
        token = re.search(r'name="login_token" value="([^"]+)"', client.get("/login").text).group(1)
        client.post("/login", data={"login_token": token, "user": "admin", "password": PASSWORD})

        first, page = timed(client, "/")
        rows = page.text.count('<tr data-account="')
        print(f"dashboard: {rows} accounts, {len(page.content)} bytes")
        print(f"{'dashboard, first load (tally counts all)':<44} {ms(first)}")
        loads = []
        for _ in range(args.loads):
            time.sleep(0.3)  # past the snapshot cache (RefreshSeconds / 2)
            loads.append(timed(client, "/")[0])
        summary("dashboard, each load reading the fleet", loads)
        fill(store, args.accounts, 100, 0, start=args.dead_letters)
        time.sleep(0.3)
        print(f"{'dashboard after 100 new dead letters':<44} {ms(timed(client, '/')[0])}")
        newest = [timed(client, "/dead-letters")[0] for _ in range(10)]
        summary("dead letters, newest page (50)", newest)
        middle = store.xrange("tb:dlq", count=args.dead_letters // 2)[-1][0].decode()
        summary("dead letters, a page in the middle", [timed(client, f"/dead-letters?before={middle}")[0]
                                                        for _ in range(10)])  # fmt: skip
        summary("dead letters, one account's page", [timed(client, "/dead-letters?account=api.acct07")[0]
                                                      for _ in range(10)])  # fmt: skip
        summary("logs, ERROR+ of one account", [timed(client, "/logs?level=ERROR&account=api.acct03")[0]
                                                 for _ in range(10)])  # fmt: skip
        if args.browser:
            summary("dashboard in Chromium (navigation to load)", browser_load(base, 10))
    finally:
        daemon.terminate()
        daemon.wait(20)
        log.close()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)


if __name__ == "__main__":
    main()
