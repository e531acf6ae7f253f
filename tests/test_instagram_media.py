"""Downloads from Instagram and nowhere else (workers/instagram_media.py),
against the fake Instagram and its CDN (tests/instagram_rig.py) over real TLS
through its proxy, which writes down any other host anything asked for."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.instagram_rig import CDN, CDN2, FOREIGN, JPEG, MP4, FakeInstagram, cdn_url
from workers.instagram_media import Refused, TooLarge, Unreachable, download_media, get, refusal


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeInstagram]:
    rig = FakeInstagram(tmp_path_factory.mktemp("fake-instagram")).start()
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture
async def http(fake: FakeInstagram) -> AsyncIterator[httpx.AsyncClient]:
    fake.requests.clear()
    fake.refused.clear()
    async with httpx.AsyncClient(proxy=fake.proxy_url, verify=fake.client_ssl(), follow_redirects=False) as client:
        yield client


async def test_an_image_from_the_cdn(fake: FakeInstagram, http: httpx.AsyncClient) -> None:
    url = cdn_url("pic.jpg")
    fake.add_media(url, JPEG, "image/jpeg")
    got = await download_media(http, url, max_bytes=10_000, deadline=10)
    assert (got.data, got.mime, got.status) == (JPEG, "image/jpeg", 200)
    assert [s.path for s in fake.seen(CDN)] == ["/v/t51/pic.jpg?stp=dst-jpg&oe=7F000000"]
    assert fake.seen(CDN)[0].host == CDN


async def test_a_redirect_within_instagram_is_followed(fake: FakeInstagram, http: httpx.AsyncClient) -> None:
    fake.add_media(f"https://{CDN2}/v/t51/moved.mp4", MP4, "video/mp4")
    got = await download_media(http, f"https://{CDN}/redirect/{CDN2}/v/t51/moved.mp4", max_bytes=10_000, deadline=10)
    assert got.data == MP4 and got.url == f"https://{CDN2}/v/t51/moved.mp4"


@pytest.mark.parametrize(
    "url",
    [
        f"https://{FOREIGN}/x.jpg",
        "https://127.0.0.1/x.jpg",
        "https://[::1]/x.jpg",
        "https://169.254.169.254/latest/meta-data/",
        "https://instagram.com.evil.example/x.jpg",
        "https://notinstagram.com/x.jpg",
        f"http://{CDN}/v/t51/x.jpg",  # not https
        f"https://{CDN}:8443/v/t51/x.jpg",  # another port
        f"https://user:pw@{CDN}/v/t51/x.jpg",
        "file:///etc/passwd",
        "ftp://scontent.cdninstagram.com/x",
        "not a url",
    ],
)
async def test_a_url_outside_instagram_is_refused_before_any_request(
    fake: FakeInstagram, http: httpx.AsyncClient, url: str
) -> None:
    with pytest.raises(Refused):
        await download_media(http, url, max_bytes=10_000, deadline=10)
    assert fake.requests == [] and fake.refused == []  # nothing was even asked of the proxy


async def test_a_redirect_to_a_foreign_host_is_refused(fake: FakeInstagram, http: httpx.AsyncClient) -> None:
    with pytest.raises(Refused, match=r"evil\.example"):
        await download_media(http, f"https://{CDN}/redirect/{FOREIGN}/x.jpg", max_bytes=10_000, deadline=10)
    assert [s.path for s in fake.requests] == [f"/redirect/{FOREIGN}/x.jpg"]
    assert fake.refused == []  # the foreign host was never asked for


async def test_a_redirect_to_plain_http_is_refused(fake: FakeInstagram, http: httpx.AsyncClient) -> None:
    with pytest.raises(Refused, match="not https"):
        await download_media(http, f"https://{CDN}/plain-http-redirect", max_bytes=10_000, deadline=10)
    assert fake.refused == []


async def test_redirect_loops_end(fake: FakeInstagram, http: httpx.AsyncClient) -> None:
    loop = f"https://{CDN}/redirect/{CDN}/redirect/{CDN}/redirect/{CDN}/redirect/{CDN}/v/t51/x.jpg"
    with pytest.raises(Refused, match="redirects"):
        await download_media(http, loop, max_bytes=10_000, deadline=10)
    assert len(fake.requests) == 4  # the first and three redirects, then no more


async def test_oversized_media_is_refused_by_its_length(fake: FakeInstagram, http: httpx.AsyncClient) -> None:
    url = cdn_url("big.mp4", CDN2)
    fake.add_media(url, MP4 + b"\x00" * 50_000, "video/mp4")
    with pytest.raises(TooLarge):
        await download_media(http, url, max_bytes=10_000, deadline=10)
    got = await download_media(http, url, max_bytes=60_000, deadline=10)  # the same file under a larger cap
    assert len(got.data) == len(MP4) + 50_000


async def test_a_body_without_length_stops_at_the_cap(fake: FakeInstagram, http: httpx.AsyncClient) -> None:
    with pytest.raises(TooLarge):
        await download_media(http, f"https://{CDN}/endless", max_bytes=1_000_000, deadline=30)


async def test_the_content_type_must_be_media(fake: FakeInstagram, http: httpx.AsyncClient) -> None:
    url = cdn_url("login.html")
    fake.add_media(url, b"<html>log in</html>", "text/html; charset=utf-8")
    with pytest.raises(Refused, match="text/html"):
        await download_media(http, url, max_bytes=10_000, deadline=10)
    video = cdn_url("clip.mp4")
    fake.add_media(video, MP4, "video/mp4")
    with pytest.raises(Refused, match="video/mp4"):  # a video where an image was expected
        await download_media(http, video, max_bytes=10_000, deadline=10, types=("image/",))


async def test_missing_media_is_unreachable_not_an_exception_of_httpx(
    fake: FakeInstagram, http: httpx.AsyncClient
) -> None:
    with pytest.raises(Unreachable, match="404"):
        await download_media(http, cdn_url("gone.jpg"), max_bytes=10_000, deadline=10)
    fetched = await get(http, cdn_url("gone.jpg"), max_bytes=10_000, deadline=10)
    assert fetched.status == 404  # get() itself answers any status


async def test_a_dead_proxy_is_unreachable(fake: FakeInstagram) -> None:
    from tests.helpers import free_port

    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{free_port()}", verify=fake.client_ssl()) as client:
        with pytest.raises(Unreachable):
            await download_media(client, cdn_url("pic.jpg"), max_bytes=10_000, deadline=5)


labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
suffixes = st.sampled_from(["instagram.com", "cdninstagram.com", "fbcdn.net", "example.com", "instagram.co",
                            "com", "fbcdn.net.evil", "xinstagram.com", "127.0.0.1"])  # fmt: skip


@settings(max_examples=500)
@given(
    scheme=st.sampled_from(["https", "http", "HTTPS", "ftp", "javascript", ""]),
    sub=st.lists(labels, max_size=3),
    suffix=suffixes,
    port=st.sampled_from(["", ":443", ":80", ":8443", ":0", ":99999", ":x"]),
    userinfo=st.sampled_from(["", "u@", "u:p@", "@"]),
    path=st.text(max_size=30),
)
def test_refusal_allows_exactly_instagram_https(scheme, sub, suffix, port, userinfo, path) -> None:  # type: ignore[no-untyped-def]
    host = ".".join([*sub, suffix])
    url = f"{scheme}://{userinfo}{host}{port}/{path}"
    allowed = (
        scheme.lower() == "https"
        and userinfo == ""
        and port in ("", ":443")
        and suffix in ("instagram.com", "cdninstagram.com", "fbcdn.net")
    )
    reason = refusal(url)
    assert (reason is None) == allowed, (url, reason)


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_refusal_never_raises(text: str) -> None:
    assert refusal(text) is None or isinstance(refusal(text), str)


def test_rig_certificate_is_not_trusted_by_default(tmp_path: Path) -> None:
    """The fake is reachable only with its CA: a client without it fails (so the
    tests above prove TLS to the fake, not a bypass)."""
    rig = FakeInstagram(tmp_path).start()
    try:
        with httpx.Client(proxy=rig.proxy_url) as client, pytest.raises(httpx.ConnectError):
            client.get(cdn_url("x.jpg"))
    finally:
        rig.stop()
