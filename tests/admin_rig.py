"""The management page served for tests: the real ``AdminApp`` on a real
``Listener`` (as the daemon serves it), on an event loop of its own thread,
against the suite's Redis; and a client that logs in as a browser does."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import httpx
from redis.asyncio import Redis

from bridge.admin.passwords import hash_password
from bridge.admin.web import AdminApp
from bridge.config import Config
from bridge.listener import Listener, ListenerLimits
from tests.helpers import free_port
from tests.talkbot_rig import write_config

USER = "admin"
PASSWORD = "correct horse battery staple"
# scrypt at a small N: the format and code path of the default, at a test's speed
PASSWORD_HASH = hash_password(PASSWORD, n=1024)


def admin_config(
    tmp_path: Path,
    redis_url: str,
    admin_port: int,
    *,
    extra: str = "",
    accounts: str = "",
    password: str = PASSWORD_HASH,
    bind: str = "",
) -> Config:
    api = (
        accounts
        or f"""
[api.a]
BindAddress = "127.0.0.1:{free_port()}"
Token = "token-a"
[api.b]
BindAddress = "127.0.0.1:{free_port()}"
Token = "token-b"
[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "api.a"
channel = "api"
[[gateway.inout]]
account = "api.b"
channel = "api"
"""
    )
    return write_config(
        tmp_path / "talkbridge.toml",
        f"""{api}
[redis]
URL = "{redis_url}"

[admin]
BindAddress = "{bind or f"127.0.0.1:{admin_port}"}"
User = "{USER}"
Password = "{password}"
MaxFailedLogins = 3
MaxFailedLoginsAll = 6
LockoutMinutes = 1
RefreshSeconds = 0.5
{extra}
""",
    )


class AdminServer:
    """``AdminApp`` on its own loop in a thread, until ``stop``."""

    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.redis_url = redis_url
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="admin-server", daemon=True)
        self.app: AdminApp | None = None
        self._listener: Listener | None = None
        self._redis: Redis | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AdminServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(15)
        return self

    async def _start(self) -> None:
        self._redis = Redis.from_url(self.redis_url)
        self.app = AdminApp(self.config, self._redis)
        self._listener = Listener(self.app.build(), "admin", ListenerLimits())
        await self._listener.start("127.0.0.1", self.port)

    def call(self, coro_fn, *args):  # type: ignore[no-untyped-def]
        """Run ``coro_fn(*args)`` on the server's loop (its Redis client, its app)."""
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self.loop).result(30)

    def stop(self) -> None:
        async def finish() -> None:
            if self._listener is not None:
                await self._listener.cleanup()
            if self._redis is not None:
                await self._redis.aclose()

        asyncio.run_coroutine_threadsafe(finish(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class AdminClient:
    """A client with a cookie jar, from a chosen loopback address."""

    def __init__(self, base: str, source: str = "127.0.0.1") -> None:
        self.base = base
        self.http = httpx.Client(
            base_url=base, transport=httpx.HTTPTransport(local_address=source), follow_redirects=False, timeout=20
        )

    def login(self, user: str = USER, password: str = PASSWORD) -> httpx.Response:
        form = self.http.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token is not None, form.text
        return self.http.post(
            "/login", data={"login_token": token.group(1), "user": user, "password": password, "next": "/"}
        )

    def csrf(self) -> str:
        page = self.http.get("/")
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found is not None, page.text
        return found.group(1)

    def post(self, path: str, **form: str | list[str]) -> httpx.Response:
        return self.http.post(path, data=form)

    def close(self) -> None:
        self.http.close()
