"""Relay benchmark: api -> daemon -> api, POST to /api/stream.

Starts ``talkbridge run`` as its own process on the embedded default (a
private Redis with append-only persistence: durability on), opens
``/api/stream`` on the receiving account, and POSTs to the sending account
from this process over loopback. Two runs:

- *throughput*: ``--concurrency`` posters as fast as they can for
  ``--seconds``; prints delivered messages/s and latency percentiles;
- *fixed rate*: an open-loop schedule of ``--rate`` messages/s (a late
  message is not excused: latency counts from its scheduled time), which is
  the latency a user sees at that load.

    python bench/relay.py                      # both runs, defaults
    python bench/relay.py --rate 2000 --seconds 20
    python bench/relay.py --instances 2        # two daemons on one Redis: accounts spread over them
    python bench/relay.py --with-replica --min-replicas 1   # a master and a replica; acknowledged = on it
    python bench/relay.py --redis-url redis+sentinel://127.0.0.1:26379/mymaster --min-replicas 1
    python bench/relay.py --with-sentinel --min-replicas 1   # the suite's Sentinel rig, started for the run

``--redis-url`` runs the daemon on a Redis of yours (an empty one: the
accounts' streams and buffers are not cleared first); ``--with-replica``
starts a master (append-only, everysec, as the embedded default) and one
replica of it on loopback; ``--min-replicas`` is ``[redis] MinReplicas``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import uvloop
except ImportError:  # the figures in docs/benchmarks.md were taken with uvloop
    uvloop = None

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """
[api.sender]
BindAddress = "127.0.0.1:{a}"
Token = "bench-a"
Buffer = 100000
[api.receiver]
BindAddress = "127.0.0.1:{b}"
Token = "bench-b"
Buffer = 100000
RemoteNickFormat = "[{{PROTOCOL}}/{{BRIDGE}}] <{{NICK}}> "
[[gateway]]
name = "bench"
enable = true
[[gateway.inout]]
account = "api.sender"
channel = "api"
[[gateway.inout]]
account = "api.receiver"
channel = "api"
[redis]
{redis}
[http]
BindAddress = "127.0.0.1:{http}"
[log]
Level = "warning"
"""


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Http:
    """A minimal keep-alive HTTP/1.1 client: the load generator shares the
    machine's two cores with the daemon, so it must cost little."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Http:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def post(self, path: str, body: bytes) -> int:
        assert self.reader and self.writer
        self.writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\n" + self.auth
            + b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    async def stream_lines(self, path: str):
        """GET a chunked response and yield its lines."""
        assert self.reader and self.writer
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\n" + self.auth + b"\r\n")
        await self.reader.readuntil(b"\r\n\r\n")
        pending = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                return
            pending += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line


def body(text: str) -> bytes:
    return json.dumps({"text": text, "username": "bench", "gateway": "bench"}).encode()


class Receiver:
    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.count = 0
        self.last = 0.0
        self.arrived = asyncio.Event()

    async def run(self, port: int, ready: asyncio.Event) -> None:
        client = await Http(port, "bench-b").open()
        async for line in client.stream_lines("/api/stream"):
            now = time.perf_counter()
            msg = json.loads(line)
            if msg.get("event") == "api_connected":
                ready.set()
                continue
            started = self.sent.pop(msg["text"], None)
            if started is not None:
                self.latencies.append(now - started)
            self.count += 1
            self.last = now
            self.arrived.set()

    async def wait_for(self, count: int, within: float) -> None:
        deadline = time.perf_counter() + within
        while self.count < count and time.perf_counter() < deadline:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), max(0.01, deadline - time.perf_counter()))
            except TimeoutError:
                break


async def throughput(port: int, recv: Receiver, seconds: float, concurrency: int) -> dict:
    deadline = time.perf_counter() + seconds
    counter = 0

    async def poster(n: int) -> None:
        nonlocal counter
        client = await Http(port, "bench-a").open()
        while time.perf_counter() < deadline:
            counter += 1
            text = f"t{n}-{counter}"
            recv.sent[text] = time.perf_counter()
            assert await client.post("/api/message", body(text)) == 200

    start_count, start = recv.count, time.perf_counter()
    recv.latencies.clear()
    await asyncio.gather(*(poster(i) for i in range(concurrency)))
    await recv.wait_for(start_count + counter, 30)
    delivered = recv.count - start_count
    return {
        "posted": counter,
        "delivered": delivered,
        "rate": delivered / (recv.last - start),
        "lat": list(recv.latencies),
    }


async def fixed_rate(port: int, recv: Receiver, seconds: float, rate: float, concurrency: int) -> dict:
    total = int(seconds * rate)
    start = time.perf_counter() + 0.2
    next_index = 0

    async def poster() -> None:
        nonlocal next_index
        client = await Http(port, "bench-a").open()
        while next_index < total:
            i, next_index = next_index, next_index + 1
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            text = f"r{i}"
            recv.sent[text] = due  # open loop: latency counts from the scheduled time
            assert await client.post("/api/message", body(text)) == 200

    start_count = recv.count
    recv.latencies.clear()
    await asyncio.gather(*(poster() for _ in range(concurrency)))
    await recv.wait_for(start_count + total, 30)
    achieved = (recv.count - start_count) / max(1e-9, recv.last - start)
    return {"posted": total, "delivered": recv.count - start_count, "rate": achieved, "lat": list(recv.latencies)}


def report(name: str, result: dict) -> None:
    lat = [x * 1000 for x in result["lat"]]
    print(
        f"{name}: posted {result['posted']}, delivered {result['delivered']}, {result['rate']:.0f} msg/s; "
        f"latency ms p50 {pct(lat, 50):.2f} p90 {pct(lat, 90):.2f} p99 {pct(lat, 99):.2f} max {max(lat, default=0):.2f}"
        f" (mean {statistics.fmean(lat) if lat else 0:.2f})"
    )


async def scrape_latency(https: list[int]) -> dict[float, float]:
    """The daemons' own POST -> buffer histogram (cumulative bucket counts)."""
    buckets: dict[float, float] = {}
    for http in https:
        reader, writer = await asyncio.open_connection("127.0.0.1", http)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        text = (await reader.read()).decode()
        writer.close()
        for line in text.splitlines():
            if line.startswith('talkbridge_delivery_latency_seconds_bucket{account="api.receiver"'):
                le = line.split('le="')[1].split('"')[0]
                key = float("inf") if le == "+Inf" else float(le)
                buckets[key] = buckets.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """Upper bound of the bucket holding quantile q of what happened in between."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in sorted(after)}
    total = delta.get(float("inf"), 0)
    for le, count in delta.items():
        if total and count >= q * total:
            return f"<= {le * 1000:g}"
    return "n/a"


async def bench(args: argparse.Namespace, a: int, b: int, https: list[int]) -> int:
    """Both runs; returns how many messages were posted in all (the warm-up's too)."""
    recv = Receiver()
    ready = asyncio.Event()
    reader = asyncio.create_task(recv.run(b, ready))
    await asyncio.wait_for(ready.wait(), 10)
    posted = (await throughput(a, recv, 1.0, args.concurrency))["posted"]  # warm-up
    if not args.skip_throughput:
        result = await throughput(a, recv, args.seconds, args.concurrency)
        report(f"throughput (concurrency {args.concurrency}, {args.seconds:.0f}s)", result)
        posted += result["posted"]
    before = await scrape_latency(https)
    result = await fixed_rate(a, recv, args.seconds, args.rate, args.concurrency)
    report(f"fixed rate {args.rate:.0f}/s ({args.seconds:.0f}s)", result)
    after = await scrape_latency(https)
    print(
        "  daemon-side POST->buffer (histogram buckets) ms: "
        f"p50 {bucket_quantile(before, after, 0.5)}, p99 {bucket_quantile(before, after, 0.99)}"
    )
    reader.cancel()
    return posted + result["posted"]


def start_pair(tmp: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A master (append-only, everysec) and one replica on loopback: its URL, the processes."""
    sys.path.insert(0, str(ROOT))
    from bridge.embedded_redis import find_redis_server  # the server the daemon embeds

    binary, master, replica = find_redis_server(), free_port(), free_port()
    procs = []
    for port, extra in ((master, ["--appendonly", "yes", "--appendfsync", "everysec"]),
                        (replica, ["--replicaof", "127.0.0.1", str(master)])):  # fmt: skip
        data = tmp / f"redis-{port}"
        data.mkdir()
        procs.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "", *extra],
            stdout=subprocess.DEVNULL,
        ))  # fmt: skip

    def linked() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", master), timeout=0.5) as s:
                s.sendall(b"INFO replication\r\n")
                return b"connected_slaves:1" in s.recv(65536)
        except OSError:
            return False

    wait_until(linked, "the replica's link")
    return f"redis://127.0.0.1:{master}/0", procs


def command_counts(url: str) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats): round
    trips do not depend on how busy the machine is, timings do."""
    import redis  # redis-py, the daemon's client

    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def wait_until(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def connected_counts(http_ports: list[int]) -> list[int]:
    counts = []
    for port in http_ports:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            states = json.loads(data.split(b"\r\n\r\n", 1)[1]).get("accounts", {})
            counts.append(sum(1 for v in states.values() if v == "connected"))
        except (OSError, ValueError, IndexError):
            counts.append(0)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument(
        "--instances", type=int, default=1,
        help="daemon instances on one Redis (>1: a redis-server with appendonly everysec is started for them)",
    )  # fmt: skip
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--redis-url", default="", help="use this (empty) Redis instead of the embedded one")
    p.add_argument("--with-replica", action="store_true", help="start a master and one replica for the daemon")
    p.add_argument("--with-sentinel", action="store_true", help="start the Sentinel rig (tests/sentinel_rig.py)")
    p.add_argument("--min-replicas", type=int, default=0, help="[redis] MinReplicas")
    args = p.parse_args()

    a, b = free_port(), free_port()
    https = [free_port() for _ in range(args.instances)]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        servers: list[subprocess.Popen[bytes]] = []
        if args.redis_url:
            redis = f'URL = "{args.redis_url}"'
        elif args.with_replica:
            url, servers = start_pair(Path(tmp))
            redis = f'URL = "{url}"'
        elif args.with_sentinel:
            sys.path.insert(0, str(ROOT))
            from tests.sentinel_rig import SentinelRig  # the suite's rig: a master, two replicas, three sentinels

            rig = SentinelRig(Path(tmp) / "sentinel").start()
            servers = list(rig.procs.values())
            redis = f'URL = "{rig.url}"'
        elif args.instances == 1:
            redis = 'DataDir = "data"\nAppendFsync = "everysec"'  # the embedded default
        else:
            sys.path.insert(0, str(ROOT))
            from bridge.embedded_redis import EmbeddedRedis  # the same server the daemon embeds

            server = EmbeddedRedis(Path(tmp) / "shared-redis", appendfsync="everysec")
            redis = f'URL = "{server.start()}"'
        redis += f"\nMinReplicas = {args.min_replicas}"
        try:
            for i, http in enumerate(https):
                config = Path(tmp) / f"bench{i}.toml"
                config.write_text(CONFIG.format(a=a, b=b, http=http, redis=redis))
                procs.append(
                    subprocess.Popen([sys.executable, "-m", "bridge.cli", "run", "--config", str(config)], cwd=ROOT)
                )
            wait_until(lambda: accepts(a) and accepts(b), "both api accounts")
            if args.instances > 1:
                wait_until(lambda: all(connected_counts(https)), "accounts spread over the instances")
            where = (
                args.redis_url.partition("://")[0] + " URL" if args.redis_url
                else "append-only, appendfsync everysec, " + (
                    "a master and one replica" if args.with_replica
                    else "a master, two replicas and three sentinels (redis+sentinel://)" if args.with_sentinel
                    else "embedded" if args.instances == 1 else "shared"
                )
            )  # fmt: skip
            print(
                f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}; "
                f"{args.instances} daemon instance(s); redis: {where}; MinReplicas {args.min_replicas}"
            )
            before = command_counts(url) if args.with_replica else {}
            with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
                posted = runner.run(bench(args, a, b, https))
            if args.with_replica:  # the whole run: warm-up, throughput and fixed rate
                after = command_counts(url)
                calls = {k: v - before.get(k, 0) for k, v in after.items()}
                named = ("wait", "xadd", "evalsha", "xrange", "xdel", "set")
                print(
                    f"  master, per message posted ({posted}): {sum(calls.values()) / posted:.2f} commands; "
                    + ", ".join(f"{calls.get(n, 0) / posted:.3f} {n}" for n in named)
                )
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(20)
            if args.instances > 1 and not (args.redis_url or args.with_replica or args.with_sentinel):
                server.stop()
            for proc in servers:
                proc.terminate()
                proc.wait(20)


if __name__ == "__main__":
    main()
