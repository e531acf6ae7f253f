"""Soak: a bounded, steady run through every kind of account, watching for growth.

Starts ``talkbridge run`` as its own process (embedded Redis, append-only,
``appendfsync everysec``; or ``--redis-url``) with one gateway of three
accounts: two Matterbridge ``api`` accounts (A, B) and a Talk bot (T) whose
Talk server is the test server of ``tests/talkserver``, run in a child
process of its own (its own interpreter: the bot's deliveries are one ordered
stream, so Talk's answer time bounds them, and a server sharing this
process's GIL would be slow to answer). The Talk server signs webhooks exactly
as Talk does and serves the bot API.

Load: an open-loop schedule of ``--rate`` messages/s in total for
``--minutes``: message *i* is due at ``start + i / rate`` whatever happened
before, and comes from A, B or T in turn (``--mix``): api POSTs from this
process, Talk user messages from the Talk process (which turns each into a
signed webhook to the daemon). Every message carries a unique marker
(``soak A00000012``) and is due in the two other accounts; A and B are read
with ``/api/stream``, T by the Talk server as the bot's posts arrive. At the
end: every expected copy arrived exactly once?

Every ``--sample-seconds``: the daemon's RSS and open fds (``/proc/PID``),
its asyncio task count (``talkbridge_asyncio_tasks`` on ``/metrics``),
Redis ``used_memory`` and ``DBSIZE``, the streams' own ``MEMORY USAGE``, and
messages sent and delivered so far. The summary gives RSS / fds / tasks
after warm-up against the end of the run, and Redis growth per delivered
copy: measured (``used_memory`` minus what the streams explain) against
expected (a census of the keys by prefix at the start and at the end:
``SCAN``, ``TYPE``, ``MEMORY USAGE`` and ``TTL`` on a sample of each group).
The census is data-driven: it knows no key names, so it holds for any key
layout.

    python bench/soak.py                          # 10 minutes at 500 msg/s
    python bench/soak.py --minutes 3 --json /tmp/soak.json
    python bench/soak.py --rate 300 --mix 1:1:0   # api only, as issue 6 measured
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import uvloop
except ImportError:
    uvloop = None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.talkserver, and bridge for a worktree run

MARKER = re.compile(rb"soak ([ABT])(\d{8})")
TOKEN = "soakroom"  # the Talk room (the bot's gateway channel)
SECRET = "soak-secret-" + "s" * 40
API_TOKENS = {"A": "soak-a", "B": "soak-b"}
ACCOUNTS = {"A": "api.a", "B": "api.b", "T": "nctalkbot.talk"}

CONFIG = """
[api.a]
BindAddress = "127.0.0.1:{port_a}"
Token = "soak-a"
Buffer = 100000
[api.b]
BindAddress = "127.0.0.1:{port_b}"
Token = "soak-b"
Buffer = 100000
[nctalkbot.talk]
Server = "{talk_url}"
BotSecret = "{secret}"
WebhookURL = "http://127.0.0.1:{http}/webhook/nextcloud/talk"
[[gateway]]
name = "soak"
enable = true
[[gateway.inout]]
account = "api.a"
channel = "api"
[[gateway.inout]]
account = "api.b"
channel = "api"
[[gateway.inout]]
account = "nctalkbot.talk"
channel = "{token}"
[redis]
{redis}
KeyPrefix = "{prefix}"
[http]
BindAddress = "127.0.0.1:{http}"
[log]
Level = "warning"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_of(source: str, i: int) -> str:
    return f"soak {source}{i:08d} a steady message from the soak run"


def schedule(mix: str) -> str:
    """'1:1:1' -> 'ABT': message i comes from cycle[i % len(cycle)]."""
    weights = [int(w) for w in mix.split(":")]
    if len(weights) != 3 or min(weights) < 0 or sum(weights) == 0:
        raise SystemExit("--mix is A:B:T, three weights, e.g. 1:1:1")
    return "".join(src * w for src, w in zip("ABT", weights, strict=True))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def bump(counts: bytearray, i: int) -> None:
    if 0 <= i < len(counts) and counts[i] < 255:
        counts[i] += 1


# --- /proc ---------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (``VmRSS`` in kB, ``Threads``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_rss(pid: int) -> int:
    return proc_status(pid, "VmRSS") * 1024


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def proc_cpu(pid: int) -> float:
    """utime + stime, seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def child_redis(pid: int) -> tuple[int, str] | None:
    """The embedded redis-server the daemon started: (pid, its unix socket)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if b"--unixsocket" in argv:
            return int(entry), argv[argv.index(b"--unixsocket") + 1].decode()
        title = re.search(rb"unixsocket:(\S+)", b" ".join(argv))  # redis-server rewrites its title
        if title:
            return int(entry), title.group(1).decode()
    return None


async def pipe_recv(conn: Any) -> Any:
    """Receive from a multiprocessing Connection without a blocked thread (a
    thread stuck in recv() would keep Ctrl-C from ending the run)."""
    loop = asyncio.get_running_loop()
    while not conn.poll():
        readable = asyncio.Event()
        loop.add_reader(conn.fileno(), readable.set)
        try:
            await readable.wait()
        finally:
            loop.remove_reader(conn.fileno())
            os.set_blocking(conn.fileno(), True)  # the loop made it non-blocking: a long message must not EAGAIN
    return conn.recv()


# --- the Talk side (a child process) -------------------------------------------------
def talk_process(conn: Any, port: int, webhook_url: str) -> None:
    """Runs the test Talk server and the Talk users' share of the load."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us in order
    from tests.talkserver import TalkServer

    class SoakTalk(TalkServer):
        def __init__(self) -> None:
            super().__init__()
            self.counts = bytearray()  # copies the bot posted, per message index
            self.unmarked = 0

        async def after_bot_message(self, msg: Any) -> None:
            m = MARKER.search(msg.message.encode())
            if m:
                bump(self.counts, int(m.group(2)))
            else:
                self.unmarked += 1
            self.state.messages.pop(msg.id, None)  # counted: keep the server's memory flat

    async def main() -> None:
        server = SoakTalk()
        await server.start(port=port)
        alice = server.add_user("alice", "Alice")
        server.create_room("Soak room", TOKEN, members=(alice,))
        bot = server.install_bot("talk", SECRET, webhook_url)
        sent = bytearray()  # per index: 1 posted, 2 its webhook answered 200, 3 refused
        webhook_status: dict[str, int] = {}
        bot_status: dict[str, int] = {}
        posting: set[asyncio.Task[None]] = set()
        load: asyncio.Task[None] | None = None

        def tally() -> None:
            calls, server.state.webhook_calls = server.state.webhook_calls, []
            for call in calls:
                key = str(call.status) if call.status is not None else (call.error or "error").split(":")[0]
                webhook_status[key] = webhook_status.get(key, 0) + 1
                m = MARKER.search(call.body)
                if m and int(m.group(2)) < len(sent):
                    sent[int(m.group(2))] = 2 if call.status == 200 else 3
            keep = []
            for req in server.state.bot_requests:
                if req.status is None:
                    keep.append(req)  # still being answered
                else:
                    bot_status[str(req.status)] = bot_status.get(str(req.status), 0) + 1
            server.state.bot_requests = keep

        async def post(i: int) -> None:
            sent[i] = 1
            try:
                msg = await server.post(TOKEN, alice, text_of("T", i))
                server.state.messages.pop(msg.id, None)
            except Exception as exc:  # counted as refused; the run goes on
                sent[i] = 3
                webhook_status[type(exc).__name__] = webhook_status.get(type(exc).__name__, 0) + 1

        async def run_load(start: float, rate: float, indices: list[int]) -> None:
            for i in indices:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(post(i))
                posting.add(task)
                task.add_done_callback(posting.discard)

        def stats() -> dict[str, Any]:
            tally()
            return {
                "sent": sum(1 for s in sent if s),
                "delivered": sum(server.counts),
                "unmarked": server.unmarked,
                "webhook_status": dict(webhook_status),
                "bot_status": dict(bot_status),
                "in_flight": len(posting),
                "cpu": proc_cpu(os.getpid()),
                "rss": proc_rss(os.getpid()),
            }

        while True:
            cmd, *args = await pipe_recv(conn)
            if cmd == "enable":
                await server.enable_bot(bot, TOKEN)  # Talk sends the bot a Join
                tally()
                conn.send(stats())
            elif cmd == "load":
                start, rate, total, indices = args
                sent.extend(bytes(total))
                server.counts.extend(bytes(total))
                load = asyncio.create_task(run_load(start, rate, indices))
                conn.send("ok")
            elif cmd == "stats":
                conn.send(stats())
            elif cmd == "final":
                if load is not None:
                    await load
                if posting:
                    await asyncio.wait(list(posting), timeout=30)
                out = stats()
                out["sent_flags"] = bytes(sent)
                out["counts"] = bytes(server.counts)
                conn.send(out)
            elif cmd == "stop":
                await server.stop()
                conn.send("ok")
                return

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        runner.run(main())


# --- HTTP (a lean keep-alive client: the load generator shares two cores) -------------
class Http:
    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Http:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        assert self.reader and self.writer
        head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\n".encode() + self.auth
        if body:
            head += b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        self.writer.write(head + b"\r\n" + body)
        resp = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in resp.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(resp[9:12]), await self.reader.readexactly(length)

    async def stream_lines(self, path: str):
        assert self.reader and self.writer
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: soak\r\n" + self.auth + b"\r\n")
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def get(port: int, path: str, within: float = 5) -> tuple[int, bytes]:
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: soak\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


def scrape(text: str, names: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[name] = float(value)
    return out


# --- Redis ---------------------------------------------------------------------------
SAMPLE_PER_GROUP = 400


def _variable(segment: str) -> bool:
    """A key segment that is an id (so the key is one of many of its kind)."""
    if re.fullmatch(r"[0-9._-]+", segment):
        return True  # a number, a generation.bucket
    if len(segment) >= 16 and sum(c.isdigit() for c in segment) >= 2:
        return True  # a digest, a random id
    return len(segment) > 40


def group_of(key: str) -> str:
    """A key's shape, from its segments (split at ``:`` and ``\\x1f``) up to
    the first that is an id: ``tb:dlv:{api.a}:3f9c…:api.a:api`` ->
    ``tb:dlv:{api.a}:*``, ``tb:m:{api.b}␟api␟0.3`` -> ``tb:m:{api.b}␟api␟*``.
    No key names are known here: it holds for any layout."""
    parts = re.split("([:\x1f])", key)
    for n in range(0, len(parts), 2):
        if _variable(parts[n]):
            return "".join(parts[:n]) + "*"
    return key


@dataclass
class Group:
    name: str
    count: int = 0
    sample: list[bytes] = field(default_factory=list)
    kind: str = "?"
    mean_bytes: float = 0.0
    ttl: float = -1.0  # median TTL of the sample, seconds (-1: no expiry)

    @property
    def total(self) -> float:
        return self.mean_bytes * self.count


async def census(redis: Any, prefix: str, rng: random.Random) -> dict[str, Group]:
    """Every key under ``prefix:`` grouped by its shape, with type, size and TTL
    measured on a uniform sample of each group (reservoir)."""
    groups: dict[str, Group] = {}
    async for key in redis.scan_iter(match=f"{prefix}:*", count=5000):
        name = group_of(key.decode(errors="replace"))
        g = groups.get(name)
        if g is None:
            g = groups[name] = Group(name)
        g.count += 1
        if len(g.sample) < SAMPLE_PER_GROUP:
            g.sample.append(key)
        else:
            j = rng.randrange(g.count)
            if j < SAMPLE_PER_GROUP:
                g.sample[j] = key
    for g in groups.values():
        pipe = redis.pipeline(transaction=False)
        for key in g.sample:
            pipe.type(key)
            pipe.memory_usage(key, samples=0)
            pipe.ttl(key)
        res = await pipe.execute()
        kinds, sizes, ttls = res[0::3], [r for r in res[1::3] if r is not None], res[2::3]
        if kinds:
            g.kind = max(set(kinds), key=kinds.count).decode()
        g.mean_bytes = sum(sizes) / len(sizes) if sizes else 0.0
        live = sorted(t for t in ttls if t is not None and t >= 0)
        g.ttl = live[len(live) // 2] if live else -1.0
    return groups


async def table_overhead(redis: Any) -> int:
    """Keyspace bytes that no key's MEMORY USAGE includes: the expires table
    (an entry per expiring key, its slot array) and the main table's slot
    array (MEMORY STATS; its main-table figure also counts each key's entry
    and object header, 24 + 16 bytes on Redis 6.2/7.0, which MEMORY USAGE has)."""
    stats = await redis.memory_stats()
    db = stats.get("db.0") or {}
    keys = int(stats.get("keys.count", 0))
    main = int(db.get("overhead.hashtable.main", 0))
    expires = int(db.get("overhead.hashtable.expires", 0))
    return expires + max(0, main - 40 * keys)


async def stream_keys(redis: Any, prefix: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{prefix}:*", count=5000, _type="stream")]


async def streams_bytes(redis: Any, keys: list[bytes]) -> int:
    if not keys:
        return 0
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return sum(r or 0 for r in await pipe.execute())


# --- the run -------------------------------------------------------------------------
TASKS, RSS, FDS = "talkbridge_asyncio_tasks", "process_resident_memory_bytes", "process_open_fds"
GEN2 = 'python_gc_collections_total{generation="2"}'


@dataclass
class Sample:
    t: float
    sent: int
    delivered: int
    backlog: dict[str, int]  # per destination: copies due so far and not yet there
    delivered_by: dict[str, int]  # per destination
    rss: int
    fds: int
    threads: int
    tasks: float
    gc2: float  # full collections so far
    redis_clients: int
    metrics_rss: float
    metrics_fds: float
    used_memory: int
    used_memory_rss: int
    streams: int
    dbsize: int
    daemon_cpu: float
    redis_cpu: float
    lag_p50: float
    lag_p99: float
    lag_max: float


class Soak:
    def __init__(self, args: argparse.Namespace, daemon: subprocess.Popen[bytes], talk: Any, ports: dict) -> None:
        self.args = args
        self.daemon = daemon
        self.talk = talk  # the Connection to the Talk process
        self.ports = ports
        self.cycle = schedule(args.mix)
        self.total = int(args.minutes * 60 * args.rate)
        self.source = [self.cycle[i % len(self.cycle)] for i in range(self.total)]
        self.counts = {d: bytearray(self.total) for d in "AB"}  # copies received by A and B
        self.api_sent = bytearray(self.total)  # 1 sent, 2 answered 200, 3 refused
        self.sent_by = {"A": 0, "B": 0}
        self.api_status: dict[str, int] = {}
        self.lags: list[float] = []
        self.start = 0.0
        self.samples: list[Sample] = []
        self.redis: Any = None
        self.redis_pid: int | None = None
        self.streams: list[bytes] = []
        self.unmarked = 0
        self.talk_stats: dict[str, Any] = {}
        self.talk_lock = asyncio.Lock()

    async def ask_talk(self, *cmd: Any) -> Any:
        async with self.talk_lock:  # one request/answer at a time on the pipe
            self.talk.send(cmd)
            return await pipe_recv(self.talk)

    # receivers ---------------------------------------------------------------------
    async def receive(self, dest: str, ready: asyncio.Event) -> None:
        counts = self.counts[dest]
        while True:
            client = await Http(self.ports[dest], API_TOKENS[dest]).open()
            try:
                async for line in client.stream_lines("/api/stream"):
                    m = MARKER.search(line)
                    if m is None:
                        if b"api_connected" in line:
                            ready.set()
                        else:
                            self.unmarked += 1
                        continue
                    i = int(m.group(2))
                    bump(counts, i)
                    if self.start:
                        self.lags.append(time.monotonic() - (self.start + i / self.args.rate))
            except (OSError, asyncio.IncompleteReadError) as exc:
                print(f"  /api/stream on {dest} ended ({exc!r}); reconnecting", flush=True)
            finally:
                client.close()
            await asyncio.sleep(0.2)

    # senders -------------------------------------------------------------------------
    async def send_api(self) -> None:
        pools: dict[str, asyncio.Queue[Http]] = {}
        for src in "AB":
            pools[src] = asyncio.Queue()
            for _ in range(self.args.concurrency):
                pools[src].put_nowait(await Http(self.ports[src], API_TOKENS[src]).open())
        in_flight: set[asyncio.Task[None]] = set()

        async def one(i: int, src: str) -> None:
            conn = await pools[src].get()
            self.api_sent[i] = 1
            self.sent_by[src] += 1
            body = json.dumps({"text": text_of(src, i), "username": "soak", "gateway": "soak"}).encode()
            try:
                status, _ = await conn.request("POST", "/api/message", body)
            except (OSError, asyncio.IncompleteReadError) as exc:
                status = 0
                conn = await Http(self.ports[src], API_TOKENS[src]).open()
                key = type(exc).__name__
                self.api_status[key] = self.api_status.get(key, 0) + 1
            pools[src].put_nowait(conn)
            self.api_sent[i] = 2 if status == 200 else 3
            self.api_status[str(status)] = self.api_status.get(str(status), 0) + 1

        for i in range(self.total):
            src = self.source[i]
            if src == "T":
                continue
            delay = self.start + i / self.args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, src))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(list(in_flight), timeout=60)
        for pool in pools.values():
            while not pool.empty():
                pool.get_nowait().close()

    # sampling --------------------------------------------------------------------------
    def delivered_to(self) -> dict[str, int]:
        return {"A": sum(self.counts["A"]), "B": sum(self.counts["B"]), "T": self.talk_stats.get("delivered", 0)}

    def delivered(self) -> int:
        return sum(self.delivered_to().values())

    async def sample(self) -> Sample:
        pid = self.daemon.pid
        self.talk_stats = await self.ask_talk("stats")
        sent_by = {"A": self.sent_by["A"], "B": self.sent_by["B"], "T": self.talk_stats["sent"]}
        got = self.delivered_to()
        backlog = {d: sum(n for src, n in sent_by.items() if src != d) - got[d] for d in "ABT"}
        try:
            _, body = await get(self.ports["http"], "/metrics", within=10)
            m = scrape(body.decode(), (TASKS, RSS, FDS, GEN2))
        except (OSError, TimeoutError, ValueError):
            m = {}
        info = await self.redis.info("memory")
        clients = (await self.redis.info("clients"))["connected_clients"] - 1  # less this sampler
        dbsize = await self.redis.dbsize()
        if dbsize < 100_000 or not self.streams:  # SCAN TYPE walks the keyspace: only while it is small
            self.streams = await stream_keys(self.redis, self.args.key_prefix)
        lags, self.lags = [x * 1000 for x in self.lags], []
        s = Sample(
            t=max(0.0, time.monotonic() - self.start) if self.start else 0.0,
            sent=sum(sent_by.values()),
            delivered=sum(got.values()),
            backlog=backlog,
            delivered_by=got,
            rss=proc_rss(pid),
            fds=proc_fds(pid),
            threads=proc_status(pid, "Threads"),
            tasks=m.get(TASKS, float("nan")),
            gc2=m.get(GEN2, float("nan")),
            redis_clients=int(clients),
            metrics_rss=m.get(RSS, float("nan")),
            metrics_fds=m.get(FDS, float("nan")),
            used_memory=int(info["used_memory"]),
            used_memory_rss=int(info["used_memory_rss"]),
            streams=await streams_bytes(self.redis, self.streams),
            dbsize=dbsize,
            daemon_cpu=proc_cpu(pid),
            redis_cpu=proc_cpu(self.redis_pid) if self.redis_pid else float("nan"),
            lag_p50=pct(lags, 50),
            lag_p99=pct(lags, 99),
            lag_max=max(lags, default=float("nan")),
        )
        self.samples.append(s)
        print_sample(s, self.samples[-2] if len(self.samples) > 1 else None)
        return s

    async def sampler(self, main: asyncio.Task[Any]) -> None:
        n = 1
        try:
            while True:
                await asyncio.sleep(max(0.0, self.start + n * self.args.sample_seconds - time.monotonic()))
                n += 1
                await self.sample()
        except Exception as exc:  # e.g. the Talk process died: no point going on blind
            print(f"sampling failed ({exc!r}): stopping the run", flush=True)
            main.cancel()
            raise

    # the whole run ---------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        args = self.args
        await wait_ready(self.ports["http"], self.daemon)
        found = child_redis(self.daemon.pid)
        if args.redis_url:
            url = args.redis_url
        else:
            if found is None:
                raise SystemExit("cannot find the daemon's embedded redis-server")
            self.redis_pid, sock = found
            url = f"unix://{sock}"
        from redis.asyncio import Redis

        self.redis = Redis.from_url(url)
        talk = await self.ask_talk("enable")
        readies = {d: asyncio.Event() for d in "AB"}
        receivers = [asyncio.create_task(self.receive(d, readies[d])) for d in "AB"]
        for ev in readies.values():
            await asyncio.wait_for(ev.wait(), 10)
        rng = random.Random(6)
        before = await census(self.redis, args.key_prefix, rng)
        tables_before = await table_overhead(self.redis)
        print(
            f"\nload: {args.rate:g} msg/s for {args.minutes:g} min = {self.total} messages, "
            f"sources {self.cycle!r} in turn; every message is due in the 2 other accounts "
            f"= {2 * self.total} copies; Talk bot Join answered {talk['webhook_status']}\n"
        )
        print(HEADER)
        self.start = time.monotonic() + 1.0
        await self.sample()  # t = 0: before any load
        indices = [i for i in range(self.total) if self.source[i] == "T"]
        await self.ask_talk("load", self.start, args.rate, self.total, indices)
        sampler = asyncio.create_task(self.sampler(asyncio.current_task()))  # type: ignore[arg-type]
        await self.send_api()
        final_talk = await self.ask_talk("final")
        self.talk_stats = final_talk
        expected = self.expected(final_talk)
        deadline = time.monotonic() + args.drain_seconds
        while self.delivered() < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            self.talk_stats = await self.ask_talk("stats")
        drained_at = time.monotonic() - self.start
        queued = []
        if self.delivered() < expected:  # what the daemon still holds, by its own account
            _, body = await get(self.ports["http"], "/metrics", within=10)
            queued = [
                line
                for line in body.decode().splitlines()
                if line.startswith(("talkbridge_stream_lag{", "talkbridge_stream_pending{"))
                and not line.endswith(" 0.0")
            ]
        sampler.cancel()
        await asyncio.sleep(1.0)  # the last acknowledgements and trims
        last = await self.sample()
        final_talk = await self.ask_talk("final")
        after = await census(self.redis, args.key_prefix, rng)
        tables_after = await table_overhead(self.redis)
        for r in receivers:
            r.cancel()
        await self.redis.aclose()
        return {
            "before": before,
            "after": after,
            "tables": tables_after - tables_before,
            "talk": final_talk,
            "drained_at": drained_at,
            "queued": queued,
            "last": last,
        }

    def expected(self, talk: dict[str, Any]) -> int:
        """Copies due: each accepted message, once in each other account."""
        return 2 * (sum(1 for s in self.api_sent if s == 2) + sum(1 for s in talk.get("sent_flags", b"") if s == 2))


HEADER = (
    f"{'t s':>5} {'sent':>7} {'deliv.':>7} {'backlog A/B/T':>17} {'RSS MB':>6} {'fds':>4} {'thr':>3} {'tasks':>5} "
    f"{'gc2':>3} {'rcli':>4} {'redis MB':>8} {'streams':>7} {'DBSIZE':>8} {'B/copy':>6} {'d.CPU%':>6} {'r.CPU%':>6} "
    f"{'api lag p50/p99 ms':>18}"
)


def print_sample(s: Sample, prev: Sample | None) -> None:
    dt = (s.t - prev.t) if prev else 0.0
    dcpu = 100 * (s.daemon_cpu - prev.daemon_cpu) / dt if prev and dt > 0 else float("nan")
    rcpu = 100 * (s.redis_cpu - prev.redis_cpu) / dt if prev and dt > 0 else float("nan")
    dcopies = s.delivered - prev.delivered if prev else 0
    growth = ((s.used_memory - s.streams) - (prev.used_memory - prev.streams)) if prev else 0
    per_copy = f"{growth / dcopies:6.0f}" if dcopies >= 500 else f"{'-':>6}"
    backlog = "/".join(str(s.backlog[d]) for d in "ABT")
    print(
        f"{s.t:5.0f} {s.sent:7d} {s.delivered:7d} {backlog:>17} {s.rss / 2**20:6.1f} {s.fds:4d} {s.threads:3d} "
        f"{s.tasks:5.0f} {s.gc2:3.0f} {s.redis_clients:4d} {s.used_memory / 2**20:8.1f} {s.streams / 2**20:7.2f} "
        f"{s.dbsize:8d} {per_copy} {dcpu:6.0f} {rcpu:6.0f} {s.lag_p50:8.1f}/{s.lag_p99:<9.1f}",
        flush=True,
    )


def slope_per_min(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def summarize(soak: Soak, result: dict[str, Any]) -> dict[str, Any]:
    args = soak.args
    talk = result["talk"]
    samples = soak.samples
    total = soak.total
    # Loss and duplicates, per destination.
    accepted = bytearray(total)
    for i in range(total):
        flag = soak.api_sent[i] if soak.source[i] != "T" else talk["sent_flags"][i]
        accepted[i] = flag == 2
    got = {"A": soak.counts["A"], "B": soak.counts["B"], "T": talk["counts"]}
    per_dest = {}
    for dest, counts in got.items():
        due = [i for i in range(total) if accepted[i] and soak.source[i] != dest]
        lost = sum(1 for i in due if counts[i] == 0)
        dups = sum(counts[i] - 1 for i in due if counts[i] > 1)
        stray = sum(counts[i] for i in range(total) if counts[i] and (soak.source[i] == dest or not accepted[i]))
        per_dest[dest] = {
            "due": len(due),
            "received": len(due) - lost,
            "lost": lost,
            "duplicates": dups,
            "stray": stray,
        }
    copies = sum(d["received"] + d["duplicates"] for d in per_dest.values())
    refused = sum(1 for i in range(total) if not accepted[i])
    print(f"\n=== summary ({args.minutes:g} min at {args.rate:g} msg/s, mix {args.mix}) ===")
    print(f"messages scheduled {total}, accepted {total - refused}, refused/failed at ingress {refused}")
    print(f"  api POST answers: {soak.api_status}; Talk webhook answers: {talk['webhook_status']}")
    print(
        f"  Talk bot API answers: {talk['bot_status']}; unmarked arrivals: api {soak.unmarked}, Talk {talk['unmarked']}"
    )
    for dest, d in per_dest.items():
        print(
            f"  into {ACCOUNTS[dest]:15}: due {d['due']:7d}, received {d['received']:7d}, lost {d['lost']}, "
            f"duplicates {d['duplicates']}, unexpected {d['stray']}"
        )
    all_due = sum(d["due"] for d in per_dest.values())
    print(
        f"  delivered {copies} of {all_due} copies; last copy {result['drained_at']:.1f} s after the start "
        f"(load ended at {total / args.rate:.1f} s)"
    )
    loaded = [s for s in samples if 0 < s.t <= total / args.rate + 0.5]
    if loaded:
        end = loaded[-1]
        print(
            "  during the load, copies delivered per second / largest backlog: "
            + ", ".join(
                f"into {ACCOUNTS[d]} {end.delivered_by[d] / end.t:.0f}/s / {max(s.backlog[d] for s in loaded)}"
                for d in "ABT"
            )
        )
    if result["queued"]:
        print(
            f"  still queued in the daemon after --drain-seconds {args.drain_seconds:g}: " + "; ".join(result["queued"])
        )
    # Process trends after warm-up.
    warm = [s for s in samples if s.t >= args.warmup_seconds] or samples[-1:]
    first, last, s0 = warm[0], samples[-1], samples[0]
    xs = [s.t for s in warm]
    rss_slope = slope_per_min(xs, [s.rss / 2**20 for s in warm])
    print(f"\ndaemon after warm-up ({args.warmup_seconds:g} s; {len(warm)} samples, t={first.t:.0f}..{last.t:.0f} s):")
    print(
        f"  RSS {first.rss / 2**20:.1f} -> {last.rss / 2**20:.1f} MB (min {min(s.rss for s in warm) / 2**20:.1f}, "
        f"max {max(s.rss for s in warm) / 2**20:.1f}; slope {rss_slope:+.2f} MB/min); "
        f"/metrics process_resident_memory_bytes at the end {last.metrics_rss / 2**20:.1f} MB"
    )
    print(
        f"  open fds {first.fds} -> {last.fds} (max {max(s.fds for s in warm)}; /metrics {last.metrics_fds:.0f}); "
        f"asyncio tasks {first.tasks:.0f} -> {last.tasks:.0f} (max {max(s.tasks for s in warm):.0f}); "
        f"threads {first.threads} -> {last.threads}; Redis clients {first.redis_clients} -> {last.redis_clients} "
        f"(max {max(s.redis_clients for s in warm)}); full GC collections over the run {last.gc2 - s0.gc2:.0f}"
    )
    # Redis growth.
    d_used = last.used_memory - s0.used_memory
    d_streams = last.streams - s0.streams
    measured = (d_used - d_streams) / copies if copies else float("nan")
    print("\nRedis:")
    print(
        f"  used_memory {s0.used_memory / 2**20:.1f} -> {last.used_memory / 2**20:.1f} MB "
        f"(+{d_used / 2**20:.1f} MB); streams {s0.streams / 2**20:.2f} -> {last.streams / 2**20:.2f} MB; "
        f"DBSIZE {s0.dbsize} -> {last.dbsize} ({(last.dbsize - s0.dbsize) / copies:.2f} keys per copy)"
    )
    before, after = result["before"], result["after"]
    rows = []
    for name in sorted(set(before) | set(after), key=lambda n: -after.get(n, Group(n)).total):
        a, b = after.get(name, Group(name)), before.get(name, Group(name))
        rows.append((name, a, a.count - b.count, a.total - b.total))
    grown = [(n, a, dk, db) for n, a, dk, db in rows if a.kind != "stream"]
    keys_bytes = sum(db for _n, _a, _dk, db in grown) / copies if copies else float("nan")
    tables = result["tables"] / copies if copies else float("nan")
    expected = keys_bytes + tables
    print(f"  key census by shape ({len(after)} groups; MEMORY USAGE on up to {SAMPLE_PER_GROUP} keys each):")
    print(f"    {'group':44} {'type':7} {'keys':>9} {'keys/copy':>9} {'B/key':>6} {'B/copy':>7} {'TTL':>8}")
    for name, a, dk, db in rows:
        if a.count == 0:
            continue
        ttl = "none" if a.ttl < 0 else (f"{a.ttl / 86400:.1f} d" if a.ttl >= 86400 else f"{a.ttl / 3600:.1f} h")
        shown = name.replace("\x1f", "␟")
        print(
            f"    {shown[:44]:44} {a.kind:7} {a.count:9d} {dk / copies:9.3f} {a.mean_bytes:6.0f} "
            f"{db / copies:7.1f} {ttl:>8}"
        )
    print(
        f"  expected per delivered copy: the keys {keys_bytes:.0f} B (Σ MEMORY USAGE of the non-stream keys written) "
        f"+ keyspace tables {tables:.0f} B (MEMORY STATS: expires entries, slot arrays) = {expected:.0f} B"
    )
    print(
        f"  BYTES PER DELIVERED COPY: measured {measured:.0f} (Δused_memory − Δstreams, {copies} copies), "
        f"expected {expected:.0f}"
    )
    hold = sum(db / copies * a.ttl for _n, a, _dk, db in grown if a.ttl > 0) if copies else 0.0
    print(
        f"  held at steady state, per delivered copy/s (keys: B/copy × TTL per group): {hold / 2**20:.0f} MB"
        + (
            "; not counted: groups that grew without an expiry (bounded some other way, or a leak)"
            if any(a.ttl < 0 and db > 0 for _n, a, _dk, db in grown)
            else ""
        )
    )
    print(
        f"\nCPU over the run: daemon {last.daemon_cpu - s0.daemon_cpu:.0f} s, "
        f"redis {last.redis_cpu - s0.redis_cpu:.0f} s, "
        f"Talk server + Talk users {talk['cpu']:.0f} s, this load generator {proc_cpu(os.getpid()):.0f} s "
        f"(of {2 * last.t:.0f} core-seconds); load average now {os.getloadavg()[0]:.2f}"
    )
    return {
        "per_destination": per_dest,
        "copies": copies,
        "measured_bytes_per_copy": measured,
        "expected_bytes_per_copy": expected,
        "keys_bytes_per_copy": keys_bytes,
        "tables_bytes_per_copy": tables,
        "rss_after_warmup_mb": [first.rss / 2**20, last.rss / 2**20],
        "rss_slope_mb_per_min": rss_slope,
        "fds": [first.fds, last.fds],
        "tasks": [first.tasks, last.tasks],
        "census": [
            {"group": n, "type": a.kind, "keys": a.count, "new_keys": dk, "bytes_per_key": a.mean_bytes, "ttl": a.ttl}
            for n, a, dk, _db in rows
        ],
    }


async def wait_ready(http: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited with {proc.returncode}")
        try:
            status, _ = await get(http, "/readyz", within=2)
            if status == 200:
                return
        except (OSError, TimeoutError, ValueError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("daemon not ready")


def commit_of(root: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--rate", type=float, default=500, help="messages/s in total, all sources together")
    p.add_argument("--mix", default="1:1:1", help="A:B:T weights of the sources (api A, api B, Talk users)")
    p.add_argument("--sample-seconds", type=float, default=10)
    p.add_argument("--warmup-seconds", type=float, default=60, help="RSS/fds/tasks are compared from here on")
    p.add_argument("--drain-seconds", type=float, default=600, help="wait at most this long for the last copies")
    p.add_argument("--concurrency", type=int, default=8, help="keep-alive connections per api account")
    p.add_argument("--redis-url", default="", help="use this Redis instead of the embedded one")
    p.add_argument("--key-prefix", default="tb", help="[redis] KeyPrefix (the census scans PREFIX:*)")
    p.add_argument("--json", default="", help="also write the samples and the summary here")
    args = p.parse_args()

    ports = {"A": free_port(), "B": free_port(), "http": free_port(), "talk": free_port()}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"uvloop {'yes' if uvloop else 'no'}; load average {os.getloadavg()[0]:.2f}; "
        f"daemon tree {ROOT} at {commit_of(ROOT)}"
    )
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    webhook_url = f"http://127.0.0.1:{ports['http']}/webhook/nextcloud/talk"
    talk_proc = ctx.Process(target=talk_process, args=(child, ports["talk"], webhook_url), name="soak-talk")
    talk_proc.start()
    daemon: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="tb-soak-") as tmp:
        redis = f'URL = "{args.redis_url}"' if args.redis_url else 'DataDir = "data"\nAppendFsync = "everysec"'
        config = Path(tmp) / "soak.toml"
        config.write_text(
            CONFIG.format(
                port_a=ports["A"], port_b=ports["B"], http=ports["http"], talk_url=f"http://127.0.0.1:{ports['talk']}",
                secret=SECRET, token=TOKEN, redis=redis, prefix=args.key_prefix,
            )
        )  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT))  # the daemon of this tree (a worktree too)
        try:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "run", "--config", str(config)], cwd=ROOT, env=env
            )
            soak = Soak(args, daemon, parent, ports)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
                result = runner.run(soak.run())
            summary = summarize(soak, result)
            if args.json:
                Path(args.json).write_text(
                    json.dumps(
                        {
                            "args": vars(args),
                            "commit": commit_of(ROOT),
                            "samples": [s.__dict__ for s in soak.samples],
                            "summary": summary,
                        },
                        indent=1,
                        default=str,
                    )
                )
        finally:
            if daemon is not None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
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
