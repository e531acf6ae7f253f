"""Files as Talk users see them: WebDAV and room shares.

- ``/remote.php/dav/files/{user}/{path}`` (Sabre): ``PUT`` creates (201) or
  overwrites (204) a file whose parent folder exists (else 409); ``GET`` 200
  or 404; ``MKCOL`` 201, 405 when it exists, 409 without its parent. Only the
  authenticated user's own tree (another user's: 403). Answers carry
  ``OC-FileId`` and ``ETag``.
- ``POST /ocs/v2.php/apps/files_sharing/api/v1/shares`` with ``shareType=10``
  (a Talk room), ``shareWith`` = the token, ``path``, ``talkMetaData`` (JSON:
  ``messageType``, ``caption``, ``replyTo``, ``silent``) and ``referenceId``
  (files_sharing's ShareAPIController, Talk's RoomShareProvider and
  Chat/SystemMessage/Listener): a path that is not there -> 404, not a
  participant -> 404, already shared with the room -> 403; otherwise 200 and a
  chat message by the sharer: ``{file}`` (or the caption, from Talk 18's
  ``media-caption``) with a ``file`` parameter. Every participant who is a
  user gets the file mounted at ``Talk/NAME`` in their own home (``NAME (2)``
  when that is taken), which is the ``path`` their chat shows.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiohttp import web

from tests.talkserver.chat import ChatError
from tests.talkserver.ocs import csrf_ok, ocs_response, params, php_int, php_string
from tests.talkserver.state import Actor, Message

if TYPE_CHECKING:
    from tests.talkserver.server import TalkServer

DAV = "/remote.php/dav/files/{user}/{path:.*}"
SHARES = "/ocs/v2.php/apps/files_sharing/api/v1/shares"
SHARE_TYPE_ROOM = 10


@dataclass
class Node:
    id: int
    owner: str
    data: bytes
    mime: str

    @property
    def etag(self) -> str:
        return hashlib.md5(self.data).hexdigest()


@dataclass
class Share:
    id: int
    node: Node
    owner: str
    path: str  # in the owner's home
    token: str
    deleted: bool = False
    mounts: dict[str, str] = field(default_factory=dict)  # user -> path of the file in their home


class Files:
    def __init__(self, server: TalkServer) -> None:
        self.server = server
        self.state = server.state
        self.tree: dict[str, dict[str, Node | None]] = {}  # user -> path -> node (None: a folder)
        self.shares: list[Share] = []
        self._next_id = 1000

    # the Python API ----------------------------------------------------------------
    def home(self, user: str) -> dict[str, Node | None]:
        return self.tree.setdefault(user, {"": None})

    def put(self, user: str, path: str, data: bytes) -> tuple[Node, bool]:
        home = self.home(user)
        existing = home.get(path)
        if isinstance(existing, Node):
            existing.data = data
            return existing, False
        node = Node(self._next_id, user, data, mimetypes.guess_type(path)[0] or "application/octet-stream")
        self._next_id += 1
        home[path] = node
        return node, True

    def mkdirs(self, user: str, path: str) -> None:
        home = self.home(user)
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            home.setdefault("/".join(parts[:i]), None)

    def read(self, user: str, path: str) -> bytes | None:
        node = self.home(user).get(path.strip("/"))
        return node.data if isinstance(node, Node) else None

    async def share(
        self,
        actor: Actor,
        path: str,
        token: str,
        meta: dict[str, Any] | None = None,
        reference_id: str = "",
    ) -> Message:
        """Share ``path`` (in ``actor``'s home) into room ``token``: the chat message."""
        node = self.home(actor.id).get(path.strip("/"))
        if not isinstance(node, Node):
            raise ChatError("not_found")
        if any(s.node is node and s.token == token and not s.deleted for s in self.shares):
            raise ChatError("exists")
        share = Share(self._next_id, node, actor.id, path.strip("/"), token)
        self._next_id += 1
        share.mounts[actor.id] = share.path
        name = share.path.rsplit("/", 1)[-1]
        for _ref, member in self.state.rooms[token].participants.items():
            if member.type == "users" and member.id != actor.id:
                share.mounts[member.id] = self._mount(member.id, name, node)
        self.shares.append(share)
        meta = meta or {}
        caption = meta.get("caption") if self.state.version >= 18 else None
        text = caption if isinstance(caption, str) and caption.strip() else "{file}"
        reply_to = php_int(meta.get("replyTo", 0))
        parent = self.state.parent_in_room(token, reply_to) if reply_to else None
        if parent is not None and not parent.replyable:
            parent = None
        msg = self.state.add_message(
            token, actor, text, {}, reference_id=reference_id or None,
            parent_id=parent.id if parent is not None else None, silent=bool(meta.get("silent")),
        )  # fmt: skip
        msg.share = share
        kind = meta.get("messageType")
        msg.meta_type = kind if kind in ("voice-message", "record-audio", "record-video") else ""
        return msg

    def _mount(self, user: str, name: str, node: Node) -> str:
        home = self.home(user)
        home.setdefault("Talk", None)
        stem, dot, ext = name.rpartition(".")
        if not dot:
            stem, ext = name, ""
        candidate, n = f"Talk/{name}", 2
        while candidate in home:
            candidate = f"Talk/{stem} ({n}){'.' + ext if ext else ''}"
            n += 1
        home[candidate] = node
        return candidate

    def parameter(self, share: Share, reader: str) -> dict[str, Any]:
        """The ``file`` rich object (FilesystemHelper / Share\\RoomShareProvider) for ``reader``."""
        node = share.node
        path = share.mounts.get(reader, share.path)
        return {
            "type": "file",
            "id": str(node.id),
            "name": path.rsplit("/", 1)[-1],
            "size": len(node.data),
            "path": path,
            "link": f"{self.server.url}/index.php/f/{node.id}",
            "etag": node.etag,
            "permissions": 27,
            "mimetype": node.mime,
            "preview-available": "yes" if node.mime.startswith("image/") else "no",
        }

    # WebDAV --------------------------------------------------------------------------
    async def dav(self, request: web.Request) -> web.StreamResponse:
        log = self.server.log_request(request, b"")
        resp = await self._dav(request)
        log.status = resp.status
        return resp

    async def _dav(self, request: web.Request) -> web.StreamResponse:
        fault = self.server.take_fault(request)
        if fault is not None:
            return fault
        who = await self.server.authenticate(request)
        if isinstance(who, web.Response):
            return who
        user = request.match_info["user"]
        if who.user is None or who.user != user:
            return web.Response(status=403, text="Sabre\\DAV\\Exception\\Forbidden")
        path = unquote(request.match_info["path"]).strip("/")
        home = self.home(user)
        if request.method == "GET":
            node = home.get(path)
            if not isinstance(node, Node):
                return web.Response(status=404, text="Sabre\\DAV\\Exception\\NotFound")
            return web.Response(body=node.data, content_type=node.mime, headers={"ETag": f'"{node.etag}"'})
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent not in home:
            await request.read()
            return web.Response(status=409, text="Sabre\\DAV\\Exception\\Conflict")
        if request.method == "MKCOL":
            if path in home:
                return web.Response(status=405, text="Sabre\\DAV\\Exception\\MethodNotAllowed")
            home[path] = None
            return web.Response(status=201)
        if request.method == "PUT":
            if path in home and home[path] is None:
                return web.Response(status=409, text="Sabre\\DAV\\Exception\\Conflict: a folder")
            node, created = self.put(user, path, await request.read())
            headers = {"OC-FileId": f"{node.id:08d}ocinstance", "ETag": f'"{node.etag}"'}
            return web.Response(status=201 if created else 204, headers=headers)
        return web.Response(status=405)

    # shares -------------------------------------------------------------------------
    async def create_share(self, request: web.Request) -> web.Response:
        log = self.server.log_request(request, await request.read())
        resp = await self._create_share(request)
        log.status = resp.status
        return resp

    async def _create_share(self, request: web.Request) -> web.Response:
        if not csrf_ok(request):
            return ocs_response(request, 412, None, "CSRF check failed")
        fault = self.server.take_fault(request)
        if fault is not None:
            return fault
        who = await self.server.authenticate(request)
        if isinstance(who, web.Response):
            return who
        if who.user is None:
            return ocs_response(request, 401, None, "Current user is not logged in")
        p = await params(request)
        if php_int(p.get("shareType", -1)) != SHARE_TYPE_ROOM:
            return ocs_response(request, 400, None, "Unknown share type")
        path = php_string(p.get("path")) or ""
        token = php_string(p.get("shareWith")) or ""
        raw_meta = php_string(p.get("talkMetaData", "")) or ""
        try:
            meta = json.loads(raw_meta) if raw_meta else {}
        except ValueError:
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        room = self.state.rooms.get(token)
        actor = room.participants.get(f"users/{who.user}") if room is not None else None
        if actor is None:
            return ocs_response(request, 404, None, "Wrong share ID, share does not exist")
        try:
            msg = await self.share(actor, path, token, meta, php_string(p.get("referenceId", "")) or "")
        except ChatError as exc:
            if exc.kind == "exists":
                return ocs_response(request, 403, None, "Path is already shared with this room")
            return ocs_response(request, 404, None, "Wrong path, file/folder does not exist")
        share = msg.share
        return ocs_response(
            request,
            200,
            {"id": str(share.id), "share_type": SHARE_TYPE_ROOM, "share_with": token, "path": "/" + share.path,
             "item_source": share.node.id, "file_target": "/" + share.path.rsplit("/", 1)[-1]},
        )  # fmt: skip


def routes(files: Files) -> list[web.RouteDef]:
    return [
        web.route("GET", DAV, files.dav),
        web.route("PUT", DAV, files.dav),
        web.route("MKCOL", DAV, files.dav),
        web.post(SHARES, files.create_share),
    ]
