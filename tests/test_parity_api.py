"""Matterbridge parity, points 5, 6 and 7 of issue 8: api accounts, the
API's JSON as Go reads it, and config values as Matterbridge's loader reads
them -- through one daemon process with three api accounts.

The reference is Matterbridge v1.26 (42wim/matterbridge, read through the
search tool):

- bridge/api/api.go @ e68ddcf5c1c579b29b73e908ead263fa1ebbc694:
  ``handlePostMessage`` binds the body to config.Message with Go's
  encoding/json (keys matched without regard to case) and fixes
  ``message.Channel = "api"``; ``New`` sets the ring's capacity only ``if
  b.GetInt("Buffer") != 0``; ``Send`` drops every ``msg_delete``.
- bridge/config/config.go @ 9989a7c6e2e9a2a9efe22108f766923ce79abcdf:
  config.Message's JSON names (``Extra`` has none: its field name), the
  event names, FileInfo; viper decoding the file.
- gateway/gateway.go @ 4ab72acec656dafd304f88359b509b1f27c06604:
  ``mapChannelConfig`` (``if isAPI(br.Account) { br.Channel = apiProtocol }``),
  ``ignoreTextEmpty``, ``ignoreFilesComment``, ``modifyAvatar``,
  ``modifyMessage`` (``emoji.Sprint`` before ReplaceMessages), ``SendMessage``
  (``for api we need originchannel as channel``).
- gateway/handlers.go @ 3c36f651beafbaeca36a7112a47378e8a4d19d7d:
  ``handleMessage`` (user_typing only to bridges in UserTypingSupport) and
  ``ignoreEvent`` (join_leave needs ShowJoinPart, topic_change ShowTopicChange
  or SyncTopic).
- gateway/router.go @ 802dc3c324a3a1224519ba95ab615199f6368391: ``NewRouter``
  skips a disabled gateway before looking at its name.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import AdapterRegistry
from adapters.api.encoding import MESSAGE_FIELDS, go_fields, go_fold
from bridge.cli import main
from bridge.config import load_config
from bridge.options import go_weak, protocol_specs
from tests.helpers import Daemon, RedisServer, free_port, wait_for
from tests.test_api_e2e import Api

CONFIG = """
[api.a]
BindAddress = "127.0.0.1:{a}"
Token = "token-a"
Buffer = 0
Label = "from-{{NICK}}"
IgnoreMessages = "^secret"

[api.b]
BindAddress = "127.0.0.1:{b}"
Token = "token-b"
Buffer = "100"
ShowJoinPart = "true"
ShowTopicChange = true
IconURL = "https://icons.example/{{NICK}}.png"
RemoteNickFormat = "{{LABEL}}|{{CHANNEL}}|<{{NICK}}> "

[api.c]
BindAddress = "127.0.0.1:{c}"
Token = "token-c"

[[gateway]]
name = "g"
enable = "true"
[[gateway.inout]]
account = "api.a"
[[gateway.inout]]
account = "api.b"
channel = "anything"
[[gateway.out]]
account = "api.c"

[[gateway]]
name = "g"
enable = false
[[gateway.inout]]
account = "api.a"

[redis]
URL = "{redis}"
[http]
BindAddress = "127.0.0.1:{http}"
[bus]
LeaseSeconds = 3
"""


class Bridge:
    def __init__(self, path: Path, a: Api, b: Api, c: Api, daemon: Daemon) -> None:
        self.path, self.a, self.b, self.c, self.daemon = path, a, b, c, daemon

    def post(self, **message: object) -> httpx.Response:
        return httpx.post(f"{self.a.base}/api/message", json=message, headers=self.a.headers, timeout=5)

    def until_marker(self, api: Api, marker: str) -> list[dict]:
        """What ``api`` receives before ``marker`` (posted last from a): one
        inbound stream routed in order, one buffer, so whatever an earlier
        POST would have delivered is there by then."""
        got: list[dict] = []

        def done() -> bool:
            got.extend(api.messages())
            return any(m["text"] == marker for m in got)

        wait_for(done, what=f"{marker} at {api.base}")
        return got[: next(i for i, m in enumerate(got) if m["text"] == marker)]

    def after(self, marker: str) -> tuple[list[dict], list[dict]]:
        assert self.post(text=marker, username="m", gateway="g").status_code == 200
        return self.until_marker(self.b, marker), self.until_marker(self.c, marker)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Bridge]:
    """One daemon for the module; its tests read what they posted up to a
    marker, so they need no fresh Redis (its own client; nothing here uses the
    per-test ``redis`` fixture, which flushes)."""
    tmp = tmp_path_factory.mktemp("parity-api")
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    ports = {name: free_port() for name in ("a", "b", "c", "http")}
    path = tmp / "matterbridge.toml"
    path.write_text(CONFIG.format(redis=redis_server.url, **ports))
    daemon = Daemon(path, ports["http"], tmp / "daemon.log").start()
    try:
        yield Bridge(path, Api(ports["a"], "token-a"), Api(ports["b"], "token-b"), Api(ports["c"], "token-c"), daemon)
    finally:
        daemon.stop()


# point 7 -----------------------------------------------------------------------------------
def test_config_values_as_matterbridges_loader_reads_them(bridge: Bridge) -> None:
    """viper decodes the file with mapstructure's WeaklyTypedInput and reads
    keys with cast: ``enable = "true"``, ``Buffer = "100"``, ``ShowJoinPart =
    "true"`` are true and 100 there, and here. A second gateway "g" that is
    disabled is skipped before its name counts (router.go NewRouter), with a
    warning; the daemon started on this file at all."""
    out = io.StringIO()
    assert main(["check-config", str(bridge.path)], out=out) == 0
    assert 'warning: gateway[1]: gateway "g" is not enabled (enable=true), skipped' in out.getvalue()
    config = load_config(bridge.path, protocol_specs(AdapterRegistry()))
    assert [gw.name for gw in config.gateways] == ["g"]
    assert config.accounts["api.b"].get("Buffer") == 100
    assert config.accounts["api.b"].get("ShowJoinPart") is True
    assert bridge.daemon.proc is not None and bridge.daemon.proc.poll() is None


@pytest.mark.parametrize(
    "value, kind, expected",
    [
        ("true", bool, True),
        ("False", bool, False),
        ("", bool, False),
        (1, bool, True),
        ("100", int, 100),
        ("0x10", int, 16),
        ("017", int, 15),  # Go's ParseInt with base 0: a leading 0 is octal
        ("1_000", int, 1000),
        (True, int, 1),
        (7.9, int, 7),  # truncated, as Go converts
        (5, str, "5"),
        (True, str, "true"),  # cast.ToString, as the keys are read
        (0.5, str, "0.5"),
    ],
)
def test_weakly_typed_values_read_as_go_reads_them(value: object, kind: type, expected: object) -> None:
    """mapstructure 1.5.0 (decodeBool/decodeInt/decodeString, weak) and cast
    1.5.0 (ToBoolE, ToStringE), the versions Matterbridge 1.26 builds with."""
    assert go_weak(value, kind) == (True, expected)


@pytest.mark.parametrize(
    "value, kind", [("yes", bool), ("big", int), (" 5", int), ("1.5", int), ([1], str), (1 << 63, int)]
)
def test_what_go_cannot_read_stays_a_problem(value: object, kind: type) -> None:
    assert go_weak(value, kind)[0] is False


TOML_VALUES = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"\A[+-]?(0[xXbBoO])?[0-9a-fA-F_]{1,25}\Z"),
    st.integers(min_value=-(1 << 64), max_value=1 << 64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=500, deadline=None)
@given(value=TOML_VALUES, kind=st.sampled_from([bool, int, str, list]))
def test_any_value_is_read_or_refused_never_an_error(value: object, kind: type) -> None:
    """The weak reading of any TOML value: understood as the declared type,
    or not understood -- a problem the loader names -- and never an error."""
    understood, read = go_weak(value, kind)
    if understood:
        assert type(read) is kind
        if kind is int:
            assert -(1 << 63) <= read < 1 << 63  # Go's int


def test_gateways_as_matterbridges_router_reads_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """router.go NewRouter: a disabled gateway needs no name and may share one;
    two *enabled* gateways of one name are still refused, as there. gateway.go
    mapChannelConfig: a channel listed ``in`` and ``out`` is one ``inout``
    channel; an api account's is "api" whatever the entry says."""
    accounts = '[api.a]\nBindAddress = "127.0.0.1:1"\n[api.b]\nBindAddress = "127.0.0.1:2"\n'
    entries = (
        '[[gateway.in]]\naccount = "api.a"\nchannel = "x"\n'
        '[[gateway.out]]\naccount = "api.a"\nchannel = "y"\n'
        '[[gateway.inout]]\naccount = "api.b"\n'
    )
    text = accounts + '[[gateway]]\nname = "g"\nenable = true\n' + entries + "[[gateway]]\nenable = false\n"
    path = tmp_path / "m.toml"
    path.write_text(text)
    config = load_config(path, protocol_specs(AdapterRegistry()))
    [gw] = config.gateways
    assert sorted((e.account, e.channel, e.direction) for e in gw.entries) == [
        ("api.a", "api", "inout"),
        ("api.b", "api", "inout"),
    ]
    assert any("a gateway without a name is not enabled" in w for w in config.warnings)
    path.write_text(text + '[[gateway]]\nname = "g"\nenable = "1"\n' + entries)
    assert main(["check-config", str(path)], out=io.StringIO()) == 2
    assert capsys.readouterr().err.strip() == 'gateway[2].name: gateway "g" is defined twice'


# point 5 -----------------------------------------------------------------------------------
def test_an_api_accounts_channel_is_always_api(bridge: Bridge) -> None:
    """A gateway entry for an api account may omit ``channel`` (api.a) or
    name another (api.b: "anything"): it is "api", in ``{CHANNEL}`` and in the
    message's ``channel`` (the origin channel, as SendMessage gives api
    destinations). ``{LABEL}`` holds a ``{NICK}`` that is expanded."""
    answer = bridge.post(text="hello", username="alice", gateway="g").json()
    assert answer["channel"] == "api"
    [at_b], [at_c] = bridge.after("m5")
    assert (at_b["channel"], at_b["username"]) == ("api", "from-alice|api|<alice> ")
    assert (at_c["channel"], at_c["username"]) == ("api", "alice")  # api's RemoteNickFormat default: "{NICK}"


def test_buffer_zero_means_the_default(bridge: Bridge) -> None:
    """api.a has ``Buffer = 0``: Matterbridge keeps its ring's default
    capacity for 0; ours is 1000 (and durable). Messages reach it."""
    for i in range(3):
        assert bridge.b.post(text=f"to a {i}", username="bob", gateway="g").status_code == 200
    assert [m["text"] for m in bridge.a.wait_messages(3)] == ["to a 0", "to a 1", "to a 2"]


# point 6 -----------------------------------------------------------------------------------
def test_json_keys_match_without_regard_to_case(bridge: Bridge) -> None:
    """Go's encoding/json matches ``Text``, ``GATEWAY``, ``extra`` to
    config.Message's fields; mapstructure matches a file's ``name``, ``data``
    and ``comment`` the same way."""
    data = base64.b64encode(b"hi").decode()
    body = {
        "Text": "cased",
        "UserName": "alice",
        "GATEWAY": "g",
        "extra": {"file": [{"name": "a.txt", "data": data, "COMMENT": "a note"}]},
    }
    assert bridge.post(**body).status_code == 200
    [at_b], _ = bridge.after("m6a")
    assert at_b["text"] == "cased" and at_b["username"].endswith("<alice> ")
    [file] = at_b["Extra"]["file"]
    assert (file["Name"], file["Data"], file["Comment"]) == ("a.txt", data, "a note")


def test_events_of_other_kinds_are_accepted_and_routed_as_matterbridge_routes_them(bridge: Bridge) -> None:
    """Never a 400: ``topic_change`` reaches the destination with
    ShowTopicChange (b) and not the other (c); ``user_typing`` reaches no api
    account (api is not in UserTypingSupport); a ``msg_delete`` without an id,
    or with one we never gave out, deletes nothing anywhere; a client's own
    event reaches every api destination with its name; an empty
    ``join_leave`` reaches nobody, one with text the destination with
    ShowJoinPart."""
    posts = [
        {"event": "topic_change", "text": "new topic"},
        {"event": "user_typing"},
        {"event": "msg_delete", "text": "x"},
        {"event": "msg_delete", "id": "00000000deadbeef"},
        {"event": "my_event", "text": "custom"},
        {"event": "join_leave"},
        {"event": "join_leave", "text": "alice joins"},
    ]
    for post in posts:
        resp = bridge.post(username="alice", gateway="g", **post)
        assert resp.status_code == 200, resp.text
        assert resp.json()["event"] == post["event"]
    at_b, at_c = bridge.after("m6b")
    assert [(m["event"], m["text"]) for m in at_b] == [
        ("topic_change", "new topic"),
        ("my_event", "custom"),
        ("join_leave", "alice joins"),
    ]
    assert [(m["event"], m["text"]) for m in at_c] == [("my_event", "custom")]


def test_icon_url_fills_the_avatar_of_a_message_without_one(bridge: Bridge) -> None:
    """modifyAvatar: the destination's IconURL, ``{NICK}`` the sender's nick,
    when the message has no avatar; an avatar of its own stands."""
    bridge.post(text="plain", username="alice", gateway="g")
    bridge.post(text="own", username="alice", avatar="https://me.example/a.png", gateway="g")
    at_b, at_c = bridge.after("m6c")
    assert [m["avatar"] for m in at_b] == ["https://icons.example/alice.png", "https://me.example/a.png"]
    assert [m["avatar"] for m in at_c] == ["", "https://me.example/a.png"]


def test_emoji_shortcodes_become_emoji(bridge: Bridge) -> None:
    """modifyMessage: ``emoji.Sprint(msg.Text)`` with no padding."""
    bridge.post(text="hi :smile: and :+1: at 12:30:00 :flag-de:", username="alice", gateway="g")
    [at_b], [at_c] = bridge.after("m6d")
    assert at_b["text"] == at_c["text"] == "hi \U0001f604 and \U0001f44d at 12:30:00 \U0001f1e9\U0001f1ea"


def test_a_file_whose_comment_matches_ignore_messages_is_dropped(bridge: Bridge) -> None:
    """ignoreFilesComment: api.a's IgnoreMessages ``^secret`` matches the
    comment of a file, so the message is dropped whatever its text."""
    data = base64.b64encode(b"x").decode()
    file = {"Name": "f.txt", "Data": data}
    bridge.post(text="look", username="alice", gateway="g", Extra={"file": [{**file, "Comment": "secret plan"}]})
    bridge.post(text="look again", username="alice", gateway="g", Extra={"file": [{**file, "Comment": "fine"}]})
    at_b, _ = bridge.after("m6e")
    assert [m["text"] for m in at_b] == ["look again"]


# JSON keys as Go matches them: a property ----------------------------------------------------
def _case_variants(name: str) -> st.SearchStrategy[str]:
    def vary(flags: list[bool]) -> str:
        return "".join(c.swapcase() if flip else c for c, flip in zip(name, flags, strict=True))

    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(vary)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(MESSAGE_FIELDS).flatmap(_case_variants) | st.text(max_size=6),
            st.integers() | st.text(max_size=4) | st.none(),
        ),
        max_size=12,
    )
)
def test_json_keys_fold_as_go_folds_them_and_the_last_wins(pairs: list[tuple[str, object]]) -> None:
    """Any mix of keys: each field gets the value of the last key that folds
    to its name (Go assigns the fields key by key), other keys are dropped,
    and nothing raises."""
    body = dict(pairs)  # a JSON object: a repeated key keeps its last value, as orjson and Go do
    got = go_fields(body, MESSAGE_FIELDS)
    for name in MESSAGE_FIELDS:
        matching = [v for k, v in body.items() if go_fold(k) == go_fold(name)]
        if matching:
            assert got[name] == matching[-1]
        else:
            assert name not in got
    assert set(got) <= set(MESSAGE_FIELDS)


def test_go_fold_is_ascii_case_and_the_kelvin_sign_and_long_s() -> None:
    assert go_fold("ExTrA") == go_fold("extra")
    assert go_fold("\u017fender") == "sender" and go_fold("\u212aey") == "key"
    assert go_fold("TÉXT") != go_fold("téxt")  # no other letter folds: encoding/json compares ASCII only
