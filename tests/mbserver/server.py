"""The test Matterbridge: its accounts, its router, and the control surface
tests drive it with. See the package docstring for the config and the
control API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import traceback
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.mbserver.api import ApiBridge
from tests.mbserver.gateway import Bridge, Gateway
from tests.mbserver.gojson import FileInfo, Message, marshal, to_plain
from tests.mbserver.melody import PING_PERIOD, PONG_WAIT

UNSUPPORTED = ("PreserveThreading", "ExtractNicks", "MediaServerUpload", "MediaDownloadPath", "Tengo")


class ConfigError(ValueError):
    pass


def check_config(config: dict[str, Any]) -> None:
    accounts = config.get("accounts")
    if not isinstance(accounts, dict) or not isinstance(config.get("gateways"), list):
        raise ConfigError("config needs 'accounts' (an object) and 'gateways' (a list)")
    for account, settings in accounts.items():
        if account.count(".") != 1 or not all(account.split(".")):  # bridge.New: protocol.name, else Fatal
            raise ConfigError(f"config failure, account incorrect: {account}")
        for key in UNSUPPORTED:
            if key in settings or key in config.get("general", {}):
                raise ConfigError(f"{key} is not modelled by the test Matterbridge")
        if account.startswith("api.") and "BindAddress" not in settings:
            raise ConfigError(f"{account}: No BindAddress configured.")
    names = set()
    for gateway in config["gateways"]:
        if not gateway.get("name"):  # router.go NewRouter
            raise ConfigError("Gateway without name found")
        if gateway["name"] in names:
            raise ConfigError(f"Gateway with name {gateway['name']} already exists")
        names.add(gateway["name"])
        for direction in ("in", "out", "inout"):
            for entry in gateway.get(direction, []):
                if entry.get("account") not in accounts:  # gateway.go checkConfig
                    raise ConfigError(f"Account {entry.get('account')} defined in gateway {gateway['name']} but "
                                      "no configuration found, exiting.")  # fmt: skip


class NetworkBridge:
    """A scripted account of any other protocol: what the gateway sends it is
    kept (``heard``), and its Send returns no id."""

    def __init__(self) -> None:
        self.heard: list[Message] = []

    def send(self, msg: Message) -> str:
        self.heard.append(msg)
        return ""


class MatterbridgeServer:
    """``async with MatterbridgeServer(config) as mb:`` -- see the package docstring."""

    def __init__(self, config: dict[str, Any], *, ping_period: float | None = None,
                 pong_wait: float | None = None) -> None:  # fmt: skip
        check_config(config)
        self.config = config
        melody = config.get("melody", {})
        ping = ping_period if ping_period is not None else float(melody.get("PingPeriod", PING_PERIOD))
        pong = pong_wait if pong_wait is not None else float(melody.get("PongWait", PONG_WAIT))
        general = dict(config.get("general", {}))
        self._queue: asyncio.Queue[Message] = asyncio.Queue(1)  # b.Remote: unbuffered in Go
        self.apis: dict[str, ApiBridge] = {}
        self.networks: dict[str, NetworkBridge] = {}
        bridges: dict[str, Bridge] = {}
        for account, settings in config["accounts"].items():
            if account.startswith("api."):
                api = ApiBridge(account, settings, self._queue.put, ping, pong)
                self.apis[account] = api
                send = api.send
            else:
                network = NetworkBridge()
                self.networks[account] = network
                send = network.send
            bridges[account] = Bridge(account, dict(settings), general, send)
        self.bridges = bridges
        self.gateways: list[Gateway] = []
        for entry in config["gateways"]:
            if entry.get("enable", True) is False:  # router.go NewRouter skips a disabled gateway
                continue
            gateway = Gateway(entry["name"])
            for direction in ("in", "out", "inout"):  # gateway.go mapChannels: in, out, then inout
                gateway.add(entry.get(direction, []), direction, bridges)
            self.gateways.append(gateway)
        self._router: asyncio.Task[None] | None = None
        self._control: web.AppRunner | None = None

    async def start(self) -> MatterbridgeServer:
        self._router = asyncio.create_task(self._handle_receive())
        for api in self.apis.values():
            await api.start()
        if self.config.get("control"):
            await self._start_control(str(self.config["control"]))
        return self

    async def stop(self) -> None:
        if self._control is not None:
            await self._control.cleanup()
            self._control = None
        for api in self.apis.values():
            await api.stop()
        if self._router is not None:
            self._router.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._router
            self._router = None

    async def __aenter__(self) -> MatterbridgeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle_receive(self) -> None:
        """router.go handleReceive."""
        while True:
            msg = await self._queue.get()
            msg.protocol = self.bridges[msg.account].protocol  # "Set message protocol based on the account"
            try:
                for gateway in self.gateways:
                    gateway.route(msg)
            except Exception:  # a panic in Go would end the process; here it is shown and the router goes on
                traceback.print_exc()

    # the control surface ----------------------------------------------------------------------------------------------
    async def say(self, account: str, channel: str, text: str, username: str, userid: str = "", event: str = "",
                  parent_id: str = "", extra: dict[str, Any] | None = None, id: str = "") -> None:  # fmt: skip
        """``account`` (a network account) receives a message from its network,
        as a bridge does (b.Remote <- msg). Extra.file entries are given as
        {"Name", "Data" (base64), "Comment", "URL"} and become FileInfo, as a
        bridge makes them."""
        if account not in self.networks:
            raise KeyError(f"{account} is not a network account")
        files = None
        if extra is not None:
            extra = {key: (list(value) if value is not None else None) for key, value in extra.items()}
            files = extra.get("file")
        for i, item in enumerate(files or []):
            data = item.get("Data")
            files[i] = FileInfo(Name=item.get("Name", ""), Data=base64.b64decode(data) if data is not None else None,
                                Comment=item.get("Comment", ""), URL=item.get("URL", ""),
                                Size=int(item.get("Size", 0)))  # fmt: skip
        msg = Message(text=text, channel=channel, username=username, userid=userid, account=account,
                      event=event, protocol=account.split(".")[0], parent_id=parent_id, id=id, Extra=extra)  # fmt: skip
        await self._queue.put(msg)

    def heard(self, account: str) -> list[dict[str, Any]]:
        """What the gateway sent to a network account, as JSON Go would give it."""
        return [to_plain(msg) for msg in self.networks[account].heard]

    def ring(self, account: str) -> int:
        """How many messages an api account's ring holds."""
        return len(self.apis[account].messages.values())

    def streams(self, account: str) -> int:
        """How many /api/stream handlers of an api account still run (in-process
        only: a test waits for a closed stream to be noticed before it says
        what the next stream must get)."""
        return self.apis[account].streams

    async def _start_control(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        app = web.Application()
        app.router.add_post("/say", self._control_say)
        app.router.add_get("/heard", self._control_heard)
        app.router.add_get("/ring", self._control_ring)
        self._control = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._control.setup()
        await web.TCPSite(self._control, host or "127.0.0.1", int(port)).start()

    async def _control_say(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            await self.say(**body)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    async def _control_heard(self, request: web.Request) -> web.Response:
        account = request.query.get("account", "")
        if account not in self.networks:
            return web.json_response({"error": f"{account!r} is not a network account"}, status=400)
        return web.Response(body=marshal(self.networks[account].heard), content_type="application/json")

    async def _control_ring(self, request: web.Request) -> web.Response:
        account = request.query.get("account", "")
        if account not in self.apis:
            return web.json_response({"error": f"{account!r} is not an api account"}, status=400)
        return web.json_response({"size": self.ring(account)})


def load_config(path: str | Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(Path(path).read_text())
    return config
