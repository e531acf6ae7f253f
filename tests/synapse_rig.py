"""A real Synapse homeserver (from PyPI, ``matrix-synapse``) for the tests.

``SynapseServer`` writes a config into a directory (sqlite, one plain HTTP
listener on a loopback port, a registration shared secret, rate limits
raised unless ``default_limits``, media under the directory, authenticated
media on, no federation, no stats), starts ``python -m
synapse.app.homeserver`` as a child process and waits until
``/_matrix/client/versions`` answers (a deadline, not a sleep). Users are
registered through the shared-secret admin API. ``stop``/``start`` restart
the same server (same port, same database): a homeserver restart.

``MatrixUser`` is a minimal synchronous client for the tests' own side of a
room (httpx, no nio: the tests check the adapter against the wire, not
against the library it uses).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from tests.helpers import free_port, wait_for

SERVER_NAME = "test.local"
SHARED_SECRET = "talkbridge-test-shared-secret"

_RAISED = """
rc_message: {per_second: 10000, burst_count: 10000}
rc_registration: {per_second: 10000, burst_count: 10000}
rc_login:
  address: {per_second: 10000, burst_count: 10000}
  account: {per_second: 10000, burst_count: 10000}
  failed_attempts: {per_second: 10000, burst_count: 10000}
rc_joins:
  local: {per_second: 10000, burst_count: 10000}
  remote: {per_second: 10000, burst_count: 10000}
rc_joins_per_room: {per_second: 10000, burst_count: 10000}
rc_invites:
  per_room: {per_second: 10000, burst_count: 10000}
  per_user: {per_second: 10000, burst_count: 10000}
  per_issuer: {per_second: 10000, burst_count: 10000}
rc_admin_redaction: {per_second: 10000, burst_count: 10000}
rc_media_create: {per_second: 10000, burst_count: 10000}
rc_presence:
  per_user: {per_second: 10000, burst_count: 10000}
rc_delayed_event_mgmt: {per_second: 10000, burst_count: 10000}
rc_reports: {per_second: 10000, burst_count: 10000}
"""


def _config(directory: Path, port: int, default_limits: bool) -> str:
    return f"""
server_name: "{SERVER_NAME}"
public_baseurl: "http://127.0.0.1:{port}/"
pid_file: "{directory}/homeserver.pid"
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: "{directory}/homeserver.db"
media_store_path: "{directory}/media"
max_upload_size: 50M
enable_authenticated_media: true
registration_shared_secret: "{SHARED_SECRET}"
enable_registration: true
registration_requires_token: true
report_stats: false
macaroon_secret_key: "{secrets.token_hex(16)}"
form_secret: "{secrets.token_hex(16)}"
signing_key_path: "{directory}/signing.key"
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
presence:
  enabled: false
url_preview_enabled: false
enable_metrics: false
""" + ("" if default_limits else _RAISED)


@dataclass
class MatrixUser:
    """A test user: the tests' own Matrix client, over plain HTTP."""

    server: str
    user_id: str
    access_token: str
    device_id: str
    _txn: int = 0
    _client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
             ok: tuple[int, ...] = (200,)) -> Any:  # fmt: skip
        resp = self._client.request(
            method, self.server + path, json=body, params=params,
            headers={"Authorization": f"Bearer {self.access_token}"},
        )  # fmt: skip
        if resp.status_code not in ok:
            raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:300]}")
        return resp.json()

    def next_txn(self) -> str:
        self._txn += 1
        return f"t{time.time_ns()}.{self._txn}"

    def create_room(self, invite: list[str] = (), name: str = "room", encrypted: bool = False,
                    alias: str | None = None) -> str:  # fmt: skip
        body: dict[str, Any] = {"name": name, "invite": list(invite), "preset": "private_chat"}
        if alias:
            body["room_alias_name"] = alias
        if encrypted:
            body["initial_state"] = [
                {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
            ]
        return self.call("POST", "/_matrix/client/v3/createRoom", body)["room_id"]

    def invite(self, room: str, user_id: str) -> None:
        self.call("POST", f"/_matrix/client/v3/rooms/{quote(room)}/invite", {"user_id": user_id})

    def join(self, room: str) -> None:
        self.call("POST", f"/_matrix/client/v3/join/{quote(room)}", {})

    def send(self, room: str, content: dict[str, Any], etype: str = "m.room.message") -> str:
        path = f"/_matrix/client/v3/rooms/{quote(room)}/send/{etype}/{self.next_txn()}"
        return self.call("PUT", path, content)["event_id"]

    def text(self, room: str, body: str, **extra: Any) -> str:
        return self.send(room, {"msgtype": "m.text", "body": body, **extra})

    def redact(self, room: str, event_id: str) -> str:
        path = f"/_matrix/client/v3/rooms/{quote(room)}/redact/{quote(event_id)}/{self.next_txn()}"
        return self.call("PUT", path, {})["event_id"]

    def upload(self, data: bytes, mime: str, name: str) -> str:
        resp = self._client.post(
            self.server + "/_matrix/media/v3/upload", content=data, params={"filename": name},
            headers={"Authorization": f"Bearer {self.access_token}", "Content-Type": mime},
        )  # fmt: skip
        resp.raise_for_status()
        return resp.json()["content_uri"]

    def download(self, mxc: str) -> bytes:
        server, media_id = mxc.removeprefix("mxc://").split("/", 1)
        resp = self._client.get(
            f"{self.server}/_matrix/client/v1/media/download/{server}/{media_id}",
            headers={"Authorization": f"Bearer {self.access_token}"},
        )
        resp.raise_for_status()
        return resp.content

    def messages(self, room: str, limit: int = 200) -> list[dict[str, Any]]:
        """The room's events, oldest first (message-like ones; state events left out)."""
        chunk = self.call(
            "GET", f"/_matrix/client/v3/rooms/{quote(room)}/messages", params={"dir": "b", "limit": limit}
        )["chunk"]
        return [e for e in reversed(chunk) if "state_key" not in e]

    def from_user(self, room: str, user_id: str, etype: str = "m.room.message") -> list[dict[str, Any]]:
        return [e for e in self.messages(room) if e.get("sender") == user_id and e.get("type") == etype]

    def close(self) -> None:
        self._client.close()


class SynapseServer:
    def __init__(self, directory: Path, default_limits: bool = False) -> None:
        self.dir = directory
        self.port = free_port()
        self.default_limits = default_limits
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = directory / "homeserver.yaml"
        self.log_path = directory / "synapse.log"
        self._admin: MatrixUser | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(_config(directory, self.port, default_limits))
        seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
        (directory / "signing.key").write_text(f"ed25519 a_test {seed}\n")
        (directory / "media").mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> SynapseServer:
        log = open(self.log_path, "ab")  # the child inherits it; ours is closed below
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config)],
            cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_for(self._up, timeout=timeout, interval=0.1, what="synapse /_matrix/client/versions")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"synapse exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return httpx.get(self.url + "/_matrix/client/versions", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def register(self, localpart: str, password: str | None = None, admin: bool = False) -> MatrixUser:
        """A new user through the shared-secret admin API."""
        password = password or secrets.token_hex(8)
        path = self.url + "/_synapse/admin/v1/register"
        nonce = httpx.get(path, timeout=10).json()["nonce"]
        mac = hmac.new(SHARED_SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))  # fmt: skip
        body = {"nonce": nonce, "username": localpart, "password": password, "admin": admin, "mac": mac.hexdigest()}
        resp = httpx.post(path, json=body, timeout=30)
        if resp.status_code != 200:
            raise RuntimeError(f"register {localpart}: {resp.status_code} {resp.text}")
        data = resp.json()
        return MatrixUser(self.url, data["user_id"], data["access_token"], data["device_id"])

    @property
    def admin(self) -> MatrixUser:
        if self._admin is None:
            self._admin = self.register(f"admin{secrets.token_hex(3)}", admin=True)
        return self._admin

    def registration_token(self) -> str:
        return self.admin.call("POST", "/_synapse/admin/v1/registration_tokens/new", {"uses_allowed": 1})["token"]

    def devices(self, user: str) -> list[dict[str, Any]]:
        return self.admin.call("GET", f"/_synapse/admin/v2/users/{quote(user)}/devices")["devices"]

    def revoke(self, user: str, device_id: str) -> None:
        """Delete a device: its access token is revoked (M_UNKNOWN_TOKEN from then on)."""
        self.admin.call("DELETE", f"/_synapse/admin/v2/users/{quote(user)}/devices/{quote(device_id)}")


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"
