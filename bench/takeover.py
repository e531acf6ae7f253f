"""Takeover benchmark: how long users wait when the daemon that owns an account dies.

Starts a Redis (``--redis standalone``: one Debian redis-server 7; ``cluster``:
three masters of it, slots assigned with CLUSTER ADDSLOTS and joined with
CLUSTER MEET) and two daemons with the same two api accounts (``api.sender``,
``api.receiver``; each instance serves api.receiver on its own port, as
behind a load balancer). Once each instance owns one account, it POSTs to
api.sender at a fixed rate (``--rate``), SIGKILLs the owner of api.receiver
``--before`` seconds in, keeps posting for ``--after`` seconds more, and
polls api.receiver's buffer through both instances. Prints:

- first: from the kill to the first message the survivor delivers;
- last: from the kill to the moment every acknowledged POST had arrived;
- lost (acknowledged, never arrived) and duplicated messages, and whether the
  rest arrived in order.

``--tree PATH`` runs the daemons from another checkout (PYTHONPATH=PATH, this
interpreter), e.g. main before the change: ``git worktree add /work/wt/before
55f7508``; that tree knows no ``TakeoverSeconds``, so the key is written only
when ``--takeover`` is given.

    python bench/takeover.py                                   # standalone, defaults (LeaseSeconds 15)
    python bench/takeover.py --redis cluster --runs 3
    python bench/takeover.py --tree /work/wt/before --redis cluster

``--redis sentinel``: one master, two replicas and three sentinels
(tests/sentinel_rig.py, the suite's rig), the daemons on its
``redis+sentinel://`` URL. There ``--kill master`` SIGKILLs the Redis master
instead of a daemon: the gap is then the failover's (the sentinels notice
after one second, ``down-after-milliseconds`` 1000, and promote a replica),
the POSTs answered 503 meanwhile are not acknowledged, and "lost" counts what
was acknowledged and died with the master (``--min-replicas 1``: none).

    python bench/takeover.py --redis sentinel --runs 3
    python bench/takeover.py --redis sentinel --kill master --min-replicas 1 --runs 3

Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError
from urllib.request import Request, urlopen

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server", path="/usr/bin") or "redis-server"

CONFIG = """
[api.sender]
BindAddress = "127.0.0.1:{a}"
Token = "bench-a"
Buffer = 100000
[api.receiver]
BindAddress = "127.0.0.1:{b}"
Token = "bench-b"
Buffer = 100000
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
URL = "{url}"
{redis_extra}
[http]
BindAddress = "127.0.0.1:{http}"
[bus]
{bus}
[log]
Level = "warning"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def wait_until(check: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def http(method: str, port: int, path: str, token: str = "", body: bytes | None = None, timeout: float = 2) -> object:
    """One request; the JSON answer, or None on any failure."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urlopen(Request(f"http://127.0.0.1:{port}{path}", body, headers, method=method), timeout=timeout) as r:
            return json.loads(r.read() or b"null") if r.status == 200 else None
    except (OSError, URLError, ValueError):
        return None


def connected(port: int) -> list[str]:
    answer = http("GET", port, "/readyz")
    states = answer.get("accounts", {}) if isinstance(answer, dict) else {}
    return [name for name, state in states.items() if state == "connected"]


# Redis ----------------------------------------------------------------------------------
def start_server(directory: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True)
    return subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def start_redis(kind: str, tmp: Path, procs: list[subprocess.Popen[bytes]]) -> str:
    """Start the Redis of ``kind``; its URL for the daemons."""
    import redis as sync_redis  # the bench's venv is the daemon's

    if kind == "standalone":
        port = free_port()
        procs.append(start_server(tmp / "redis", port))
        wait_until(lambda: ping(sync_redis.Redis(port=port)), "redis-server")
        return f"redis://127.0.0.1:{port}/0"
    if kind == "cluster":
        ports = [cluster_port() for _ in range(3)]
        for port in ports:
            cluster = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
            procs.append(start_server(tmp / f"node-{port}", port, *cluster))
        nodes = [sync_redis.Redis(port=port) for port in ports]
        for node in nodes:
            wait_until(lambda node=node: ping(node), "a cluster node")
        bounds = [0, 5461, 10923, 16384]
        for i, node in enumerate(nodes):
            node.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for port in ports[1:]:
            nodes[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        wait_until(lambda: all(b"cluster_state:ok" in n.execute_command("CLUSTER", "INFO") for n in nodes), "slots")
        return f"redis+cluster://127.0.0.1:{ports[0]}"
    if kind == "sentinel":
        sys.path.insert(0, str(ROOT))  # the suite's rig, not a copy of it
        from tests.sentinel_rig import SentinelRig

        rig = SentinelRig(tmp / "sentinel").start()
        procs.extend(rig.procs.values())
        RIGS.append(rig)
        return rig.url
    raise SystemExit(f"--redis {kind}: unknown")


RIGS: list[object] = []  # the Sentinel rig of the current run (--kill master kills its master)


def ping(client: object) -> bool:
    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except Exception:
        return False


# the run --------------------------------------------------------------------------------
class Receiver:
    """Drains api.receiver's buffer through every instance's port."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.got: list[tuple[float, str, int]] = []  # (arrival, text, the port it came through)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for port in self.ports:
                answer = http("GET", port, "/api/messages", "bench-b", timeout=0.5)
                now = time.monotonic()
                if isinstance(answer, list):
                    self.got.extend((now, m["text"], port) for m in answer)
            time.sleep(0.01)


def one_run(args: argparse.Namespace, run: int) -> dict[str, float]:
    procs: list[subprocess.Popen[bytes]] = []
    daemons: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        try:
            url = start_redis(args.redis, tmp, procs)
            a = free_port()
            receivers = [free_port(), free_port()]
            https = [free_port(), free_port()]
            bus = f"LeaseSeconds = {args.lease:g}" + (f"\nTakeoverSeconds = {args.takeover:g}" if args.takeover else "")
            redis_extra = f"MinReplicas = {args.min_replicas}" if args.min_replicas else ""
            env = dict(os.environ, PYTHONPATH=str(args.tree))
            for i in range(2):
                config = tmp / f"talkbridge-{i}.toml"
                text = CONFIG.format(a=a, b=receivers[i], url=url, http=https[i], bus=bus, redis_extra=redis_extra)
                config.write_text(text)
                log = open(tmp / f"daemon-{i}.log", "wb")
                daemons.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bridge.cli", "run", "--config", str(config)],
                        cwd=args.tree,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
                if i == 0:
                    wait_until(lambda: len(connected(https[0])) == 2, "the first daemon")
            wait_until(lambda: [len(connected(p)) for p in https] == [1, 1], "one account on each instance", 120)
            owner = next(i for i in range(2) if connected(https[i]) == ["api.receiver"])
            survivor = 1 - owner

            receiver = Receiver(receivers)
            reader = threading.Thread(target=receiver.run, daemon=True)
            reader.start()
            acked: list[str] = []
            total = int((args.before + args.after) * args.rate)
            start = time.monotonic()
            killed_at = 0.0
            ingress_back = 0.0
            acked_after: set[str] = set()
            for i in range(total):
                due = start + i / args.rate
                if not killed_at and due >= start + args.before:
                    if args.kill == "master":
                        RIGS[-1].kill_master()  # type: ignore[attr-defined]
                    else:
                        daemons[owner].send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
                time.sleep(max(0.0, due - time.monotonic()))
                text = f"m{i:05d}"
                body = json.dumps({"text": text, "username": "bench", "gateway": "bench"}).encode()
                if http("POST", a, "/api/message", "bench-a", body, timeout=10) is not None:
                    acked.append(text)
                    if killed_at and not ingress_back:
                        ingress_back = time.monotonic() - killed_at  # the first POST answered 200 after the kill
                    if killed_at:
                        acked_after.add(text)
            wait_until(
                lambda: {t for _, t, _ in receiver.got} >= set(acked), "every acknowledged message", args.lease * 4
            )
            receiver.stop.set()
            reader.join(5)
            texts = [t for _, t, _ in receiver.got]
            # after a master's death either instance may deliver: the first delivery after the kill counts
            by_survivor = [at for at, _, port in receiver.got
                           if at > killed_at and (args.kill == "master" or port == receivers[survivor])]  # fmt: skip
            arrival = {t: at for at, t, _ in reversed(receiver.got)}  # the first copy's
            result = {
                "first": by_survivor[0] - killed_at if by_survivor else float("nan"),
                "last": max(arrival[t] for t in acked) - killed_at,
                "acked": len(acked),
                "ingress": ingress_back,
                # service back end to end: the first message acknowledged after the kill, delivered
                "restored": min((arrival[t] for t in acked_after if t in arrival), default=killed_at) - killed_at,
                "lost": len(set(acked) - set(texts)),
                "duplicated": len(texts) - len(set(texts)),
                "in_order": [t for t in texts if t in set(acked)] == sorted(set(acked)),
            }
            print(
                f"run {run}: first delivery {result['first']:.2f} s after the kill, all {result['acked']} "
                f"acknowledged arrived {result['last']:.2f} s after it; lost {result['lost']}, "
                f"duplicated {result['duplicated']}, in order: {result['in_order']}; the first POST answered "
                f"200 after the kill: {result['ingress']:.2f} s, delivered {result['restored']:.2f} s "
                f"(survivor: instance {survivor})",
                flush=True,
            )
            return result
        finally:
            RIGS.clear()
            for proc in daemons + procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in daemons + procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis", choices=("standalone", "cluster", "sentinel"), default="standalone")
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout the daemons run from")
    p.add_argument("--rate", type=float, default=100, help="POSTs per second")
    p.add_argument("--before", type=float, default=3, help="seconds of steady flow before the kill")
    p.add_argument("--after", type=float, default=1, help="seconds of posting after the kill")
    p.add_argument("--lease", type=float, default=15, help="[bus] LeaseSeconds")
    p.add_argument("--takeover", type=float, default=0, help="[bus] TakeoverSeconds (0: not written, the default)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--kill", choices=("owner", "master"), default="owner",
                   help="SIGKILL the receiving account's owner, or (sentinel) the Redis master")  # fmt: skip
    p.add_argument("--min-replicas", type=int, default=0, help="[redis] MinReplicas (0: not written)")
    args = p.parse_args()
    if args.kill == "master" and args.redis != "sentinel":
        p.error("--kill master needs --redis sentinel (a master with replicas to promote)")
    args.tree = args.tree.resolve()
    commit = subprocess.run(["git", "-C", str(args.tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    version = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout.split()[2]
    print(
        f"tree {args.tree} ({commit}); redis {args.redis} ({version}); LeaseSeconds {args.lease:g}, "
        f"TakeoverSeconds {args.takeover or 'default'}, MinReplicas {args.min_replicas}; {args.rate:g} POST/s, "
        f"kill the {args.kill} after {args.before:g} s, "
        f"posting {args.after:g} s more; {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    results = [one_run(args, run + 1) for run in range(args.runs)]
    if len(results) > 1:
        firsts = ", ".join(f"{r['first']:.2f}" for r in results)
        lasts = ", ".join(f"{r['last']:.2f}" for r in results)
        print(f"first: {firsts} s; last: {lasts} s; lost {sum(r['lost'] for r in results)}, "
              f"duplicated {sum(r['duplicated'] for r in results)}")  # fmt: skip


if __name__ == "__main__":
    main()
