"""The embedded Redis is found by every process that reads the same config,
and what it keeps is readable by the daemon's user only."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bridge.embedded_redis import MAX_UNIX_PATH, EmbeddedRedis
from tests.helpers import ROOT, Daemon, api_pair_config, wait_for

SOCKET_PATH_OF = "import sys; from pathlib import Path; from bridge.embedded_redis import EmbeddedRedis; " \
    "print(EmbeddedRedis(Path(sys.argv[1])).socket_path)"  # fmt: skip


def long_dir(tmp_path: Path) -> Path:
    path = tmp_path / ("a-data-directory-whose-path-is-too-long-for-a-unix-socket-" * 2)
    path.mkdir()
    assert len(str(path / "data" / "redis.sock")) > MAX_UNIX_PATH
    return path


def with_hash_seed(seed: str) -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": seed}


def test_the_socket_of_a_long_data_dir_is_named_the_same_in_every_process(tmp_path: Path) -> None:
    data_dir = long_dir(tmp_path) / "data"
    names = {
        subprocess.run(
            [sys.executable, "-c", SOCKET_PATH_OF, str(data_dir)],
            cwd=ROOT, env=with_hash_seed(seed), capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        for seed in ("1", "2", "random")
    }  # fmt: skip
    assert names == {EmbeddedRedis(data_dir).socket_path}
    [name] = names
    assert len(name) <= MAX_UNIX_PATH and name != str(data_dir / "redis.sock")
    # a different data directory gets a different socket
    assert EmbeddedRedis(data_dir.parent / "other").socket_path != name


def test_status_finds_the_running_daemons_redis_behind_a_long_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, (_a, _b, http) = api_pair_config(long_dir(tmp_path), None)
    monkeypatch.setenv("PYTHONHASHSEED", "1")  # the daemon's
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        status = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "status", "--config", str(path)],
            cwd=ROOT, env=with_hash_seed("2"), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert status.stdout.splitlines()[-1] == "dead letters: 0"
        assert daemon.proc is not None and daemon.proc.poll() is None
        daemon.wait_ready()
    finally:
        assert daemon.stop() == 0


# Its data is private ----------------------------------------------------------------------
def modes_under(data_dir: Path) -> dict[str, int]:
    """Every entry under the data directory (and the directory itself) with its permission bits."""
    found = {".": stat.S_IMODE(data_dir.stat().st_mode)}
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root) / name
            found[str(path.relative_to(data_dir))] = stat.S_IMODE(path.lstat().st_mode)
    return found


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_the_data_directory_and_every_file_redis_writes_in_it_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = EmbeddedRedis(data_dir)
    with umask(0o022):  # the usual one: files 0644, directories 0755
        server.start()
    try:
        client = redis.Redis(unix_socket_path=server.socket_path)
        client.set("bridged", "a message")
        # Files Redis writes later, from a forked child: an AOF rewrite, an RDB save.
        client.bgrewriteaof()
        wait_for(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0
                 and client.info("persistence")["aof_rewrite_scheduled"] == 0, what="AOF rewrite")  # fmt: skip
        wait_for(lambda: client.info("persistence")["aof_last_bgrewrite_status"] == "ok", what="rewrite ok")
        client.bgsave()
        wait_for(lambda: (data_dir / "dump.rdb").exists() and client.info("persistence")["rdb_bgsave_in_progress"] == 0,
                 what="RDB save")  # fmt: skip
        client.close()
        modes = modes_under(data_dir)
    finally:
        server.stop()
    assert {"dump.rdb", "redis.sock", "redis.log", "redis.pid", "talkbridge.pid"} <= set(modes)
    assert any("aof" in name for name in modes)  # appendonly.aof (6.2) or appendonlydir/ (7)
    assert modes.pop(".") == 0o700
    for name, mode in modes.items():
        is_dir = (data_dir / name).is_dir()
        assert mode == (0o700 if is_dir else 0o600), f"{name}: {mode:04o}"


def test_a_data_directory_left_open_by_an_older_version_is_tightened_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    (data_dir / "redis.log").write_text("an old log\n")
    os.chmod(data_dir / "redis.log", 0o644)
    (data_dir / "notes").mkdir()
    os.chmod(data_dir / "notes", 0o775)
    (data_dir / "read-only").write_text("x")
    os.chmod(data_dir / "read-only", 0o444)
    server = EmbeddedRedis(data_dir, log=logging.getLogger("test.embedded"))
    with caplog.at_level(logging.WARNING, logger="test.embedded"), umask(0o022):
        server.start()
    try:
        modes = modes_under(data_dir)
    finally:
        server.stop()
    assert modes["."] == 0o700 and modes["redis.log"] == 0o600 and modes["notes"] == 0o700
    assert modes["read-only"] == 0o400  # bits are taken away, never added
    [record] = [r for r in caplog.records if "private" in r.getMessage()]
    message = record.getMessage()
    assert f"{data_dir}: 0755 -> 0700" in message and f"{data_dir / 'redis.log'}: 0644 -> 0600" in message
    # the next start finds nothing to change and says nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test.embedded"):
        server.start()
    server.stop()
    assert not [r for r in caplog.records if "private" in r.getMessage()]


def test_the_socket_of_a_long_data_dir_is_private_too(tmp_path: Path) -> None:
    server = EmbeddedRedis(long_dir(tmp_path) / "data")
    with umask(0o022):
        server.start()
    try:
        assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o600
        assert redis.Redis(unix_socket_path=server.socket_path).ping()
    finally:
        server.stop()
