"""A fake Instagram on loopback, reached the way the real one is: over HTTPS
through a proxy.

yt-dlp's own extractor (yt_dlp/extractor/instagram.py, unpatched) and the
worker's downloads talk to ``https://www.instagram.com``, ``i.instagram.com``
and the CDN hosts by name. They are pointed at ``FakeInstagram.proxy_url``, a
small CONNECT proxy that opens a tunnel only for those names and only to the
fake's own TLS server, whose certificate (from ``trustme``) names them; any
other CONNECT or plain-HTTP request is refused with 403 and written down in
``refused``, so a test sees that nothing else was ever tried.

The fake answers what the extractor asks, in the shapes it parses:

- ``GET /`` (session set-up): a page with the LSD token in ``__eqmc``;
- ``GET /api/v1/web/get_ruling_for_content/``: ``{"status": "ok"}``, or a
  post's ruling (a deleted or restricted one's title and description);
- ``GET /p/CODE`` (logged out): the post page with its media item in a
  ``data-sjs`` script, as Instagram's prefetched relay cache carries it;
- ``GET /api/v1/media/PK/info/`` (with a ``sessionid`` cookie): ``{"items": [item]}``;
- ``GET /api/v1/users/web_profile_info/?username=U``: a profile;
- CDN paths: the bytes registered with ``add_media`` and a few hostile ones.

Media items follow Instagram's API v1 shape (``image_versions2``,
``video_versions``, ``carousel_media``...): ``image_item``, ``video_item`` and
``carousel_item`` build them. Every request is recorded (``requests``) with
the time it arrived, which the rate-limit tests read.

The servers run on their own event loop in a thread, so the fake serves sync
tests (worker processes) and async ones alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web
from yt_dlp.extractor.instagram import _id_to_pk

WWW = "www.instagram.com"
API_HOST = "i.instagram.com"
CDN = "scontent.cdninstagram.com"
CDN2 = "instagram.fams2-1.fna.fbcdn.net"
HOSTS = (WWW, "instagram.com", API_HOST, CDN, CDN2)
FOREIGN = "evil.example"  # a host the proxy never tunnels to: a fetch of it shows up in ``refused``

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + b"\x00" * 64 + b"\xff\xd9"
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 200


def pk(code: str) -> str:
    return str(_id_to_pk(code))


def cdn_url(name: str, host: str = CDN) -> str:
    return f"https://{host}/v/t51/{name}?stp=dst-jpg&oe=7F000000"


def _user(username: str) -> dict[str, Any]:
    return {"pk": "25025320", "username": username, "full_name": username.title() + " Person", "is_private": False}


def image_item(code: str, *, username: str = "alice", caption: str | None = "a caption", likes: int = 12,
               comments: int = 3, image: str | None = None, small: str | None = None) -> dict[str, Any]:  # fmt: skip
    """An image post; ``image``: the full-size candidate's URL (``small``: a smaller one listed after it)."""
    image = image or cdn_url(f"{code}.jpg")
    candidates = [{"url": image, "width": 1080, "height": 1350}]
    candidates.append({"url": small or cdn_url(f"{code}_s.jpg"), "width": 320, "height": 400})
    item: dict[str, Any] = {
        "pk": pk(code),
        "id": f"{pk(code)}_25025320",
        "code": code,
        "media_type": 1,
        "taken_at": 1_700_000_000,
        "user": _user(username),
        "like_count": likes,
        "comment_count": comments,
        "image_versions2": {"candidates": candidates},
        "original_width": 1080,
        "original_height": 1350,
    }
    if caption is not None:
        item["caption"] = {"text": caption}
    return item


def video_item(code: str, *, username: str = "alice", caption: str | None = "a reel", likes: int = 1500,
               comments: int = 42, duration: float = 15.5, video: str | None = None,
               thumbnail: str | None = None) -> dict[str, Any]:  # fmt: skip
    item = image_item(code, username=username, caption=caption, likes=likes, comments=comments,
                      image=thumbnail or cdn_url(f"{code}_thumb.jpg"))  # fmt: skip
    item["media_type"] = 2
    item["video_duration"] = duration
    item["has_audio"] = True
    item["video_versions"] = [
        {"type": 101, "id": "1", "url": video or cdn_url(f"{code}.mp4", CDN2), "width": 720, "height": 1280},
        {"type": 102, "id": "2", "url": cdn_url(f"{code}_low.mp4", CDN2), "width": 480, "height": 854},
    ]
    return item


def carousel_item(code: str, children: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """A post of several images or videos, in order; ``children`` are items
    (their user and caption are the post's, as Instagram sends them)."""
    item = image_item(code, **kwargs)
    item["media_type"] = 8
    del item["image_versions2"]
    item["carousel_media"] = [
        {k: v for k, v in child.items() if k not in ("user", "caption", "like_count", "comment_count")}
        for child in children
    ]
    return item


def profile_json(
    username: str,
    *,
    followers: int = 1234,
    following: int = 56,
    posts: tuple[str, ...] = (),
    bio: str = "photos of things",
    private: bool = False,
    picture: str | None = None,
) -> dict[str, Any]:
    return {
        "data": {
            "user": {
                "id": "25025320",
                "username": username,
                "full_name": username.title() + " Person",
                "biography": bio,
                "is_private": private,
                "is_verified": False,
                "external_url": None,
                "profile_pic_url": picture or cdn_url(f"{username}_pic_s.jpg"),
                "profile_pic_url_hd": picture or cdn_url(f"{username}_pic.jpg"),
                "edge_followed_by": {"count": followers},
                "edge_follow": {"count": following},
                "edge_owner_to_timeline_media": {
                    "count": len(posts) + 100,
                    "edges": [
                        {
                            "node": {
                                "shortcode": code,
                                "is_video": False,
                                "display_url": cdn_url(f"{code}.jpg"),
                                "edge_media_to_caption": {"edges": [{"node": {"text": f"post {code}"}}]},
                                "taken_at_timestamp": 1_700_000_000,
                            }
                        }
                        for code in posts
                    ],
                },
            }
        },
        "status": "ok",
    }


@dataclass
class Seen:
    host: str
    method: str
    path: str  # with the query
    at: float  # time.time() on arrival
    cookie: str = ""


@dataclass
class Post:
    item: dict[str, Any] | None  # None: the page is a 404 (deleted)
    ruling: dict[str, Any] = field(default_factory=lambda: {"status": "ok"})


def post_page(item: dict[str, Any]) -> str:
    """The logged-out post page: the media item in Instagram's relay cache,
    in a ``data-sjs`` script (one line: yt-dlp's pattern does not cross lines)."""
    cache = ["RelayPrefetchedStreamCache", "next", [], [
        "adp_PolarisPostRootQueryRelayPreloader_0",
        {"__bbox": {"complete": True, "result": {"data": {"xig_polaris_media": {"if_not_gated_logged_out": item}}}}},
    ]]  # fmt: skip
    sjs = {"require": [["ScheduledServerJS", "handle", None, [{"__bbox": {"require": [cache]}}]]]}
    data = json.dumps(sjs, separators=(",", ":")).replace("</", "<\\/")
    script = f'<script type="application/json" data-sjs>{data}</script>'
    return f"<!DOCTYPE html><html><head><title>Instagram</title></head><body>{script}</body></html>"


HOME = (
    "<!DOCTYPE html><html><head><title>Instagram</title>"
    '<script type="application/json" id="__eqmc">{"l":"fake-lsd-token","u":"/"}</script></head><body></body></html>'
)


class FakeInstagram:
    def __init__(self, workdir: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = workdir / "fake-instagram-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*HOSTS).configure_cert(self._server_ssl)
        self.posts: dict[str, Post] = {}
        self.profiles: dict[str, dict[str, Any]] = {}
        self.media: dict[str, tuple[bytes, str]] = {}  # CDN path -> (body, content type)
        self.requests: list[Seen] = []
        self.refused: list[str] = []  # proxy requests refused: "CONNECT host:port" or "GET http://..."
        # "ok"; "rate_limited": every www answer is 429; "login_wall": post pages
        # redirect to the login page (Instagram's anonymous rate limit); "broken": 500s
        self.mode = "ok"
        self._holds: dict[str, asyncio.Event] = {}
        self._tunnels: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self.proxy_port = 0
        self._tls_port = 0

    # set-up --------------------------------------------------------------------
    def add_post(self, item: dict[str, Any], ruling: dict[str, Any] | None = None) -> str:
        code = item["code"]
        self.posts[code] = Post(item, ruling or {"status": "ok"})
        self._add_item_media(item)
        return code

    def _add_item_media(self, item: dict[str, Any]) -> None:
        for child in item.get("carousel_media", [item]):
            for cand in child.get("image_versions2", {}).get("candidates", []):
                self.add_media(cand["url"], JPEG, "image/jpeg")
            for version in child.get("video_versions", []):
                self.add_media(version["url"], MP4, "video/mp4")

    def add_media(self, url: str, body: bytes, content_type: str) -> None:
        self.media[_cdn_key(url)] = (body, content_type)

    def hold(self, path: str) -> None:
        """Requests for ``path`` (no query) wait until ``release(path)``: a job caught mid-fetch."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._holds.setdefault, path, asyncio.Event())

    def release(self, path: str) -> None:
        assert self._loop is not None

        def free() -> None:
            self._holds.setdefault(path, asyncio.Event()).set()

        self._loop.call_soon_threadsafe(free)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def worker_env(self) -> dict[str, str]:
        """The environment that sends a worker process's Instagram traffic here."""
        return {"HTTPS_PROXY": self.proxy_url, "SSL_CERT_FILE": str(self.ca_file), "NO_PROXY": "127.0.0.1,localhost"}

    def seen(self, host: str | None = None, path_prefix: str = "") -> list[Seen]:
        return [s for s in list(self.requests) if (host is None or s.host == host) and s.path.startswith(path_prefix)]

    def extractions(self) -> list[Seen]:
        """yt-dlp's session set-ups (``GET /`` on www): one per extraction started."""
        return [s for s in self.seen(WWW) if s.path == "/"]

    # running -------------------------------------------------------------------
    def start(self) -> FakeInstagram:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-instagram", daemon=True)
        self._thread.start()
        if not ready.wait(15) or failure:
            raise RuntimeError(f"fake Instagram did not start: {failure}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(15)

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._server_ssl)
        await site.start()
        self._tls_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        proxy = await asyncio.start_server(self._proxy, "127.0.0.1", 0)
        self.proxy_port = proxy.sockets[0].getsockname()[1]
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            for event in self._holds.values():
                event.set()
            proxy.close()
            # open tunnels (clients keep connections alive) end with the rig
            tunnels = list(self._tunnels)
            for task in tunnels:
                task.cancel()
            await asyncio.gather(*tunnels, return_exceptions=True)
            await runner.cleanup()

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tunnels.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = request_line.split(" ", 2)
            host = target.rsplit(":", 1)[0] if method == "CONNECT" else ""
            if method != "CONNECT" or host not in HOSTS or not target.endswith(":443"):
                self.refused.append(f"{method} {target}")
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._tls_port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # the rig stops
        finally:
            self._tunnels.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # the fake's answers ----------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        host = request.host.split(":", 1)[0]
        self.requests.append(
            Seen(host, request.method, request.path_qs, time.time(), request.headers.get("Cookie", ""))
        )
        hold = self._holds.get(request.path)
        if hold is not None:
            await hold.wait()
        if host in (CDN, CDN2):
            return await self._cdn(request)
        if host == API_HOST or request.path.startswith("/api/v1/users/web_profile_info"):
            return self._profile(request)
        if self.mode == "rate_limited":
            return web.json_response(
                {"message": "Please wait a few minutes before you try again.", "require_login": True, "status": "fail"},
                status=429,
            )
        if self.mode == "broken":
            return web.Response(status=500, text="<html>Something went wrong</html>", content_type="text/html")
        path = request.path
        if path == "/":
            cookie = "csrftoken=fakecsrf; Path=/; Domain=.instagram.com"
            return web.Response(text=HOME, content_type="text/html", headers={"Set-Cookie": cookie})
        if path.startswith("/accounts/login"):
            return web.Response(text="<html><title>Login • Instagram</title></html>", content_type="text/html")
        if path == "/api/v1/web/get_ruling_for_content/":
            code = self._code_of_pk(request.query.get("target_id", ""))
            post = self.posts.get(code or "")
            return web.json_response(post.ruling if post else {"status": "ok"})
        if path.startswith("/api/v1/media/") and path.endswith("/info/"):
            if "sessionid=" not in request.headers.get("Cookie", ""):
                raise web.HTTPFound("https://www.instagram.com/accounts/login/")
            code = self._code_of_pk(path.split("/")[4])
            post = self.posts.get(code or "")
            if post is None or post.item is None:
                return web.json_response({"message": "Media not found or unavailable", "status": "fail"}, status=400)
            return web.json_response({"items": [post.item], "num_results": 1, "status": "ok"})
        if path.startswith("/p/"):
            if self.mode == "login_wall":
                raise web.HTTPFound(f"https://www.instagram.com/accounts/login/?next={path}")
            code = path.split("/")[2]
            post = self.posts.get(code)
            if post is None or post.item is None:
                return web.Response(status=404, text="<html>Page Not Found</html>", content_type="text/html")
            return web.Response(text=post_page(post.item), content_type="text/html")
        return web.Response(status=404, text="not here")

    def _code_of_pk(self, value: str) -> str | None:
        return next((code for code in self.posts if pk(code) == value), None)

    def _profile(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "rate_limited":
            return web.json_response({"message": "Please wait a few minutes before you try again.",
                                      "require_login": True, "status": "fail"}, status=429)  # fmt: skip
        if request.headers.get("X-IG-App-ID") != "936619743392459":
            return web.json_response({"message": "useragent mismatch", "status": "fail"}, status=400)
        username = request.query.get("username", "")
        profile = self.profiles.get(username)
        if profile is None:
            return web.json_response({"data": {"user": None}, "status": "ok"}, status=404)
        return web.json_response(profile)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/redirect/"):  # /redirect/<host>/<rest>: a 302 to https://<host>/<rest>
            _, _, target_host, rest = path.split("/", 3)
            raise web.HTTPFound(f"https://{target_host}/{rest}")
        if path == "/plain-http-redirect":
            raise web.HTTPFound(f"http://{CDN}/v/t51/x.jpg")
        if path == "/endless":  # chunked, no length, never ends by itself: the cap must stop it
            resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
            await resp.prepare(request)
            chunk = b"\x00" * 65536
            with contextlib.suppress(ConnectionError):
                for _ in range(100_000):
                    await resp.write(chunk)
            return resp
        found = self.media.get(f"{request.host.split(':', 1)[0]}{path}")
        if found is None:
            return web.Response(status=404, text="no such media")
        body, content_type = found
        return web.Response(body=body, headers={"Content-Type": content_type})


def _cdn_key(url: str) -> str:
    rest = url.split("://", 1)[1]
    return rest.split("?", 1)[0]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
