"""Per-room lanes (issue 6): one Talk room failing must not delay the others.

One daemon (``talkbridge run`` as its own process, on its embedded Redis with
append-only persistence) bridges a Matterbridge ``api`` account to eleven
rooms of one Talk bot account, on the Talk test server (``tests/talkserver``,
in this process). This process posts to the api account on an open-loop
schedule — by default 1,000 messages over 20 s to the ten healthy rooms and
100 to the eleventh, interleaved — and timestamps each message when the Talk
server stores the bot's post. Latency counts from the scheduled time.

Two runs on the same daemon, one after the other:

- *no failure*: every room healthy;
- *failure*: the eleventh room answers 503 to every bot request for
  ``--fail-seconds`` (20 s) from the first post, then heals.

Printed side by side: p50/p90/p99/max latency of the healthy rooms, and for
the failing room how many of its messages arrived, whether in order and once
each, and how long after the heal the last one arrived. The daemon retries
the failing room (``MaxDeliveries`` 1000, backoff 0.1 s doubling to 1 s) so
its messages wait rather than being dead-lettered.

    python bench/lanes.py
    python bench/lanes.py --messages 4000 --seconds 20    # 200 msg/s to the healthy rooms
"""

from __future__ import annotations

import argparse
import asyncio
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
sys.path.insert(0, str(ROOT))

from tests.talkserver import TalkServer  # noqa: E402
from tests.talkserver.state import Message  # noqa: E402

try:
    import uvloop
except ImportError:
    uvloop = None

SECRET = "bench-secret-" + "s" * 40
TOKEN_RE = re.compile(r"(\S+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def room(n: int) -> str:
    return f"room{n:04d}"


CONFIG = """
[api.bench]
BindAddress = "127.0.0.1:{api}"
Token = "bench"

[nctalkbot.talk]
Server = "{talk}"
BotSecret = "{secret}"
WebhookURL = "http://127.0.0.1:{http}/webhook/nextcloud/talk"
Timeout = 5
RemoteNickFormat = ""
{gateways}
[redis]
DataDir = "data"
AppendFsync = "everysec"

[http]
BindAddress = "127.0.0.1:{http}"

[bus]
MaxDeliveries = 1000
RetryBaseSeconds = 0.1
RetryMaxSeconds = 1

[log]
Level = "warning"
"""

GATEWAY = """
[[gateway]]
name = "g{n}"
enable = true
[[gateway.inout]]
account = "api.bench"
channel = "api"
[[gateway.inout]]
account = "nctalkbot.talk"
channel = "{room}"
"""


class TimedTalk(TalkServer):
    """The test server, noting when each bot post is stored."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: dict[str, float] = {}  # message text -> perf_counter
        self.order: dict[str, list[str]] = {}  # room -> texts in arrival order

    async def after_bot_message(self, msg: Message) -> None:
        now = time.perf_counter()
        text = TOKEN_RE.search(msg.message).group(1)  # type: ignore[union-attr]
        self.arrived.setdefault(text, now)
        self.order.setdefault(msg.token, []).append(text)
        await super().after_bot_message(msg)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


async def wait_until(check, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def run_phase(
    name: str, talk: TimedTalk, session: aiohttp.ClientSession, api: int, args: argparse.Namespace, fail: bool
) -> dict:
    healthy = [room(n) for n in range(args.rooms)]
    bad = room(args.rooms)
    # the schedule: healthy messages round-robin, the failing room's spread evenly among them
    plan: list[tuple[str, int]] = []
    every = max(1, (args.messages + args.failing_messages) // max(1, args.failing_messages))
    h = f = 0
    while h < args.messages or f < args.failing_messages:
        if f < args.failing_messages and (len(plan) % every == every - 1 or h >= args.messages):
            plan.append((bad, args.rooms))
            f += 1
        else:
            plan.append((healthy[h % args.rooms], h % args.rooms))
            h += 1
    rate = len(plan) / args.seconds
    texts = [f"{name}-{token}-{i:05d}" for i, (token, _) in enumerate(plan)]
    scheduled: dict[str, float] = {}
    requests_before = len(talk.requests(f"/bot/{bad}/message"))
    start = time.perf_counter() + 0.2
    healed_at: list[float] = []
    if fail:
        talk.fail_room(bad, 503)

        async def heal() -> None:
            await asyncio.sleep(max(0.0, start + args.fail_seconds - time.perf_counter()))
            talk.heal_room(bad)
            healed_at.append(time.perf_counter())

        healer = asyncio.create_task(heal())
    next_index = 0

    async def poster() -> None:
        nonlocal next_index
        while next_index < len(plan):
            i, next_index = next_index, next_index + 1
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            scheduled[texts[i]] = due
            body = {"text": texts[i], "username": "bench", "gateway": f"g{plan[i][1]}"}
            async with session.post(
                f"http://127.0.0.1:{api}/api/message", json=body, headers={"Authorization": "Bearer bench"}
            ) as resp:
                assert resp.status == 200, await resp.text()

    await asyncio.gather(*(poster() for _ in range(8)))
    if fail:
        await healer
    want_healthy = [t for t, (token, _) in zip(texts, plan, strict=True) if token != bad]
    want_bad = [t for t, (token, _) in zip(texts, plan, strict=True) if token == bad]

    async def all_arrived() -> bool:
        return all(t in talk.arrived for t in texts)

    await wait_until(all_arrived, f"every message of the {name} run", within=args.fail_seconds + 120)
    lat = [(talk.arrived[t] - scheduled[t]) * 1000 for t in want_healthy]
    got_bad = [t for t in talk.order.get(bad, []) if t.startswith(f"{name}-")]
    statuses = [r.status for r in talk.requests(f"/bot/{bad}/message")[requests_before:]]
    return {
        "healthy": len(want_healthy),
        "rate": rate,
        "p50": pct(lat, 50),
        "p90": pct(lat, 90),
        "p99": pct(lat, 99),
        "max": max(lat),
        "bad_sent": len(want_bad),
        "bad_got": len(got_bad),
        "bad_in_order_once": got_bad == want_bad,
        "bad_503s": statuses.count(503),
        "after_heal_s": (max(talk.arrived[t] for t in want_bad) - healed_at[0]) if healed_at and want_bad else None,
        "healthy_while_failing": (
            sum(1 for t in want_healthy if talk.arrived[t] < healed_at[0]) if healed_at else len(want_healthy)
        ),
    }


async def bench(args: argparse.Namespace, talk_port: int, api: int, http: int) -> None:
    talk = await TimedTalk().start(port=talk_port)
    rooms = [room(n) for n in range(args.rooms + 1)]
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{http}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(ready, "the daemon", within=60)
            alice = talk.add_user("alice", "Alice")
            bot = talk.install_bot("Bench", SECRET, f"http://127.0.0.1:{http}/webhook/nextcloud/talk")
            for token in rooms:
                talk.create_room(token, token, (alice,))
                await talk.enable_bot(bot, token)
            print(
                f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}; "
                f"1 daemon, embedded Redis (append-only, everysec); Talk test server in the load generator's process"
            )
            warm = argparse.Namespace(**{**vars(args), "messages": 100, "failing_messages": 10, "seconds": 2})
            await run_phase("warmup", talk, session, api, warm, fail=False)
            quiet = await run_phase("ok", talk, session, api, args, fail=False)
            failing = await run_phase("fail", talk, session, api, args, fail=True)
    finally:
        await talk.stop()
    print(
        f"{args.rooms} healthy rooms: {quiet['healthy']} messages; room {args.rooms + 1}: "
        f"{quiet['bad_sent']} messages; {quiet['rate']:.0f} msg/s in all, open loop over {args.seconds:.0f} s"
    )
    print(f"{'':34} {'no failure':>12} {'failure':>12}")
    for key, label in (("p50", "healthy rooms p50 ms"), ("p90", "p90 ms"), ("p99", "p99 ms"), ("max", "max ms")):
        print(f"{label:34} {quiet[key]:12.2f} {failing[key]:12.2f}")
    print(f"{'p99 failure / no failure':34} {'':12} {failing['p99'] / quiet['p99']:12.2f}")
    print(
        f"failing room: 503 for {args.fail_seconds:.0f} s ({failing['bad_503s']} requests refused); "
        f"healthy messages delivered while it failed: {failing['healthy_while_failing']}"
    )
    print(
        f"failing room: {failing['bad_got']} of {failing['bad_sent']} arrived, "
        f"in order and once each: {failing['bad_in_order_once']}; "
        f"the last one {failing['after_heal_s']:.2f} s after the heal"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rooms", type=int, default=10, help="healthy rooms (one more fails)")
    p.add_argument("--messages", type=int, default=1000, help="messages to the healthy rooms in all")
    p.add_argument("--failing-messages", type=int, default=100, help="messages to the failing room")
    p.add_argument("--seconds", type=float, default=20, help="the schedule's length")
    p.add_argument("--fail-seconds", type=float, default=20, help="how long the failing room answers 503")
    args = p.parse_args()
    talk_port, api, http = free_port(), free_port(), free_port()
    gateways = "".join(GATEWAY.format(n=n, room=room(n)) for n in range(args.rooms + 1))
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lanes.toml"
        talk = f"http://127.0.0.1:{talk_port}"
        config.write_text(CONFIG.format(api=api, http=http, talk=talk, secret=SECRET, gateways=gateways))
        with open(Path(tmp) / "daemon.log", "wb") as log:
            cmd = [sys.executable, "-m", "bridge.cli", "run", "--config", str(config)]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)
            try:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
                    runner.run(bench(args, talk_port, api, http))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)


if __name__ == "__main__":
    main()
