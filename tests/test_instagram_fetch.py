"""Reading posts, reels, IGTV, carousels and profiles (workers/instagram_fetch.py)
with yt-dlp's own Instagram extractor, unpatched, against the fake Instagram
(tests/instagram_rig.py): the requests it makes, the shapes it parses, and
how its errors are classified."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.instagram_rig import (
    API_HOST,
    CDN2,
    WWW,
    FakeInstagram,
    carousel_item,
    cdn_url,
    image_item,
    pk,
    profile_json,
    video_item,
)
from workers.instagram_fetch import Fetcher, FetchError, classify
from workers.instagram_urls import Target

LOG = logging.getLogger("test.instagram")


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeInstagram]:
    rig = FakeInstagram(tmp_path_factory.mktemp("fake-instagram")).start()
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture
async def fetcher(fake: FakeInstagram, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fetcher]:
    """A Fetcher whose yt-dlp and httpx reach the fake: the proxy and CA from the
    environment, as a deployment behind an egress proxy sets them."""
    for name, value in fake.worker_env().items():
        monkeypatch.setenv(name, value)
    fake.requests.clear()
    fake.mode = "ok"
    async with httpx.AsyncClient(proxy=fake.proxy_url, verify=fake.client_ssl(), follow_redirects=False) as http:
        yield Fetcher(http, timeout=10, max_media=10, log=LOG)


async def test_an_image_post(fake: FakeInstagram, fetcher: Fetcher) -> None:
    code = fake.add_post(image_item("ImgPost001", username="alice", caption="sunset 🌅", likes=1234, comments=56))
    preview = await fetcher.media_preview(Target("post", code))
    assert (preview.kind, preview.ident, preview.link) == ("post", code, f"https://www.instagram.com/p/{code}/")
    assert (preview.author, preview.author_name, preview.caption) == ("alice", "Alice Person", "sunset 🌅")
    assert (preview.likes, preview.comments, preview.duration) == (1234, 56, None)
    [media] = preview.media
    assert (media.kind, media.url) == ("image", cdn_url(f"{code}.jpg"))  # the largest candidate
    # yt-dlp's own logged-out path: session set-up, the ruling, the post page
    paths = [s.path.split("?")[0] for s in fake.seen(WWW)]
    assert paths == ["/", "/api/v1/web/get_ruling_for_content/", f"/p/{code}"]
    assert f"target_id={pk(code)}" in fake.seen(WWW)[1].path
    assert fake.refused == []


async def test_a_reel_and_an_igtv_video(fake: FakeInstagram, fetcher: Fetcher) -> None:
    code = fake.add_post(video_item("ReelVideo01", username="bob", caption=None, likes=1_500_000, duration=42.0))
    for kind in ("reel", "tv"):
        preview = await fetcher.media_preview(Target(kind, code))  # type: ignore[arg-type]
        assert preview.kind == kind and preview.author == "bob" and preview.caption is None
        assert (preview.likes, preview.duration) == (1_500_000, 42.0)
        [media] = preview.media
        assert media.kind == "video" and media.url == cdn_url(f"{code}.mp4", CDN2)  # the best version
        assert media.thumbnail == cdn_url(f"{code}_thumb.jpg") and (media.width, media.height) == (720, 1280)


async def test_a_carousel_in_order(fake: FakeInstagram, fetcher: Fetcher) -> None:
    children = [image_item("CarChild1"), video_item("CarChild2"), image_item("CarChild3")]
    code = fake.add_post(carousel_item("Carousel01", children, caption="three things"))
    preview = await fetcher.media_preview(Target("post", code))
    assert [m.kind for m in preview.media] == ["image", "video", "image"]
    assert [m.url for m in preview.media] == [
        cdn_url("CarChild1.jpg"),
        cdn_url("CarChild2.mp4", CDN2),
        cdn_url("CarChild3.jpg"),
    ]
    assert preview.caption == "three things" and preview.likes == 12 and preview.duration is None
    fewer = Fetcher(fetcher.http, timeout=10, max_media=2, log=LOG)  # MaxImages
    assert len((await fewer.media_preview(Target("post", code))).media) == 2


@pytest.mark.parametrize(
    ("setup", "kind", "blocks"),
    [
        ("private", "private", False),
        ("deleted", "not_found", False),
        ("restricted", "restricted", False),
        ("login_wall", "rate_limited", True),
        ("rate_limited", "rate_limited", True),
    ],
)
async def test_errors(fake: FakeInstagram, fetcher: Fetcher, setup: str, kind: str, blocks: bool) -> None:
    code = "ErrPost0001"
    if setup == "private":
        code = "PrivPost001" + "x" * 28  # a private post's shortcode: 28 characters longer
    elif setup == "restricted":
        fake.add_post(image_item(code), ruling={"title": "Restricted Video", "description": "You must be 18"})
    elif setup in ("login_wall", "rate_limited"):
        fake.add_post(image_item(code))
        fake.mode = setup
    else:
        fake.posts.pop(code, None)
    with pytest.raises(FetchError) as caught:
        await fetcher.media_preview(Target("post", code))
    assert caught.value.kind == kind and caught.value.blocks is blocks
    fake.posts.pop(code, None)


async def test_logged_in_fetching_uses_the_cookies_file_and_leaves_it_alone(
    fake: FakeInstagram, fetcher: Fetcher, tmp_path: Path
) -> None:
    code = fake.add_post(image_item("LoggedIn001", caption="members only"))
    cookies = tmp_path / "cookies.txt"
    cookies.write_text(
        "# Netscape HTTP Cookie File\n"
        ".instagram.com\tTRUE\t/\tTRUE\t2147483647\tsessionid\tsecret-session\n"
        ".instagram.com\tTRUE\t/\tTRUE\t2147483647\tcsrftoken\tcsrf1\n"
    )
    before = cookies.read_bytes()
    logged_in = Fetcher(fetcher.http, timeout=10, cookies_file=str(cookies), log=LOG)
    preview = await logged_in.media_preview(Target("post", code))
    assert preview.caption == "members only"
    [api] = fake.seen(WWW, f"/api/v1/media/{pk(code)}/info/")
    assert "sessionid=secret-session" in api.cookie
    assert fake.seen(WWW, "/p/") == []  # the logged-in API, not the public page
    assert cookies.read_bytes() == before  # yt-dlp did not write its jar back
    # the profile API is asked with the same session
    fake.profiles["carol"] = profile_json("carol")
    await logged_in.profile_preview(Target("profile", "carol"))
    assert "sessionid=secret-session" in fake.seen(API_HOST)[-1].cookie


async def test_a_profile(fake: FakeInstagram, fetcher: Fetcher) -> None:
    fake.profiles["natgeo"] = profile_json(
        "natgeo",
        followers=283_000_000,
        following=150,
        posts=("Recent00001", "Recent00002", "Recent00003", "Old00000004"),
    )
    preview = await fetcher.profile_preview(Target("profile", "natgeo"))
    assert (preview.author, preview.author_name, preview.caption) == ("natgeo", "Natgeo Person", "photos of things")
    assert (preview.followers, preview.following, preview.posts) == (283_000_000, 150, 104)
    assert [code for code, _ in preview.recent] == ["Recent00001", "Recent00002", "Recent00003"]
    assert preview.recent[0][1] == "post Recent00001"
    assert [m.url for m in preview.media] == [cdn_url("natgeo_pic.jpg")] and not preview.private
    [seen] = fake.seen(API_HOST)
    assert seen.path == "/api/v1/users/web_profile_info/?username=natgeo"


async def test_profile_errors(fake: FakeInstagram, fetcher: Fetcher) -> None:
    with pytest.raises(FetchError) as missing:
        await fetcher.profile_preview(Target("profile", "nobody.here"))
    assert missing.value.kind == "not_found"
    fake.profiles["hidden"] = profile_json("hidden", private=True)
    assert (await fetcher.profile_preview(Target("profile", "hidden"))).private
    fake.mode = "rate_limited"
    with pytest.raises(FetchError) as limited:
        await fetcher.profile_preview(Target("profile", "hidden"))
    assert limited.value.kind == "rate_limited" and limited.value.blocks


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("[Instagram] x: This content is only available for registered users who follow this account.", "private"),
        ("[Instagram] x: The webpage request was redirected to the login page. You have exceeded the rate-limit "
         "for accessing posts anonymously. Use --cookies-from-browser or --cookies", "rate_limited"),
        ("[Instagram] x: Unable to download webpage: HTTP Error 429: Too Many Requests", "rate_limited"),
        ("[Instagram] x: Unable to download JSON metadata: HTTP Error 404: Not Found", "not_found"),
        ("[Instagram] x: Post isn't available: The link may be broken, or the profile may have been", "not_found"),
        ("[Instagram] x: Instagram sent an empty media response. Check if this post is accessible", "not_found"),
        ("[Instagram] x: Restricted Video: You must be 18 years old or over to see this video", "restricted"),
        ("[Instagram] x: This video is only available for registered users. Use --cookies-from-browser or --cookies "
         "for the authentication.", "login_required"),
        ("Unsupported URL: https://www.instagram.com/x", "unsupported"),
        ("[Instagram] x: Unable to download webpage: <urlopen error [Errno 111] Connection refused>", "failed"),
        ("[Instagram] x: Unable to download webpage: HTTP Error 500: Internal Server Error", "failed"),
    ],
)  # fmt: skip
def test_classify(message: str, kind: str) -> None:
    assert classify(message) == kind
