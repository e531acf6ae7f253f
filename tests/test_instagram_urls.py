"""The Instagram link detector (workers/instagram_urls.py): examples, and
Hypothesis over generated links in generated text and over arbitrary text."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from workers.instagram_urls import MAX_TARGETS, RESERVED, Target, find_targets

EXAMPLES = [
    ("https://www.instagram.com/p/CxYz123AbC/", [Target("post", "CxYz123AbC")]),
    ("look https://instagram.com/p/CxYz123AbC/?igsh=MWQ1ZGUxMzBkMA== nice", [Target("post", "CxYz123AbC")]),
    ("instagram.com/p/CxYz123AbC", [Target("post", "CxYz123AbC")]),
    ("http://instagr.am/p/CxYz123AbC/", [Target("post", "CxYz123AbC")]),
    ("https://www.instagram.com/reel/Chunk8-jurw/", [Target("reel", "Chunk8-jurw")]),
    ("https://www.instagram.com/reels/Cop84x6u7CP/", [Target("reel", "Cop84x6u7CP")]),
    ("https://www.instagram.com/tv/BkfuX9UB-eK/#frag", [Target("tv", "BkfuX9UB-eK")]),
    ("https://www.instagram.com/marvelskies.fc/reel/CWqAgUZgCku/", [Target("reel", "CWqAgUZgCku")]),
    ("HTTPS://WWW.INSTAGRAM.COM/P/CxYz123AbC/", [Target("post", "CxYz123AbC")]),  # the host's case; the code's kept
    ("https://m.instagram.com/natgeo/", [Target("profile", "natgeo")]),
    ("follow instagram.com/NatGeo.", [Target("profile", "natgeo")]),
    ("(https://www.instagram.com/nat_geo.travel/?hl=en)", [Target("profile", "nat_geo.travel")]),
    ("https://www.instagram.com/stories/someone/3141592653589/", [Target("story", "someone")]),
    # the same media by two paths is one preview; a pasted list stops at MAX_TARGETS
    ("instagram.com/p/ABCDEF instagram.com/reel/ABCDEF", [Target("post", "ABCDEF")]),
    (" ".join(f"instagram.com/p/CODE{i:04d}" for i in range(9)), [Target("post", f"CODE{i:04d}") for i in range(5)]),
    # not Instagram links
    ("https://www.instagram.com/explore/", []),
    ("https://www.instagram.com/accounts/login/?next=/p/x", []),
    ("https://www.instagram.com/natgeo/tagged/", []),
    ("https://www.instagram.com/", []),
    ("https://instagram.com.evil.example/p/CxYz123AbC/", []),
    ("https://notinstagram.com/p/CxYz123AbC/", []),
    ("https://evil.example/?next=https://instagram.com/p/CxYz123AbC/", []),
    ("mailto:someone@instagram.com", []),
    ("https://www.instagram.com/p/abc/", []),  # too short for a shortcode
    ("no links here", []),
]


@pytest.mark.parametrize(("text", "expected"), EXAMPLES)
def test_examples(text: str, expected: list[Target]) -> None:
    assert find_targets(text) == expected


def test_canonical_urls() -> None:
    assert Target("post", "CxYz123AbC").url == "https://www.instagram.com/p/CxYz123AbC/"
    assert Target("reel", "CxYz123AbC").url == "https://www.instagram.com/reel/CxYz123AbC/"
    assert Target("tv", "CxYz123AbC").url == "https://www.instagram.com/tv/CxYz123AbC/"
    assert Target("profile", "natgeo").url == "https://www.instagram.com/natgeo/"
    # one cache entry per media, whichever path named it
    assert len({Target(k, "CxYz123AbC").cache_key for k in ("post", "reel", "tv")}) == 1


CODE_CHARS = string.ascii_letters + string.digits + "_-"
codes = st.text(CODE_CHARS, min_size=5, max_size=64)
usernames = st.from_regex(r"\A[a-z0-9_](?:[a-z0-9_]{0,28})\Z").filter(lambda u: u not in RESERVED)
schemes = st.sampled_from(["", "http://", "https://", "HTTPS://"])
hosts = st.sampled_from(["instagram.com", "www.instagram.com", "m.instagram.com", "instagr.am", "www.instagr.am",
                         "WWW.Instagram.COM"])  # fmt: skip
tails = st.sampled_from(["", "/", "/?igsh=abc123", "?utm_source=ig_web_copy_link", "/#x", "/?a=1&b=2"])
punct = st.sampled_from(["", ".", ",", "!", ")", "?", ";"])
filler = st.text(string.ascii_letters + string.digits + " \n\t.,!é🙂", max_size=40)


@st.composite
def link_and_target(draw: st.DrawFn) -> tuple[str, Target]:
    scheme, host = draw(schemes), draw(hosts)
    if draw(st.booleans()):
        path, kind = draw(st.sampled_from([("p", "post"), ("reel", "reel"), ("reels", "reel"), ("tv", "tv")]))
        code = draw(codes)
        owner = f"/{draw(usernames)}" if draw(st.booleans()) else ""
        return f"{scheme}{host}{owner}/{path}/{code}{draw(tails)}", Target(kind, code)
    user = draw(usernames)
    tail = draw(st.sampled_from(["", "/", "/?hl=en", "?igshid=x"]))
    return f"{scheme}{host}/{user}{tail}", Target("profile", user.lower())


@settings(max_examples=400)
@given(st.lists(st.tuples(filler, link_and_target(), punct), min_size=1, max_size=8), filler)
def test_generated_links_in_text_are_found_in_order(parts: list[tuple[str, tuple[str, Target], str]], end: str) -> None:
    text = "".join(f"{before} {link}{p} " for before, (link, _), p in parts) + end
    expected: list[Target] = []
    for _, (_, target), _ in parts:
        if target.cache_key not in {t.cache_key for t in expected}:
            expected.append(target)
    assert find_targets(text) == expected[:MAX_TARGETS]


@settings(max_examples=400)
@given(st.text(max_size=300))
@example("instagram.com/" + "a" * 5000)
@example("https://www.instagram.com/p/" + "A" * 65)
@example("instagram.com/" + "a." * 40)
def test_any_text_gives_valid_targets_that_round_trip(text: str) -> None:
    found = find_targets(text)
    assert len(found) <= MAX_TARGETS
    assert len({t.cache_key for t in found}) == len(found)
    for target in found:
        if target.kind in ("post", "reel", "tv"):
            assert 5 <= len(target.ident) <= 64 and set(target.ident) <= set(CODE_CHARS)
        else:
            assert target.ident == target.ident.lower() and target.ident not in RESERVED
            assert set(target.ident) <= set(string.ascii_lowercase + string.digits + "_.")
        # the canonical URL names the same thing again (what the worker fetches)
        assert find_targets(target.url) == [target]


@settings(max_examples=300)
@given(link_and_target(), st.sampled_from(["x", "evil.example/?u=", "a/", "=", "instagram.com.", "1"]))
def test_a_link_inside_another_word_or_url_is_not_one(pair: tuple[str, Target], glue: str) -> None:
    link, _ = pair
    assert find_targets(glue + link) == []


@settings(max_examples=300)
@given(codes, st.sampled_from(["instagram.co", "instagram.com.evil.example", "instagramm.com", "instagram.net",
                               "fbcdn.net", "cdninstagram.com", "instagram.comx"]))  # fmt: skip
def test_other_hosts_are_never_instagram(code: str, host: str) -> None:
    assert find_targets(f"https://{host}/p/{code}/ and {host}/p/{code}") == []
