"""The embedded Redis is found by every process that reads the same config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.embedded_redis import MAX_UNIX_PATH, EmbeddedRedis
from tests.helpers import ROOT, Daemon, api_pair_config

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
