"""Poll rooms: one Talk user account (``[nctalk.bench]``) long-polling many rooms at once.

The Talk test server (``tests/talkserver``) runs in a child process of its
own (its own interpreter: 500 held polls and the posting load must not share
the daemon's GIL), with ``--rooms`` rooms, each holding Alice and the
account's user. ``talkbridge run`` runs as its own process on the embedded
default Redis (append-only, ``appendfsync everysec``; or ``--redis-url``),
with the account joined to every room.

*Idle*: once every room's long poll is held at the server, the daemon's CPU
over ``--idle-seconds`` (Talk answers a held poll with 304 after 30 s, so
each room asks again twice a minute) and its RSS, open fds, threads and
asyncio tasks. RSS per room is (RSS with ``--rooms`` rooms - RSS of the same
daemon with one room (two with ``--mode pairs``), measured first) / the
difference in rooms.

*Busy*: an open-loop schedule of ``--rate`` messages/s in total for
``--busy-seconds``, by Alice, round robin over all the rooms (a message is
due at ``start + i / rate`` whatever happened before; a late one counts its
lag from then). ``--mode api``: each room is in a gateway with an ``api``
account, read with ``/api/stream``; ``--mode pairs``: the rooms in pairs,
each message posted by the bridge into the other room of its pair (poll,
route and a ``POST chat`` per message: Talk to Talk, as seed 002 does).
Prints messages/s relayed during the load, the lag from the scheduled time
to the arrival (p50/p99/max), the daemon's CPU, and whether every message
arrived exactly once.

    python bench/poll_rooms.py                              # 500 rooms, api mode, 500 msg/s for 20 s
    python bench/poll_rooms.py --mode pairs --rate 200
    python bench/poll_rooms.py --rooms 100 --idle-seconds 30 --busy-seconds 10 --json /tmp/poll.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import uvloop
except ImportError:
    uvloop = None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.talkserver and bench.soak's helpers, and bridge for a worktree run

from bench.soak import (  # noqa: E402  (after the path)
    Http,
    commit_of,
    free_port,
    get,
    pct,
    pipe_recv,
    proc_cpu,
    proc_fds,
    proc_rss,
    proc_status,
    scrape,
    wait_ready,
)

ACCOUNT = "nctalk.bench"
PASSWORD = "bench-app-password-Zq8w-Lk2p"
SINK_TOKEN = "bench-sink"
MARKER = re.compile(rb"poll (\d{9})")
TASKS = "talkbridge_asyncio_tasks"


def room(i: int) -> str:
    return f"room{i:05d}"


def text_of(i: int) -> str:
    return f"poll {i:09d} a message in a busy room"


def config_text(args: argparse.Namespace, rooms: int, talk_url: str, http: int, sink: int, redis: str) -> str:
    out = f"""
[nctalk.bench]
Server = "{talk_url}"
Login = "bridge"
Password = "{PASSWORD}"
RemoteNickFormat = "[{{NICK}}] "
PollTimeout = 30

[redis]
{redis}

[http]
BindAddress = "127.0.0.1:{http}"

[log]
Level = "warning"
"""
    if args.mode == "api":
        out += f'[api.sink]\nBindAddress = "127.0.0.1:{sink}"\nToken = "{SINK_TOKEN}"\nBuffer = 100000\n'
        for i in range(rooms):
            out += (
                f'[[gateway]]\nname = "r{i}"\nenable = true\n'
                f'[[gateway.inout]]\naccount = "{ACCOUNT}"\nchannel = "{room(i)}"\n'
                '[[gateway.inout]]\naccount = "api.sink"\nchannel = "api"\n'
            )
    else:
        for i in range(0, rooms - 1, 2):
            out += (
                f'[[gateway]]\nname = "p{i}"\nenable = true\n'
                f'[[gateway.inout]]\naccount = "{ACCOUNT}"\nchannel = "{room(i)}"\n'
                f'[[gateway.inout]]\naccount = "{ACCOUNT}"\nchannel = "{room(i + 1)}"\n'
            )
    return out


# --- the Talk side (a child process) -------------------------------------------------
def talk_process(conn: Any, port: int, rooms: int) -> None:
    """The Talk test server with the rooms, Alice's share of the load, and
    (pairs mode) the count of what the bridge posts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us in order
    from tests.talkserver import TalkServer

    class BenchTalk(TalkServer):
        def __init__(self) -> None:
            super().__init__(version=21, bruteforce_delay_scale=0)
            self.counts = bytearray()  # copies the bridge posted, per message index
            self.arrivals: list[tuple[int, float]] = []  # (message index, seconds after the load's start)
            self.load_start = 0.0
            self.rate = 1.0

        async def after_chat_message(self, msg: Any) -> None:
            if msg.actor.id == "bridge":
                m = MARKER.search(msg.message.encode())
                if m:
                    i = int(m.group(1))
                    if i < len(self.counts) and self.counts[i] < 255:
                        self.counts[i] += 1
                    self.arrivals.append((i, time.monotonic() - self.load_start))
            await super().after_chat_message(msg)

    async def main() -> None:
        server = BenchTalk()
        await server.start(port=port)
        alice = server.add_user("alice", "Alice")
        bridge = server.add_user("bridge", "Bridge", password=PASSWORD)
        for i in range(rooms):
            server.create_room(f"Room {i}", room(i), members=(alice, bridge))
        statuses: dict[str, int] = {}
        posting: set[asyncio.Task[None]] = set()
        posted = failed = 0
        load: asyncio.Task[None] | None = None

        held_over = 0  # requests not answered yet at the last tally (held polls), kept in the log

        def tally() -> int:
            """Answers by status; returns the requests received since the last tally."""
            nonlocal held_over
            received = len(server.user_requests) - held_over
            keep = []
            for req in server.user_requests:
                if req.status == 0:
                    keep.append(req)
                else:
                    statuses[str(req.status)] = statuses.get(str(req.status), 0) + 1
            server.user_requests, held_over = keep, len(keep)
            return received

        async def post(i: int) -> None:
            nonlocal posted, failed
            try:
                await server.post(room(i % rooms), alice, text_of(i))  # wakes the room's held poll
                posted += 1
            except Exception:
                failed += 1

        async def run_load(total: int) -> None:
            for i in range(total):
                delay = server.load_start + i / server.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(post(i))
                posting.add(task)
                task.add_done_callback(posting.discard)

        def stats() -> dict[str, Any]:
            requests = tally()
            arrivals, server.arrivals = server.arrivals, []
            return {
                "requests": requests,
                "statuses": dict(statuses),
                "held": server.chat_api.held_polls(),
                "rooms_held": server.chat_api.held_rooms(),
                "posted": posted,
                "failed": failed,
                "delivered": sum(server.counts),
                "arrivals": arrivals,
                "cpu": proc_cpu(os.getpid()),
                "rss": proc_rss(os.getpid()),
            }

        while True:
            cmd, *args = await pipe_recv(conn)
            if cmd == "stats":
                conn.send(stats())
            elif cmd == "load":
                server.load_start, server.rate, total = args
                server.counts = bytearray(total)
                load = asyncio.create_task(run_load(total))
                conn.send("ok")
            elif cmd == "final":
                if load is not None:
                    await load
                if posting:
                    await asyncio.wait(list(posting), timeout=30)
                out = stats()
                out["counts"] = bytes(server.counts)
                conn.send(out)
            elif cmd == "stop":
                await server.stop()
                conn.send("ok")
                return

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        runner.run(main())


# --- this process: the daemon, the api sink, the measurements ------------------------
class Sink:
    """The api account's ``/api/stream`` (api mode): copies per message, and when they came."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.counts = bytearray()
        self.arrivals: list[tuple[int, float]] = []  # (message index, seconds after the load's start)
        self.start = 0.0
        self.unmarked = 0

    async def run(self, ready: asyncio.Event) -> None:
        client = await Http(self.port, SINK_TOKEN).open()
        try:
            async for line in client.stream_lines("/api/stream"):
                m = MARKER.search(line)
                if m is None:
                    if b"api_connected" in line:
                        ready.set()
                    else:
                        self.unmarked += 1
                    continue
                i = int(m.group(1))
                if i < len(self.counts) and self.counts[i] < 255:
                    self.counts[i] += 1
                self.arrivals.append((i, time.monotonic() - self.start))
        finally:
            client.close()


class Run:
    def __init__(self, args: argparse.Namespace, talk: Any, talk_url: str, tmp: Path) -> None:
        self.args = args
        self.talk = talk  # the Connection to the Talk process
        self.talk_url = talk_url
        self.tmp = tmp
        self.lock = asyncio.Lock()

    async def ask(self, *cmd: Any) -> Any:
        async with self.lock:  # one request/answer at a time on the pipe
            self.talk.send(cmd)
            return await pipe_recv(self.talk)

    def start_daemon(self, rooms: int, poll_timeout: int = 30) -> tuple[subprocess.Popen[bytes], int, int]:
        args = self.args
        http, sink = free_port(), free_port()
        if args.redis_url:
            redis = f'URL = "{args.redis_url}"\nKeyPrefix = "pollbench{os.getpid()}r{rooms}"'
        else:
            redis = f'DataDir = "data-{rooms}"\nAppendFsync = "everysec"'
        text = config_text(args, rooms, self.talk_url, http, sink, redis)
        text = text.replace("PollTimeout = 30", f"PollTimeout = {poll_timeout}")
        path = self.tmp / f"poll{rooms}.toml"
        path.write_text(text)
        env = dict(os.environ, PYTHONPATH=str(ROOT))  # the daemon of this tree (a worktree too)
        proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "run", "--config", str(path)], cwd=ROOT, env=env)
        return proc, http, sink

    async def until_held(self, rooms: int, proc: subprocess.Popen[bytes], within: float = 120) -> dict[str, Any]:
        """Every room's long poll held at the server."""
        deadline = time.monotonic() + within
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited with {proc.returncode}")
            stats = await self.ask("stats")
            if stats["rooms_held"] >= rooms:
                return stats
            if time.monotonic() > deadline:
                raise SystemExit(f"only {stats['rooms_held']} of {rooms} rooms polled after {within:g} s")
            await asyncio.sleep(0.2)

    async def stop_daemon(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        for _ in range(200):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.1)
        proc.kill()
        proc.wait()

    async def baseline(self) -> tuple[int, int]:
        """RSS of the same daemon with the fewest rooms of the mode: (rooms, bytes)."""
        rooms = 2 if self.args.mode == "pairs" else 1
        proc, http, _sink = self.start_daemon(rooms, poll_timeout=5)  # its stale polls go within 5 s
        try:
            await wait_ready(http, proc)
            await self.until_held(rooms, proc)
            await asyncio.sleep(self.args.settle_seconds)
            rss = proc_rss(proc.pid)
        finally:
            await self.stop_daemon(proc)
        for _ in range(50):  # its polls, held at the server, end within its PollTimeout
            if not (await self.ask("stats"))["held"]:
                break
            await asyncio.sleep(0.2)
        return rooms, rss

    async def idle(self, proc: subprocess.Popen[bytes], http: int) -> dict[str, Any]:
        args = self.args
        pid = proc.pid
        t0 = time.monotonic()
        await self.until_held(args.rooms, proc)
        print(f"all {args.rooms} rooms polled {time.monotonic() - t0:.1f} s after the daemon was ready", flush=True)
        await asyncio.sleep(args.settle_seconds)
        await self.ask("stats")  # resets the request count
        cpu0, t0 = proc_cpu(pid), time.monotonic()
        await asyncio.sleep(args.idle_seconds)
        cpu1, t1 = proc_cpu(pid), time.monotonic()
        talk = await self.ask("stats")
        _, body = await get(http, "/metrics", within=10)
        return {
            "seconds": t1 - t0,
            "cpu_seconds": cpu1 - cpu0,
            "rss": proc_rss(pid),
            "fds": proc_fds(pid),
            "threads": proc_status(pid, "Threads"),
            "tasks": scrape(body.decode(), (TASKS,)).get(TASKS, float("nan")),
            "requests": talk["requests"],
            "held": talk["held"],
        }

    async def busy(self, proc: subprocess.Popen[bytes], sink_port: int) -> dict[str, Any]:
        args = self.args
        pid = proc.pid
        total = int(args.rate * args.busy_seconds)
        sink = Sink(sink_port)
        reader: asyncio.Task[None] | None = None
        if args.mode == "api":
            ready = asyncio.Event()
            reader = asyncio.create_task(sink.run(ready))
            await asyncio.wait_for(ready.wait(), 10)
        start = time.monotonic() + 1.0
        sink.start, sink.counts = start, bytearray(total)
        await self.ask("load", start, args.rate, total)
        arrivals: list[tuple[int, float]] = []
        print(f"\n{'t s':>6} {'posted':>8} {'relayed':>8} {'backlog':>8} {'d.CPU%':>6} {'RSS MB':>7} lag p50/p99 ms")
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu_start = prev_cpu = proc_cpu(pid)
        prev_t, n, cpu_at_end = 0.0, 0, float("nan")
        while True:
            n += 1
            await asyncio.sleep(max(0.0, start + n * args.sample_seconds - time.monotonic()))
            t = time.monotonic() - start
            talk = await self.ask("stats")
            if args.mode == "api":
                new, sink.arrivals = sink.arrivals, []
            else:
                new = talk["arrivals"]
            arrivals += new
            delivered = len(arrivals)
            cpu = proc_cpu(pid)
            ms = [1000 * (at - i / args.rate) for i, at in new]
            print(
                f"{t:6.1f} {talk['posted']:8d} {delivered:8d} {talk['posted'] - delivered:8d} "
                f"{100 * (cpu - prev_cpu) / (t - prev_t):6.0f} {proc_rss(pid) / 2**20:7.1f} "
                f"{pct(ms, 50):7.0f}/{pct(ms, 99):<8.0f}",
                flush=True,
            )
            if prev_t < args.busy_seconds <= t:
                cpu_at_end = prev_cpu + (cpu - prev_cpu) * (args.busy_seconds - prev_t) / (t - prev_t)
            prev_t, prev_cpu = t, cpu
            settled = talk["posted"] + talk["failed"] >= total
            if t >= args.busy_seconds and ((settled and delivered >= talk["posted"]) or t > args.drain_seconds):
                break
        final = await self.ask("final")
        if reader is not None:
            await asyncio.sleep(1.0)  # a late duplicate shows now
            reader.cancel()
        counts = final["counts"] if args.mode == "pairs" else bytes(sink.counts)
        times = sorted(at for _i, at in arrivals)
        return {
            "total": total,
            "posted": final["posted"],
            "failed": final["failed"],
            "lost": sum(1 for c in counts if c == 0),
            "duplicates": sum(c - 1 for c in counts if c > 1),
            "relayed_in_load": sum(1 for at in times if at <= args.busy_seconds),
            "last_arrival": times[-1] if times else float("nan"),
            "lags_ms": sorted(1000 * (at - i / args.rate) for i, at in arrivals),
            "cpu_in_load": cpu_at_end - cpu_start,
            "cpu_seconds": proc_cpu(pid) - cpu_start,
            "rss": proc_rss(pid),
            "unmarked": sink.unmarked,
            "statuses": final["statuses"],
        }


async def bench(args: argparse.Namespace, talk: Any, talk_url: str, tmp: Path) -> dict[str, Any]:
    run = Run(args, talk, talk_url, tmp)
    await run.ask("stats")  # the Talk server is up, its rooms made
    base_rooms, base_rss = await run.baseline()
    print(f"baseline: the daemon with {base_rooms} room(s), idle: RSS {base_rss / 2**20:.1f} MB", flush=True)
    proc, http, sink = run.start_daemon(args.rooms)
    try:
        await wait_ready(http, proc)
        idle = await run.idle(proc, http)
        per_room = (idle["rss"] - base_rss) / max(1, args.rooms - base_rooms)
        cpu_pct = 100 * idle["cpu_seconds"] / idle["seconds"]
        print(
            f"\nIDLE, {args.rooms} rooms long-polled ({idle['held']} polls held at the server), "
            f"{idle['seconds']:.0f} s: daemon CPU {cpu_pct:.2f}% of a core "
            f"({1000 * idle['cpu_seconds'] / idle['seconds'] * 60 / args.rooms:.1f} ms per room per minute); "
            f"{idle['requests'] / idle['seconds']:.1f} requests/s to Talk\n"
            f"  RSS {idle['rss'] / 2**20:.1f} MB = {base_rss / 2**20:.1f} MB with {base_rooms} room(s) + "
            f"{per_room / 1024:.1f} KiB per room; open fds {idle['fds']}, threads {idle['threads']}, "
            f"asyncio tasks {idle['tasks']:.0f}",
            flush=True,
        )
        busy = await run.busy(proc, sink)
    finally:
        await run.stop_daemon(proc)
    lags = busy["lags_ms"]
    what = "into the api account" if args.mode == "api" else "room to room (a POST chat per message)"
    arrived = busy["posted"] - busy["lost"]
    print(
        f"\nBUSY, {args.rooms} rooms, {args.rate:g} msg/s in total ({args.rate / args.rooms:.2f} per room) "
        f"for {args.busy_seconds:g} s, relayed {what}:\n"
        f"  relayed during the load {busy['relayed_in_load'] / args.busy_seconds:.0f} msg/s "
        f"(daemon CPU {100 * busy['cpu_in_load'] / args.busy_seconds:.0f}% of a core); "
        f"{arrived} of {busy['posted']} arrived, the last {busy['last_arrival']:.1f} s after the start "
        f"= {arrived / busy['last_arrival']:.0f} msg/s overall\n"
        f"  lag from the scheduled time: p50 {pct(lags, 50):.0f} ms, p99 {pct(lags, 99):.0f} ms, "
        f"max {max(lags, default=float('nan')):.0f} ms; lost {busy['lost']}, duplicates {busy['duplicates']}, "
        f"refused at Talk {busy['failed']}; RSS {busy['rss'] / 2**20:.1f} MB; Talk answers {busy['statuses']}",
        flush=True,
    )
    print(f"load average now {os.getloadavg()[0]:.2f}")
    return {"baseline": {"rooms": base_rooms, "rss": base_rss}, "idle": idle, "rss_per_room": per_room,
            "busy": {k: v for k, v in busy.items() if k != "lags_ms"}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rooms", type=int, default=500)
    p.add_argument("--mode", choices=("api", "pairs"), default="api", help="where the rooms' messages go")
    p.add_argument("--idle-seconds", type=float, default=60, help="idle CPU is measured over this (Talk holds 30 s)")
    p.add_argument("--settle-seconds", type=float, default=5, help="after every poll is held, before measuring")
    p.add_argument("--rate", type=float, default=500, help="messages/s in total while busy, round robin over rooms")
    p.add_argument("--busy-seconds", type=float, default=20)
    p.add_argument("--drain-seconds", type=float, default=120, help="wait at most this long for the last copies")
    p.add_argument("--sample-seconds", type=float, default=2)
    p.add_argument("--redis-url", default="", help="use this Redis instead of the embedded one")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()
    if args.mode == "pairs" and args.rooms % 2:
        raise SystemExit("--mode pairs needs an even number of --rooms")

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"uvloop {'yes' if uvloop else 'no'}; load average {os.getloadavg()[0]:.2f}; "
        f"daemon tree {ROOT} at {commit_of(ROOT)}",
        flush=True,
    )
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    talk_proc = ctx.Process(target=talk_process, args=(child, port, args.rooms), name="poll-rooms-talk")
    talk_proc.start()
    try:
        with tempfile.TemporaryDirectory(prefix="tb-poll-") as tmp:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
                result = runner.run(bench(args, parent, f"http://127.0.0.1:{port}", Path(tmp)))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "commit": commit_of(ROOT), **result}, indent=1))
    finally:
        try:
            parent.send(("stop",))
            parent.recv() if parent.poll(10) else None
        except (OSError, EOFError):
            pass
        talk_proc.join(10)
        if talk_proc.is_alive():
            talk_proc.terminate()


if __name__ == "__main__":
    main()
