"""The test Matterbridge as a real process, for tests that kill and restart
it: ``with MatterbridgeProcess(config, tmp_path) as mb: ... mb.kill();
mb.start()``. The config must name a ``control`` address; ``say``,
``heard`` and ``ring`` go through it (see the package docstring)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


class MatterbridgeProcess:
    def __init__(self, config: dict[str, Any], workdir: Path, ready_within: float = 20.0) -> None:
        if not config.get("control"):
            raise ValueError("the process needs a 'control' address in its config")
        self.config = config
        self.path = workdir / "matterbridge.json"
        self.path.write_text(json.dumps(config))
        self.control = f"http://{config['control']}"
        self.ready_within = ready_within
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MatterbridgeProcess:
        """Start it and wait for its ``ready`` line."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.mbserver", str(self.path)], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE)  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.ready_within
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = self.proc.stdout.readline()
                    if line.strip() == b"ready":
                        return self
                    if not line:
                        break
        self.kill()
        raise RuntimeError("the test Matterbridge did not come up")

    def kill(self) -> None:
        """SIGKILL: nothing is saved, as with a crashed Matterbridge."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> MatterbridgeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # control ------------------------------------------------------------------------------------------------------
    def say(self, account: str, channel: str, text: str, username: str, **more: Any) -> None:
        body = {"account": account, "channel": channel, "text": text, "username": username, **more}
        httpx.post(f"{self.control}/say", json=body).raise_for_status()

    def heard(self, account: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.control}/heard", params={"account": account})
        response.raise_for_status()
        heard: list[dict[str, Any]] = response.json()
        return heard

    def ring(self, account: str) -> int:
        response = httpx.get(f"{self.control}/ring", params={"account": account})
        response.raise_for_status()
        size: int = response.json()["size"]
        return size
