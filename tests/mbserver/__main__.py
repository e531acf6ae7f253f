"""``python -m tests.mbserver CONFIG.json``: the test Matterbridge as a real
process; prints ``ready`` once every listener is up, runs until SIGTERM or
SIGINT (or SIGKILL)."""

from __future__ import annotations

import asyncio
import signal
import sys

from tests.mbserver.server import MatterbridgeServer, load_config


async def main(path: str) -> None:
    server = MatterbridgeServer(load_config(path))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.mbserver CONFIG.json")
    asyncio.run(main(sys.argv[1]))
