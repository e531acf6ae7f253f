"""Test helpers: real servers and real processes, waited on by condition."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
from prometheus_client import CollectorRegistry

from bridge.embedded_redis import find_redis_server
from bridge.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class LogLines(logging.Handler):
    """A handler that keeps the messages it is given: what a logger said."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], T], timeout: float = 15.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll until ``condition()`` is truthy; the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


QUIET = 1.0  # seconds with nothing new before "nothing more arrives" is believed


def wait_quiet(observe: Callable[[], object], quiet: float = QUIET, timeout: float = 30.0, interval: float = 0.05,
               what: str = "quiet") -> object:  # fmt: skip
    """Keep calling ``observe()`` until its value has not changed for ``quiet``
    seconds, and return that value.

    An observation window, not synchronization, and only where no sentinel
    can follow the run (``through_sentinel`` is the rule): a held or paused
    account delivers nothing (a sentinel neither), a stall is a standstill,
    and a stale owner's sends, arq jobs' replies and alerts keep no order
    with any message sent after them. It misses what comes later than
    ``quiet``; each use says why it is one of these. The deadline only
    bounds a failure: a value that never stops changing."""
    value = observe()
    deadline = time.monotonic() + timeout
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still changing after {timeout} s")
        time.sleep(interval)
        new = observe()
        if new != value:
            value, since = new, time.monotonic()
    return value


SENTINEL = "sentinel: whatever was to arrive came before me"


def through_sentinel(
    send: Callable[[], object],
    observe: Callable[[], Sequence[T]],
    is_sentinel: Callable[[T], bool],
    count: int = 1,
    timeout: float = 30.0,
    what: str = "the sentinel",
) -> list[T]:
    """End a run with one more message and wait for it: ``send()`` posts the
    sentinel(s) down the path the run's messages took (one per room observed:
    ``count``), then ``observe()`` is polled until that many items satisfy
    ``is_sentinel``; what it shows without them is returned.

    Unlike ``wait_quiet``'s window, a duplicate is not missed for arriving
    late: a room's deliveries go in order and a retry or a replay holds the
    ones after it, so whatever would be duplicated arrives before the
    sentinel. A sentinel seen more often than sent is a duplicate too."""
    send()

    def arrived() -> list[T] | None:
        items = list(observe())
        return items if sum(1 for x in items if is_sentinel(x)) >= count else None

    items = wait_for(arrived, timeout=timeout, what=what)
    marks = sum(1 for x in items if is_sentinel(x))
    assert marks == count, f"{what}: {marks} sentinel(s) arrived, {count} sent"
    return [x for x in items if not is_sentinel(x)]


def post_pair_sentinel(port_a: int) -> None:
    """The sentinel, posted to api.a of ``api_pair_config`` (gateway ``g``)."""
    resp = httpx.post(f"http://127.0.0.1:{port_a}/api/message", headers={"Authorization": "Bearer token-a"},
                      json={"text": SENTINEL, "username": "alice", "gateway": "g"}, timeout=5)  # fmt: skip
    assert resp.status_code == 200, resp.text


def has_sentinel(text: object) -> bool:
    """A relayed copy of ``SENTINEL`` (the bridge prefixes a nick)."""
    return isinstance(text, str) and text.endswith(SENTINEL)


def metric(source: Metrics | CollectorRegistry, name: str, **labels: str) -> float:
    """One sample as ``/metrics`` shows it (a counter's is ``NAME_total``), read
    through the registry's public ``get_sample_value``, not prometheus_client's
    private ``_value``; ``source``: a ``Metrics`` or its registry. A series
    never set reads 0, as a labelled child that was never touched does; a
    name the registry does not have is a KeyError (a typo never reads 0)."""
    registry = source.registry if isinstance(source, Metrics) else source
    value = registry.get_sample_value(name, labels)
    if value is not None:
        return value
    families = {family.name for family in registry.collect()}
    if name not in families and name.removesuffix("_total") not in families:
        raise KeyError(f"no metric {name} in the registry")
    return 0.0


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int
    binary: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis_server(data_dir: Path, port: int | None = None, *options: str) -> RedisServer:
    """A redis-server on loopback, without persistence; ``options`` are more
    of its command-line options (``--cluster-enabled yes``)."""
    binary = os.environ.get("TALKBRIDGE_TEST_REDIS_SERVER") or find_redis_server()
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
         "--appendonly", "no", "--daemonize", "no", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(lambda: _ping(port) or proc.poll() is not None, what="redis-server")
    if proc.poll() is not None:
        raise RuntimeError(f"{binary} exited with {proc.returncode}")
    return RedisServer(proc, port, binary)


class Daemon:
    """``talkbridge run`` as a real child process."""

    def __init__(self, config: Path, http_port: int, log: Path) -> None:
        self.config = config
        self.http_port = http_port
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True) -> Daemon:
        self._log = open(self.log_path, "ab")  # closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                resp = httpx.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1)
            except httpx.HTTPError:
                return False
            # Ready *here*: after a crash the dead instance's leases must expire first.
            accounts = resp.json().get("accounts", {}) if resp.status_code == 200 else {}
            return bool(accounts) and all(state == "connected" for state in accounts.values())

        wait_for(ready, timeout=timeout, interval=0.05, what="daemon /readyz")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no cleanup, exactly like a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


class WorkerProcess:
    """``talkbridge worker`` as a real child process (SIGKILL it for a crash)."""

    READY = "job functions on queue"  # workers/settings.py logs it once arq is about to poll

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True) -> WorkerProcess:
        self._log = open(self.log_path, "ab")  # closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "worker", "--config", str(self.config)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if ready:

            def started() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
                return self.READY in self.log()

            wait_for(started, timeout=30, what="worker started")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


TomlValue = str | int | float | bool | list[str] | list[int]
NICK_FORMAT = "[{PROTOCOL}/{BRIDGE}] <{NICK}> "  # the RemoteNickFormat most tests' configs use


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's


@dataclass
class ConfigToml:
    """One builder for the talkbridge.toml the tests write, instead of TOML
    copied from file to file: sections in the order added, values quoted as
    TOML wants them. ``daemon`` adds what every started daemon needs."""

    parts: list[str] = field(default_factory=list)

    def section(self, name: str, **keys: TomlValue) -> ConfigToml:
        body = "".join(f"{key} = {toml_value(value)}\n" for key, value in keys.items())
        self.parts.append(f"[{name}]\n{body}")
        return self

    def general(self, nick_format: str = NICK_FORMAT, **keys: TomlValue) -> ConfigToml:
        """``[general]`` with its ``RemoteNickFormat`` (the one most tests use, by default)."""
        return self.section("general", RemoteNickFormat=nick_format, **keys)

    def api(self, name: str, port: int, token: str = "", **keys: TomlValue) -> ConfigToml:
        """A Matterbridge api account on loopback (with no ``Token``: open, for in-process tests)."""
        return self.section(
            f"api.{name}", BindAddress=f"127.0.0.1:{port}", **({"Token": token} if token else {}), **keys
        )

    def gateway(
        self,
        name: str,
        *inouts: tuple[str, str],
        ins: Sequence[tuple[str, str]] = (),
        outs: Sequence[tuple[str, str]] = (),
        **keys: TomlValue,
    ) -> ConfigToml:
        """``[[gateway]]`` (and its ``keys``) with its ``(account, channel)``
        pairs: both ways (``inouts``), only into the gateway (``ins``), only
        out of it (``outs``)."""
        out = f"[[gateway]]\nname = {toml_value(name)}\nenable = true\n"
        out += "".join(f"{key} = {toml_value(value)}\n" for key, value in keys.items())
        for kind, pairs in (("inout", inouts), ("in", ins), ("out", outs)):
            for account, channel in pairs:
                out += f"[[gateway.{kind}]]\naccount = {toml_value(account)}\nchannel = {toml_value(channel)}\n"
        self.parts.append(out)
        return self

    def raw(self, text: str) -> ConfigToml:
        """Sections written elsewhere (the rigs' ``user_section``, ``bot_section``, ``matrix_section``)."""
        self.parts.append(text)
        return self

    def daemon(
        self, redis_url: str | None, http_port: int, http: Mapping[str, TomlValue] | None = None, **bus: TomlValue
    ) -> ConfigToml:
        """``[redis]`` (an URL, or the embedded one in ``data``), ``[http]`` on
        loopback (and the keys in ``http``), ``[bus]``."""
        self.section("redis", **({"URL": redis_url} if redis_url else {"DataDir": "data"}))
        self.section("http", BindAddress=f"127.0.0.1:{http_port}", **(http or {}))
        return self.section("bus", **bus)

    def text(self) -> str:
        return "\n".join(self.parts)

    def write(self, path: Path) -> Path:
        path.write_text(self.text())
        return path


def api_pair_config(
    tmp_path: Path,
    redis_url: str | None,
    *,
    ports: tuple[int, int, int] | None = None,
    extra: str = "",
    buffer: int = 1000,
) -> tuple[Path, tuple[int, int, int]]:
    """Two Matterbridge api accounts in one gateway; returns (path, (a, b, http) ports)."""
    a, b, http = ports or (free_port(), free_port(), free_port())
    config = ConfigToml().general()
    config.api("a", a, "token-a", Buffer=buffer).api("b", b, "token-b", Buffer=buffer)
    config.gateway("g", ("api.a", "api"), ("api.b", "api")).daemon(redis_url, http, LeaseSeconds=3)
    path = config.write(tmp_path / "talkbridge.toml")
    if extra:  # more of [bus], or sections after it
        path.write_text(path.read_text() + extra + "\n")
    return path, (a, b, http)
