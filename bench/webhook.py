"""Talk webhook benchmark: signed webhooks -> daemon -> 200.

Starts ``talkbridge run`` as its own process (embedded Redis with append-only
persistence unless ``--redis-url``), with one ``nctalkbot`` account in a
gateway with an ``api`` account, so the daemon also routes and delivers what
it accepts, as in production. From this process, over loopback, it POSTs
webhooks exactly as Talk sends them: PHP-escaped JSON, a fresh 64-character
random each, ``X-Nextcloud-Talk-Signature`` = HMAC-SHA256(secret, random +
body). Signing happens before the clock starts; the daemon's side —
verification, replay check, room tracking, the XADD — is all inside the
measured time-to-200.

With ``--ingress-only`` the account is in no gateway: the daemon only
accepts (its route loop reads and acknowledges), which isolates the webhook
path from the relay work measured by bench/relay.py.

- *throughput*: ``--concurrency`` connections as fast as they can for
  ``--seconds``; requests/s and time-to-200 percentiles;
- *fixed rate*: an open-loop schedule of ``--rate`` webhooks/s (latency from
  each request's scheduled time, so queueing is not hidden).

    python bench/webhook.py
    python bench/webhook.py --rate 3000 --seconds 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import hmac
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
SECRET = "bench-secret-" + "b" * 40
TOKEN = "benchroom"

CONFIG = """
[nctalkbot.bench]
Server = "http://127.0.0.1:9"
BotSecret = "{secret}"
{sink}
[redis]
{redis}
[http]
BindAddress = "127.0.0.1:{http}"
MaxBodyBytes = 1048576
[log]
Level = "warning"
"""

SINK = """
[api.sink]
BindAddress = "127.0.0.1:{api}"
Token = "sink"
Buffer = 1000
[[gateway]]
name = "bench"
enable = true
[[gateway.inout]]
account = "nctalkbot.bench"
channel = "{token}"
[[gateway.inout]]
account = "api.sink"
channel = "api"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def php_json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/").encode()


def webhook(i: int, host: str, path: str) -> bytes:
    """One complete HTTP/1.1 request, signed as Talk signs it."""
    content = php_json({"message": f"message {i} with a link https://example.com/p/{i} — ok", "parameters": []})
    body = php_json(
        {
            "type": "Create",
            "actor": {"type": "Person", "id": "users/alice", "name": "Alice", "talkParticipantType": "3"},
            "object": {
                "type": "Note",
                "id": str(1000 + i),
                "name": "message",
                "content": content.decode(),
                "mediaType": "text/markdown",
            },
            "target": {"type": "Collection", "id": TOKEN, "name": "Bench room"},
        }
    )
    random = base64.b64encode(os.urandom(48)).decode()  # 64 chars of A-Za-z0-9+/, like Talk's
    sig = hmac.new(SECRET.encode(), random.encode() + body, hashlib.sha256).hexdigest()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Nextcloud-Talk-Random: {random}\r\n"
        f"X-Nextcloud-Talk-Signature: {sig}\r\nX-Nextcloud-Talk-Backend: https://cloud.example.com/\r\n"
        "OCS-APIRequest: true\r\n\r\n"
    )
    return head.encode() + body


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Failed(Exception):
    pass


class Conn:
    """A keep-alive HTTP/1.1 connection: the load generator stays lean, so
    the two cores go to the daemon and Redis (Talk would be elsewhere)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, request: bytes) -> None:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = CONTENT_LENGTH.search(head)
        if m and int(m.group(1)):
            await self.reader.readexactly(int(m.group(1)))
        if status != 200:
            raise Failed(f"status {status}: {head[:200]!r}")

    def close(self) -> None:
        self.writer.close()


async def throughput(port: int, seconds: float, concurrency: int, items: list[bytes]) -> dict:
    lat: list[float] = []
    it = iter(items)
    conns = [await Conn.open(port) for _ in range(concurrency)]
    start = time.perf_counter()
    end = start + seconds

    async def worker(conn: Conn) -> None:
        for item in it:
            t0 = time.perf_counter()
            if t0 > end:
                return
            await conn.post(item)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return {"n": len(lat), "rate": len(lat) / elapsed, "lat": lat}


async def fixed_rate(port: int, seconds: float, rate: float, concurrency: int, items: list[bytes]) -> dict:
    """Open loop: request i is due at start + i/rate whatever happened before.
    ``lat`` is send-to-200; ``sched`` counts from the due time (queueing for
    a free connection included)."""
    lat: list[float] = []
    sched: list[float] = []
    total = int(seconds * rate)
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(concurrency):
        pool.put_nowait(await Conn.open(port))
    start = time.perf_counter()

    async def one(i: int) -> None:
        due = start + i / rate
        conn = await pool.get()
        t0 = time.perf_counter()
        await conn.post(items[i])
        t1 = time.perf_counter()
        pool.put_nowait(conn)
        lat.append(t1 - t0)
        sched.append(t1 - due)

    tasks = []
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    # Only the unfinished: gathering all 30,000 costs the client ~100 ms of
    # CPU while the last requests are in flight (it showed as a daemon "stall").
    await asyncio.gather(*[t for t in tasks if not t.done()])
    elapsed = time.perf_counter() - start
    while not pool.empty():
        pool.get_nowait().close()
    return {"n": total, "rate": total / elapsed, "lat": lat, "sched": sched}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux), to report CPU per webhook."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def report(name: str, res: dict, daemon_cpu: float) -> None:
    lat = [x * 1000 for x in res["lat"]]
    print(
        f"{name:>11}: {res['n']:6d} webhooks, {res['rate']:7.0f}/s, time-to-200 ms "
        f"p50 {pct(lat, 50):.2f}  p90 {pct(lat, 90):.2f}  p99 {pct(lat, 99):.2f}  max {max(lat):.2f}; "
        f"daemon CPU {daemon_cpu / res['n'] * 1e6:.0f} us/webhook"
    )
    if "sched" in res:
        sched = [x * 1000 for x in res["sched"]]
        print(f"{'':>11}  from the schedule: p50 {pct(sched, 50):.2f}  p99 {pct(sched, 99):.2f}  max {max(sched):.2f}")


async def wait_ready(http: int, proc: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited with {proc.returncode}")
            try:
                async with session.get(f"http://127.0.0.1:{http}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit("daemon not ready")


async def bench(args: argparse.Namespace, http: int, proc: subprocess.Popen) -> None:
    await wait_ready(http, proc)
    print("signing webhooks ... ", end="", flush=True)
    need = int(args.seconds * 12000) + int(args.rate * args.seconds) + 3000
    host, path = f"127.0.0.1:{http}", "/webhook/nextcloud/bench"
    items = [webhook(i, host, path) for i in range(need)]
    print(f"{len(items)} ready")
    # The pre-signed requests live for the whole run: keep them out of the
    # collector's scans, or a full collection stalls this client (not the daemon).
    gc.collect()
    gc.freeze()
    await throughput(http, 2, args.concurrency, items[:3000])  # warm-up (connections, caches)
    rest = items[3000:]
    if not args.skip_throughput:
        cpu = cpu_seconds(proc.pid)
        res = await throughput(http, args.seconds, args.concurrency, rest)
        rest = rest[res["n"] :]
        report("throughput", res, cpu_seconds(proc.pid) - cpu)
    cpu = cpu_seconds(proc.pid)
    res = await fixed_rate(http, args.seconds, args.rate, args.concurrency * 2, rest)
    report(f"{args.rate:.0f}/s fixed", res, cpu_seconds(proc.pid) - cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=float, default=3000)
    p.add_argument("--redis-url", default="", help="use this Redis instead of the embedded one")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument(
        "--ingress-only",
        action="store_true",
        help="no gateway: the daemon only accepts webhooks (default: it also routes them to an api account)",
    )
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="tb-bench-webhook-") as tmp:
        http = free_port()
        redis = f'URL = "{args.redis_url}"' if args.redis_url else f'DataDir = "{tmp}/data"'
        config = Path(tmp) / "bench.toml"
        sink = "" if args.ingress_only else SINK.format(api=free_port(), token=TOKEN)
        config.write_text(CONFIG.format(secret=SECRET, sink=sink, redis=redis, http=http))
        daemon = subprocess.Popen([sys.executable, "-m", "bridge.cli", "run", "--config", str(config)], cwd=ROOT)
        try:
            asyncio.run(bench(args, http, daemon))
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()


if __name__ == "__main__":
    main()
