"""``talkbridge matrix-register --config FILE NAME --registration-token env:VAR``

Creates the account ``[matrix.NAME]`` names (``Login`` + ``Password``) on a
homeserver that only lets users register with a registration token
(conduwuit, seeds 001 and 004; Synapse with ``registration_requires_token``)
through the ``m.login.registration_token`` flow, and stores the new device
and access token in Redis where the daemon restores them: its first start
logs in no more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TextIO

from nio import AsyncClient, AsyncClientConfig, RegisterResponse

from bridge.adapter import CliCommand
from bridge.config import Config, ConfigError
from bridge.connections import redis_for  # the CLI's Redis (the embedded one when no URL is set)
from bridge.keys import account_key

PROTOCOL = "matrix"


def secret(value: str, what: str) -> str:
    """``env:NAME``, ``file:PATH`` or the value itself."""
    if value.startswith("env:"):
        name = value[4:]
        if not name or name not in os.environ:
            raise ConfigError([f"{what}: environment variable {name or '(none)'} is not set"])
        return os.environ[name]
    if value.startswith("file:"):
        try:
            return Path(value[5:]).expanduser().read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError([f"{what}: cannot read {value[5:]}: {exc.strerror or exc}"]) from None
    return value


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("account", help=f"the account: NAME or {PROTOCOL}.NAME")
    parser.add_argument(
        "--registration-token", required=True, help="env:VAR or file:PATH holding the homeserver's registration token"
    )


def run(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    name = args.account if "." in args.account else f"{PROTOCOL}.{args.account}"
    account = config.accounts.get(name)
    if account is None or account.protocol != PROTOCOL:
        known = ", ".join(n for n, a in config.accounts.items() if a.protocol == PROTOCOL) or "none"
        raise ConfigError([f'matrix-register: no {PROTOCOL} account "{args.account}" (configured: {known})'])
    if not account.get("Login") or not account.get("Password"):
        raise ConfigError([f"{name}: matrix-register needs Login and Password (the account to create)"])
    token = secret(args.registration_token, "--registration-token")
    if not token:
        raise ConfigError(["--registration-token: empty"])
    return asyncio.run(_register(config, name, token, out))


async def _register(config: Config, name: str, token: str, out: TextIO) -> int:
    account = config.accounts[name]
    server = str(account.get("Server")).rstrip("/")
    login, password = str(account.get("Login")), str(account.get("Password"))
    client = AsyncClient(server, login, config=AsyncClientConfig(max_limit_exceeded=0, max_timeouts=0))
    try:
        resp = await client.register_with_token(login, password, token, device_name="talkbridge")
    except OSError as exc:
        print(f"matrix-register: {server} unreachable: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    if not isinstance(resp, RegisterResponse):
        print(f"matrix-register: the homeserver refused: {resp.status_code} {resp.message}", file=sys.stderr)
        return 1
    prefix = config.redis.key_prefix
    async with redis_for(config, start=False) as redis:
        await redis.hset(
            account_key(prefix, name, "matrix-session"),
            mapping={"user_id": resp.user_id, "device_id": resp.device_id, "access_token": resp.access_token,
                     "login": login, "server": server},
        )  # fmt: skip
    print(f"registered {resp.user_id} (device {resp.device_id}); its token is stored for {name}", file=out)
    return 0


COMMAND = CliCommand(
    "matrix-register",
    "create a Matrix account with a registration token (m.login.registration_token) and store its token",
    _arguments,
    run,
)
