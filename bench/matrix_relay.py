"""Relay throughput and latency api -> talkbridge -> Synapse -> a second Matrix client,
next to Synapse's own single-client send rate measured in the same run.

    .venv/bin/python -m bench.matrix_relay [--messages 500] [--rate MSG_PER_S] [--encrypted]

Starts its own Redis, a Synapse from the ``matrix-synapse`` package (sqlite,
rate limits raised: tests/synapse_rig.py) and ``talkbridge run`` with one
Matrix account and one api account in a gateway. A reader (a second Matrix
user in the room) long-polls /sync and notes when each message arrives.

1. Synapse alone: one client sends N messages one after another (PUT send,
   each awaited), as the bridge's room lane does; messages/s and the
   send -> reader latency.
2. Through the bridge: N messages POSTed to the api account; messages/s
   from the first POST to the last arrival, and the POST -> reader latency.

Without ``--rate`` both are one burst: the rate is the most each path
carries, and the latency is mostly queueing behind Synapse. With ``--rate R``
both send on a schedule of R messages/s (open loop: message i is due at
start + i/R, sent then whatever the answers before it did), below Synapse's
own rate, so the latencies are what each path adds to a message, not queueing.

``--encrypted``: the room is end-to-end encrypted from its creation; the
direct sender and the reader are matrix-nio E2E clients (tests/
matrix_e2ee_rig.py), so both paths encrypt and the reader decrypts. Each
run also prints the daemon's CPU time per bridged message (user + system,
from /proc), the figure encryption adds to.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.helpers import Daemon, free_port, start_redis_server, wait_for
from tests.matrix_e2ee_rig import HUMAN_PASSWORD, Human
from tests.synapse_rig import SynapseServer


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Reader:
    """A second Matrix user: /sync long polls, arrival time per message body."""

    def __init__(self, server: str, token: str, room: str) -> None:
        self.server, self.token, self.room = server, token, room
        self.seen: dict[str, float] = {}
        self.since: str | None = None

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {self.token}"}) as client:
            while True:
                params = {"timeout": "30000", "filter": '{"room":{"timeline":{"limit":1000}}}'}
                if self.since:
                    params["since"] = self.since
                resp = await client.get(self.server + "/_matrix/client/v3/sync", params=params)
                data = resp.json()
                now = time.perf_counter()
                self.since = data["next_batch"]
                room = data.get("rooms", {}).get("join", {}).get(self.room, {})
                for event in room.get("timeline", {}).get("events", []):
                    body = event.get("content", {}).get("body")
                    if isinstance(body, str):
                        self.seen.setdefault(body.rsplit(" ", 1)[-1], now)


class E2EReader(Reader):
    """The reader as an E2E client: nio long polls /sync and decrypts."""

    def __init__(self, human, room: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__("", "", room)
        self.human = human

    async def run(self) -> None:
        client = self.human.client
        while True:
            resp = await client.sync(timeout=30000)
            now = time.perf_counter()
            self.since = client.next_batch
            room = resp.rooms.join.get(self.room)
            for event in room.timeline.events if room is not None else []:
                body = getattr(event, "body", None)
                if isinstance(body, str):
                    self.seen.setdefault(body.rsplit(" ", 1)[-1], now)
            if client.should_upload_keys:
                await client.keys_upload()
            if client.should_query_keys:
                await client.keys_query()
            await client.send_to_device_messages()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def until(cond, within: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.01)


async def until_async(cond, within: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.05)


def report(name: str, n: int, start: float, sent: dict[str, float], seen: dict[str, float]) -> tuple[float, float]:
    lat = [(seen[k] - sent[k]) * 1000 for k in sent]
    rate = n / (max(seen[k] for k in sent) - start)
    print(f"{name:<28} {rate:8.1f} msg/s   p50 {statistics.median(lat):7.1f} ms   p99 {pct(lat, 99):7.1f} ms")
    return rate, statistics.median(lat)


async def due(start: float, i: int, rate: float | None) -> None:
    """Sleep until message ``i`` is due (paced runs only)."""
    if rate:
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


async def main(n: int, rate: float | None, encrypted: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    redis = start_redis_server(work)
    synapse = SynapseServer(work / "synapse").start()
    daemon = None
    try:
        bot = synapse.register("bot", "bot-password")
        bot.call("POST", "/_matrix/client/v3/logout", {})
        password = HUMAN_PASSWORD if encrypted else None  # the E2E clients log in: a device with keys each
        alice = synapse.register("alice", password)
        reader_user = synapse.register("reader", password)
        room = alice.create_room(invite=["@bot:test.local", reader_user.user_id], encrypted=encrypted)
        reader_user.join(room)
        humans = []
        if encrypted:  # both sides E2E clients, each in a store of its own
            for user in (alice, reader_user):
                humans.append(await Human(synapse.url, user.user_id, work / user.user_id).start())
        http, api = free_port(), free_port()
        config = work / "talkbridge.toml"
        config.write_text(
            f'[matrix.hs]\nServer = "{synapse.url}"\nLogin = "bot"\nPassword = "bot-password"\n'
            f'RemoteNickFormat = "<{{NICK}}> "\n[api.a]\nBindAddress = "127.0.0.1:{api}"\nToken = "t"\n'
            f'[[gateway]]\nname = "g"\nenable = true\n[[gateway.inout]]\naccount = "matrix.hs"\nchannel = "{room}"\n'
            '[[gateway.inout]]\naccount = "api.a"\nchannel = "api"\n'
            f'[redis]\nURL = "{redis.url}"\n[http]\nBindAddress = "127.0.0.1:{http}"\n[log]\nLevel = "warning"\n'
        )
        daemon = Daemon(config, http, work / "daemon.log").start()
        members = f"/_matrix/client/v3/rooms/{room}/joined_members"
        wait_for(lambda: "@bot:test.local" in alice.call("GET", members)["joined"], timeout=60, what="bot joined")
        if encrypted:  # every device's keys known before the first message: nothing waits for a late key
            for other in ("@bot:test.local", humans[1].user_id):
                await until_async(lambda other=other: humans[0].device_of(other))
            await until_async(lambda: humans[1].device_of("@bot:test.local"))
        reader = E2EReader(humans[1], room) if encrypted else Reader(synapse.url, reader_user.access_token, room)
        task = asyncio.create_task(reader.run())
        await until(lambda: reader.since is not None)

        # 1. Synapse alone: one client, sends one after another
        sent: dict[str, float] = {}
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {alice.access_token}"}) as c:
            start = time.perf_counter()

            async def direct(i: int) -> None:
                key = f"s{i}"
                sent[key] = time.perf_counter()
                if encrypted:
                    await humans[0].text(room, f"direct {key}")
                    return
                url = f"{synapse.url}/_matrix/client/v3/rooms/{room}/send/m.room.message/b{i}"
                (await c.put(url, json={"msgtype": "m.text", "body": f"direct {key}"})).raise_for_status()

            if rate:  # on schedule, each send on its own (as the bridge's sends are paced by arrivals)
                sends = []
                for i in range(n):
                    await due(start, i, rate)
                    sends.append(asyncio.create_task(direct(i)))
                await asyncio.gather(*sends)
            else:  # one after another, as the bridge's room lane sends
                for i in range(n):
                    await direct(i)
        await until(lambda: all(k in reader.seen for k in sent))
        base_rate, base_p50 = report("Synapse, one client", n, start, sent, reader.seen)

        # 2. through the bridge
        sent2: dict[str, float] = {}
        assert daemon.proc is not None
        cpu_before = cpu_seconds(daemon.proc.pid)
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": "Bearer t"}) as c:
            start = time.perf_counter()
            for i in range(n):
                await due(start, i, rate)
                key = f"b{i}"
                sent2[key] = time.perf_counter()
                body = {"text": key, "username": "zoe", "gateway": "g"}
                (await c.post(f"http://127.0.0.1:{api}/api/message", json=body)).raise_for_status()
        await until(lambda: all(k in reader.seen for k in sent2))
        rate, p50 = report("api -> talkbridge -> Synapse", n, start, sent2, reader.seen)
        cpu = cpu_seconds(daemon.proc.pid) - cpu_before
        print(f"daemon CPU: {cpu:.2f} s for {n} messages, {cpu / n * 1000:.2f} ms per message")
        print(f"bridge / Synapse alone: {rate / base_rate:.2f} x the rate, +{p50 - base_p50:.1f} ms p50")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        task.cancel()
        for human in humans:
            await human.close()
    finally:
        if daemon is not None:
            daemon.stop()
        synapse.stop()
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rate", type=float, default=None, help="messages/s on a schedule (default: one burst)")
    parser.add_argument("--encrypted", action="store_true", help="an end-to-end encrypted room")
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.rate, args.encrypted))
