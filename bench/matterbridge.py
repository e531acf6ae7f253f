"""Matterbridge client benchmark (issue 21): IRC -> Matterbridge -> talkbridge
and back, at a fixed rate, in each receive mode.

Each run starts its own two processes and stops them afterwards, so no run
inherits another's backlog:

- the test Matterbridge 1.26 (tests/mbserver, ``python -m tests.mbserver``):
  an api account ``api.tb`` (``Buffer`` = ``--buffer``) and a network account
  ``irc.libera`` in its gateway ``team`` (outbound runs add ``api.watch``,
  below), driven through its control listener;
- ``talkbridge run`` on its embedded Redis (append-only, everysec):
  ``[matterbridge.mb]`` on ``api.tb`` with ``Receive`` = the mode, and an
  ``[api.out]`` account of its own in the same talkbridge gateway, used both
  ways (talkbridge never hands a message back to the account it came from).

Directions:

- *in*: the bench says messages on ``irc.libera`` (``POST /say`` on the
  control listener, one keep-alive connection, one at a time, so they enter
  Matterbridge in order) on an open-loop schedule of ``--rate`` per second
  for ``--seconds``, and reads them on talkbridge's ``/api/stream`` of
  ``api.out``;
- *out*: the bench posts them to ``api.out`` (``POST /api/message``) on the
  same schedule; what ``irc.libera`` heard is counted from the control
  listener's ``/heard`` after the drain (its answer is everything heard so
  far, too dear to poll at 100/s on these two cores), and arrival times are
  taken from a websocket on a second Matterbridge api account, ``api.watch``,
  in the same gateway: the router hands each message to ``irc.libera`` and
  to ``api.watch`` in one pass, and melody broadcasts at once.

Each text carries its sequence number and its scheduled send time; latency
counts from that time (a late say is not excused), and the say's own lag
behind the schedule is printed to show the control listener keeps up.
Duplicates are arrivals of a number already seen; out of order, messages
that arrived ahead of one sent before them ("early") and messages that
arrived after one sent after them ("overtaken": one message early by 40
places makes 1 early and 40 overtaken). "Lost" is what had not arrived ``--drain`` seconds after the last send (the
drain stops early once everything arrived, or, inbound, once Matterbridge's
ring is empty and nothing arrived for a while); "ring" is how many messages
``api.tb``'s ring still held at the end (in stream mode: still to come; in
websocket mode: copies of what the websocket already carried; in poll mode:
what the next poll would take).

    python bench/matterbridge.py                                  # websocket, stream, poll; 5, 20, 100/s; 2 rounds
    python bench/matterbridge.py --receive poll --poll-seconds 0.2 --rates 20 --rounds 1
    python bench/matterbridge.py --direction in --buffer 10
    python bench/matterbridge.py --direction in --receive websocket --buffer 10 --rates 1000 --seconds 0.2  # a burst

``--redis-url`` runs the daemon on a Redis of yours (FLUSHDB before each
run) instead of the embedded one, e.g. to watch it with ``redis-cli
monitor``; ``--dump DIR`` writes each run's arrivals (numbers in arrival
order, with their latencies) as JSON.

Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

try:
    import uvloop
except ImportError:  # the figures in docs/benchmarks.md were taken with uvloop
    uvloop = None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.mbserver.rig import MatterbridgeProcess  # noqa: E402  (the suite's test Matterbridge, as a process)

MB_TOKEN, API_TOKEN, WATCH_TOKEN = "bench-mb", "bench-api", "bench-watch"
IRC = "irc.libera"
TEXT = re.compile(r"(bench|warm) (\d+) (\d+\.\d+)")

CONFIG = """
[matterbridge.mb]
URL = "http://127.0.0.1:{mb}"
Token = "{mb_token}"
Receive = "{receive}"
PollSeconds = {poll}
RemoteNickFormat = "[{{PROTOCOL}}] <{{NICK}}> "
[api.out]
BindAddress = "127.0.0.1:{api}"
Token = "{api_token}"
Buffer = 100000
[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "matterbridge.mb"
channel = "team"
[[gateway.inout]]
account = "api.out"
channel = "api"
[redis]
{redis}
[http]
BindAddress = "127.0.0.1:{http}"
[log]
Level = "warning"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mb_config(mb: int, control: int, buffer: int, watch: int | None) -> dict:
    accounts = {
        "api.tb": {"BindAddress": f"127.0.0.1:{mb}", "Token": MB_TOKEN, "Buffer": buffer, "RemoteNickFormat": "{NICK}"},
        IRC: {"RemoteNickFormat": "[{PROTOCOL}] <{NICK}> "},
    }
    inout = [{"account": "api.tb", "channel": "api"}, {"account": IRC, "channel": "#team"}]
    if watch is not None:
        accounts["api.watch"] = {"BindAddress": f"127.0.0.1:{watch}", "Token": WATCH_TOKEN}
        inout.append({"account": "api.watch", "channel": "api"})
    return {"accounts": accounts, "gateways": [{"name": "team", "inout": inout}], "control": f"127.0.0.1:{control}"}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Arrivals:
    """What arrived: (sequence number, arrival time) in arrival order, and the scheduled times."""

    due: dict[int, float] = field(default_factory=dict)
    seen: list[tuple[int, float]] = field(default_factory=list)
    warm: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, text: str, now: float) -> None:
        match = TEXT.search(text)
        if match is None:
            return
        if match[1] == "warm":
            self.warm += 1
        else:
            self.seen.append((int(match[2]), now))
        self.changed.set()

    def distinct(self) -> int:
        return len({seq for seq, _ in self.seen})


@dataclass
class Result:
    mode: str
    direction: str
    rate: float
    sent: int
    arrived: int
    dup: int
    reordered: int
    overtaken: int
    latencies: list[float]
    say_lag: list[float]
    ring: int
    drained: float
    load: float
    warnings: list[str]

    def line(self) -> str:
        lat = [x * 1000 for x in self.latencies]
        lag = [x * 1000 for x in self.say_lag]
        return (
            f"{self.direction:3} {self.mode:9} {self.rate:5.0f}/s: sent {self.sent}, arrived {self.arrived}, "
            f"lost {self.sent - self.arrived}, dup {self.dup}, out of order {self.reordered} early "
            f"and {self.overtaken} overtaken; latency ms "
            f"p50 {pct(lat, 50):.1f} p90 {pct(lat, 90):.1f} p99 {pct(lat, 99):.1f} max {max(lat, default=0):.1f}; "
            f"send lag ms p99 {pct(lag, 99):.1f} max {max(lag, default=0):.1f}; ring at end {self.ring}; "
            f"drain {self.drained:.1f}s; load {self.load:.2f}"
        )

    def row(self) -> str:
        lat = [x * 1000 for x in self.latencies]
        figures = " / ".join(f"{v:,.0f}" if v >= 100 else f"{v:.1f}" for v in
                             (pct(lat, 50), pct(lat, 90), pct(lat, 99), max(lat, default=float("nan"))))  # fmt: skip
        return (
            f"| {self.mode} | {self.rate:g}/s | {self.sent} | {self.arrived} | {self.sent - self.arrived} | "
            f"{self.dup} | {self.reordered} / {self.overtaken} | {figures} | {self.ring} |"
        )


def order_figures(seen: list[tuple[int, float]]) -> tuple[int, int, int]:
    """Duplicates (arrivals of a number already seen), messages out of order
    (first arrivals ahead of a message sent before them) and messages overtaken
    (first arrivals after a message sent after them)."""
    firsts: list[int] = []
    known: set[int] = set()
    for seq, _ in seen:
        if seq not in known:
            known.add(seq)
            firsts.append(seq)
    early = overtaken = 0
    highest, lowest_after = -1, float("inf")
    for seq in firsts:
        overtaken += seq < highest
        highest = max(highest, seq)
    for seq in reversed(firsts):
        early += seq > lowest_after
        lowest_after = min(lowest_after, seq)
    return len(seen) - len(firsts), early, overtaken


class Run:
    """One run: both processes, one direction, one mode, one rate."""

    def __init__(self, args: argparse.Namespace, tmp: Path, mode: str, rate: float, direction: str) -> None:
        self.args, self.mode, self.rate, self.direction = args, mode, rate, direction
        self.dir = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{direction}-{mode}-{rate:g}-"))
        self.mb_port, self.control, self.api, self.http = free_port(), free_port(), free_port(), free_port()
        self.watch = free_port() if direction == "out" else None
        self.arrivals = Arrivals()
        self.log = self.dir / "talkbridge.log"

    def redis_section(self) -> str:
        if not self.args.redis_url:
            return 'DataDir = "data"\nAppendFsync = "everysec"'  # the embedded default
        import redis  # redis-py, the daemon's client

        with redis.Redis.from_url(self.args.redis_url) as client:
            client.flushdb()  # each run on an empty database: the inbound stream below is this run's
        return f'URL = "{self.args.redis_url}"\nKeyPrefix = "tb"'

    # processes --------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        config = mb_config(self.mb_port, self.control, self.args.buffer, self.watch)
        self.mb = MatterbridgeProcess(config, self.dir).start()
        path = self.dir / "talkbridge.toml"
        path.write_text(CONFIG.format(mb=self.mb_port, mb_token=MB_TOKEN, receive=self.mode, api=self.api,
                                      api_token=API_TOKEN, http=self.http, poll=self.args.poll_seconds,
                                      redis=self.redis_section()))  # fmt: skip
        with self.log.open("wb") as log:
            self.daemon = subprocess.Popen([sys.executable, "-m", "bridge.cli", "run", "--config", str(path)],
                                           cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while not accepts(self.api):
            if time.monotonic() > deadline or self.daemon.poll() is not None:
                raise SystemExit(f"talkbridge did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> list[str]:
        self.daemon.send_signal(signal.SIGTERM)
        self.daemon.wait(30)
        self.mb.stop()
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if "WARNING" in line or "ERROR" in line or "Traceback" in line]

    # readers ----------------------------------------------------------------------------------------------------------
    async def read_api_out(self, http: aiohttp.ClientSession, ready: asyncio.Event) -> None:
        """talkbridge's /api/stream of api.out: one JSON line per message."""
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        async with http.get(f"http://127.0.0.1:{self.api}/api/stream", headers=headers, timeout=None) as answer:
            assert answer.status == 200, answer.status
            while line := await answer.content.readline():
                now = time.perf_counter()
                message = json.loads(line)
                if message.get("event") == "api_connected":
                    ready.set()
                    continue
                self.arrivals.note(message.get("text", ""), now)

    async def read_watch(self, http: aiohttp.ClientSession, ready: asyncio.Event) -> None:
        """Matterbridge's websocket of api.watch: each message as the router routes it."""
        headers = {"Authorization": f"Bearer {WATCH_TOKEN}"}
        async with http.ws_connect(f"http://127.0.0.1:{self.watch}/api/websocket", headers=headers) as ws:
            async for frame in ws:
                now = time.perf_counter()
                message = json.loads(frame.data)
                if message.get("event") == "api_connected":
                    ready.set()
                    continue
                self.arrivals.note(message.get("text", ""), now)

    # senders ----------------------------------------------------------------------------------------------------------
    async def say(self, http: aiohttp.ClientSession, text: str) -> None:
        body = {"account": IRC, "channel": "#team", "text": text, "username": "ircbob", "userid": "ircbob!u@host"}
        async with http.post(f"http://127.0.0.1:{self.control}/say", json=body) as answer:
            assert answer.status == 200, await answer.text()

    async def post(self, http: aiohttp.ClientSession, text: str) -> None:
        body = {"text": text, "username": "zoe", "gateway": "g"}
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        async with http.post(f"http://127.0.0.1:{self.api}/api/message", json=body, headers=headers) as answer:
            assert answer.status == 200, await answer.text()

    async def ring(self, http: aiohttp.ClientSession) -> int:
        async with http.get(f"http://127.0.0.1:{self.control}/ring", params={"account": "api.tb"}) as answer:
            return int((await answer.json())["size"])

    async def heard(self, http: aiohttp.ClientSession) -> list[tuple[int, float]]:
        """What irc.libera heard, in order (times: none, counts only)."""
        async with http.get(f"http://127.0.0.1:{self.control}/heard", params={"account": IRC}) as answer:
            heard = await answer.json()
        out = []
        for message in heard:
            match = TEXT.search(message.get("text", ""))
            if match is not None and match[1] == "bench":
                out.append((int(match[2]), 0.0))
        return out

    # the run ----------------------------------------------------------------------------------------------------------
    async def warm_up(self, http: aiohttp.ClientSession, send) -> None:
        """One message through, repeated until it arrives: every side connected."""
        deadline = time.monotonic() + 60
        while self.arrivals.warm == 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing came through in 60 s; talkbridge's log:\n{self.log.read_text()[-3000:]}")
            await send(http, f"warm 0 {time.perf_counter():.6f}")
            self.arrivals.changed.clear()
            try:
                await asyncio.wait_for(self.arrivals.changed.wait(), 1.0)
            except TimeoutError:
                pass
        await asyncio.sleep(1.0)  # the websocket's catch-up over, the warm-up's stream copies handed over

    async def go(self) -> Result:
        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector) as http:
            ready = asyncio.Event()
            reader = self.read_api_out if self.direction == "in" else self.read_watch
            reading = asyncio.create_task(reader(http, ready))
            await asyncio.wait_for(ready.wait(), 30)
            send = self.say if self.direction == "in" else self.post
            await self.warm_up(http, send)
            load = os.getloadavg()[0]
            self.arrivals.seen.clear()
            total = round(self.args.seconds * self.rate)
            lag: list[float] = []
            start = time.perf_counter() + 0.1
            for i in range(total):  # open loop, one request at a time: they leave in order
                due = start + i / self.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                self.arrivals.due[i] = due
                await send(http, f"bench {i} {due:.6f}")
                lag.append(time.perf_counter() - due)
            ended = time.perf_counter()
            quiet = max(2.0, 2 * self.args.poll_seconds)
            last_count, last_change = -1, ended
            while time.perf_counter() - ended < self.args.drain:
                count = self.arrivals.distinct()
                if count >= total:
                    break
                now = time.perf_counter()
                if count != last_count:
                    last_count, last_change = count, now
                elif now - last_change > quiet and (self.direction == "out" or await self.ring(http) == 0):
                    break
                await asyncio.sleep(0.1)
            drained = time.perf_counter() - ended
            ring = await self.ring(http)
            reading.cancel()
            seen = list(self.arrivals.seen)
            if self.direction == "out":
                heard = await self.heard(http)
                if sorted({s for s, _ in heard}) != sorted({s for s, _ in seen}):
                    print(f"  note: api.watch saw {len({s for s, _ in seen})}, irc heard {len({s for s, _ in heard})}")
                counted = heard
            else:
                counted = seen
        first: dict[int, float] = {}
        for seq, at in seen:
            first.setdefault(seq, at)
        latencies = [at - self.arrivals.due[seq] for seq, at in first.items()]
        dup, reordered, overtaken = order_figures(counted)
        if self.args.dump:
            name = f"{self.direction}-{self.mode}-{self.rate:g}-{time.strftime('%H%M%S')}.json"
            arrivals = [[seq, round(at - self.arrivals.due[seq], 4)] for seq, at in seen]
            (Path(self.args.dump) / name).write_text(json.dumps({"counted": [s for s, _ in counted],
                                                                  "arrivals": arrivals}))  # fmt: skip
        arrived = len({seq for seq, _ in counted})
        return Result(self.mode, self.direction, self.rate, total, arrived, dup, reordered, overtaken, latencies, lag,
                      ring, drained, load, [])  # fmt: skip


def run_one(args: argparse.Namespace, tmp: Path, mode: str, rate: float, direction: str) -> Result:
    run = Run(args, tmp, mode, rate, direction)
    run.start()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
            result = runner.run(run.go())
    finally:
        warnings = run.stop()
    result.warnings = warnings
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--receive", nargs="+", default=["websocket", "stream", "poll"],
                   choices=["auto", "websocket", "stream", "poll"], help="receive modes, alternated")  # fmt: skip
    p.add_argument("--rates", "--rate", nargs="+", type=float, default=[5, 20, 100], help="messages per second")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--drain", type=float, default=20, help="seconds after the last send to wait for arrivals")
    p.add_argument("--buffer", type=int, default=1000, help="Buffer of Matterbridge's api account api.tb")
    p.add_argument("--poll-seconds", type=float, default=1, help="PollSeconds of [matterbridge.mb]")
    p.add_argument("--direction", choices=["in", "out", "both"], default="both")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--redis-url", default="", help="an empty Redis of yours (FLUSHDB before each run) instead of the "
                   "embedded one")  # fmt: skip
    p.add_argument("--dump", default="", help="a directory: each run's arrivals (sequence numbers, in order) as JSON")
    args = p.parse_args()

    directions = ["in", "out"] if args.direction == "both" else [args.direction]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
        f"uvloop {getattr(uvloop, '__version__', 'absent')}; Buffer {args.buffer}, PollSeconds {args.poll_seconds}, "
        f"{args.seconds:g} s per run, drain up to {args.drain:g} s; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-mb-") as tmp:
        for _ in range(args.rounds):
            for rate in args.rates:
                for direction in directions:
                    for mode in args.receive:  # alternated: websocket, stream, poll, websocket, ...
                        result = run_one(args, Path(tmp), mode, rate, direction)
                        results.append(result)
                        print(result.line(), flush=True)
                        for warning in result.warnings[:5]:
                            print(f"  talkbridge: {warning}")
                        if len(result.warnings) > 5:
                            print(f"  talkbridge: ... {len(result.warnings) - 5} more warnings")
    for direction in directions:
        print(f"\n{direction}: | mode | rate | sent | arrived | lost | dup | early / overtaken | "
              "latency p50 / p90 / p99 / max ms | ring at end |")  # fmt: skip
        for result in sorted((r for r in results if r.direction == direction),
                             key=lambda r: (r.rate, args.receive.index(r.mode))):  # fmt: skip
            print(result.row())


if __name__ == "__main__":
    main()
