"""The matterbridge client's messages (adapters/matterbridge/messages.py):
Matterbridge 1.26's api messages as events, deliveries as POST bodies, and
the digest that recognises a message handed over twice; by hand and by
generation (any JSON is either an event, a skip with a reason, or a
BadMessage: nothing else escapes)."""

from __future__ import annotations

import base64
import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.matterbridge.messages import (
    MARK_KEY,
    PARENT_NOT_FOUND,
    BadMessage,
    Formats,
    digest_of,
    post_body,
    received,
    synthetic_id,
)
from bridge.events import Attachment, Delivery, Event, EventKind
from tests.ingress_props import PROPS

ACCOUNT = "matterbridge.mb"
GATEWAYS = frozenset({"gw1", "gw2"})
MARK = "0123456789abcdef"


def message(**fields: object) -> dict[str, object]:
    """A message as api.go Send marshals config.Message (every field, in its order)."""
    base: dict[str, object] = {
        "text": "hello", "channel": "#talk", "username": "[irc] <alice> ", "userid": "alice!a@host",
        "avatar": "", "account": "irc.libera", "event": "", "protocol": "irc", "gateway": "gw1",
        "parent_id": "", "timestamp": "2026-12-07T22:51:44.123456789Z", "id": "", "Extra": None,
    }  # fmt: skip
    base.update(fields)
    return base


def parse(raw: object, max_file: int = 1000) -> object:
    return received(raw, account=ACCOUNT, gateways=GATEWAYS, mark=MARK, max_file=max_file)


def test_a_message_becomes_an_event_of_its_gateway_named_by_its_network() -> None:
    item = parse(message())
    event = item.event
    assert event is not None and event.kind == EventKind.MESSAGE
    assert (event.account, event.channel, event.text) == (ACCOUNT, "gw1", "hello")
    assert (event.sender_name, event.sender_id) == ("[irc] <alice> ", "alice!a@host")
    assert event.relayed_from == "irc.libera"  # {PROTOCOL} irc, {BRIDGE} libera
    assert event.native_id == "mb-" + item.digest[:16]
    assert event.reply_to is None and not event.action


def test_user_action_parent_and_files() -> None:
    data = base64.b64encode(b"\x89PNG...").decode()
    big = base64.b64encode(b"x" * 2000).decode()
    extra = {
        "file": [
            {"Name": "a.png", "Data": data, "Comment": "look", "URL": "", "Size": 7},
            {"Name": "big.bin", "Data": big, "URL": "http://media/big.bin"},
            {"Name": "nodata.txt", "Data": None},
        ]
    }
    event = parse(message(event="user_action", parent_id="slack 123.4", Extra=extra)).event
    assert event.action and event.reply_to == "slack 123.4"
    assert [(a.name, a.data_b64, a.caption, a.size) for a in event.attachments] == [("a.png", data, "look", 7)]
    assert event.text == "hello\nbig.bin: http://media/big.bin\n[file nodata.txt]"


def test_a_file_that_cannot_travel_is_named_and_the_message_kept() -> None:
    files = [
        {"Name": "../../etc/x.png", "Data": "AA=="},
        {"Name": "bad.bin", "Data": "%%%", "URL": "http://m/bad.bin"},
        {"Name": "\x00\n", "Data": 5},
        {"Name": None},
    ]
    event = parse(message(Extra={"file": files})).event
    assert [(a.name, a.data_b64) for a in event.attachments] == [("x.png", "AA==")]
    assert event.text == "hello\nbad.bin: http://m/bad.bin\n[file file]\n[file file]"


def test_a_parent_matterbridge_did_not_find_is_no_reply() -> None:
    assert parse(message(parent_id=PARENT_NOT_FOUND)).event.reply_to is None


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"event": "api_connected"}, "event api_connected"),
        ({"event": "user_typing"}, "event user_typing"),
        ({"event": "msg_delete"}, "event msg_delete"),
        ({"gateway": "other"}, "gateway not bridged"),
        ({"text": "", "Extra": None}, "empty"),
        ({"Extra": {MARK_KEY: [MARK]}}, "own post"),
    ],
)
def test_what_is_not_relayed_says_why(fields: dict[str, object], why: str) -> None:
    item = parse(message(**fields))
    assert item.event is None and item.skip == why and item.digest


def test_another_talkbridges_mark_is_relayed_and_other_events_pass_by_name() -> None:
    assert parse(message(Extra={MARK_KEY: ["someone-else"]})).event is not None
    assert parse(message(event="join_leave")).event.kind == EventKind.JOIN
    other = parse(message(event="topic_change")).event
    assert other.kind == EventKind.OTHER and other.event_name == "topic_change"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ([], "JSON object"),
        ("text", "JSON object"),
        (message(text=5), "text must be a string"),
        (message(Extra=[]), "Extra must be an object"),
        (message(Extra={"file": {}}), "Extra.file must be a list"),
        (message(Extra={"file": ["x"]}), "must be an object"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(raw: object, why: str) -> None:
    with pytest.raises(BadMessage, match=why):
        parse(raw)


def test_keys_match_as_go_matches_them() -> None:
    raw = {"TEXT": "hi", "Gateway": "gw1", "UserName": "bob", "account": "xmpp.jabber"}
    event = parse(raw).event
    assert (event.text, event.channel, event.sender_name, event.relayed_from) == ("hi", "gw1", "bob", "xmpp.jabber")


def test_the_digest_is_the_same_compact_or_pretty_and_differs_by_timestamp() -> None:
    raw = message()
    pretty = json.loads(json.dumps(raw, indent=" "))
    reordered = dict(reversed(list(raw.items())))
    assert digest_of(raw) == digest_of(pretty) == digest_of(reordered)
    assert digest_of(message(timestamp="2026-12-07T22:51:44.123456790Z")) != digest_of(raw)


def delivery(kind: EventKind = EventKind.MESSAGE, **event_fields: object) -> Delivery:
    event = Event(kind=kind, account="nctalk.cloud", channel="room1", sender_id="users/bob", **event_fields)
    return Delivery(event=event, account=ACCOUNT, channel="gw2", gateway="g", username="<bob> ", text="hi there")


def test_a_message_posts_into_its_gateway_with_our_mark() -> None:
    d = delivery(avatar="http://a/b.png", attachments=[Attachment(name="f.txt", data_b64="aGk=", caption="c")])
    d.reply_to = "tb-0011"
    body = post_body(d, MARK, Formats())
    assert body == {
        "text": "hi there", "username": "<bob> ", "userid": "users/bob", "avatar": "http://a/b.png",
        "gateway": "gw2", "event": "", "parent_id": "tb-0011",
        "Extra": {MARK_KEY: [MARK], "file": [{"Name": "f.txt", "Data": "aGk=", "Comment": "c"}]},
    }  # fmt: skip


def test_actions_files_without_data_and_the_synthetic_id() -> None:
    d = delivery(attachments=[Attachment(name="v.ogg", url="https://cloud/s/x")])
    d.event.action = True
    body = post_body(d, MARK, Formats())
    assert body["event"] == "user_action" and body["text"] == "hi there\nv.ogg: https://cloud/s/x"
    assert "file" not in body["Extra"]
    again = Delivery.from_wire(d.to_wire())  # the same delivery, read again after a crash
    assert synthetic_id(d) == synthetic_id(again) != synthetic_id(delivery())
    assert synthetic_id(d).startswith("tb-")


def test_what_matterbridge_cannot_do_follows_the_formats() -> None:
    edit = delivery(EventKind.EDIT)
    assert post_body(edit, MARK, Formats())["text"] == "hi there (edited)"
    assert post_body(edit, MARK, Formats())["parent_id"] == ""
    assert post_body(edit, MARK, Formats(edit="")) is None
    reaction = delivery(EventKind.REACTION, reaction="👍")
    assert post_body(reaction, MARK, Formats()) is None
    assert post_body(reaction, MARK, Formats(reaction="reacted {EMOJI}"))["text"] == "reacted 👍"
    assert post_body(delivery(EventKind.UNREACTION, reaction="👍"), MARK, Formats(reaction="r {EMOJI}")) is None
    assert post_body(delivery(EventKind.DELETE), MARK, Formats()) is None
    assert post_body(delivery(EventKind.DELETE), MARK, Formats(delete="(deleted)"))["text"] == "(deleted)"


# generated ---------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
FIELD_NAMES = ["text", "username", "userid", "gateway", "event", "parent_id", "account", "Extra", "id", "avatar"]
messages_like = st.builds(
    lambda base, changes: {**base, **changes},
    st.just(message()),
    st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=4),
)


@PROPS
@given(st.one_of(json_values, messages_like))
def test_any_json_is_an_event_a_skip_or_refused(raw: object) -> None:
    try:
        item = parse(raw)
    except BadMessage as exc:
        assert str(exc)
        return
    assert len(item.digest) == 32
    if item.event is None:
        assert item.skip
    else:
        assert item.event.channel in GATEWAYS and (item.event.text or item.event.attachments or item.event.kind)
        orjson.dumps(item.event.to_dict())  # it can go on the bus


@PROPS
@given(st.text(), st.text(max_size=30), st.booleans())
def test_a_post_read_back_as_matterbridge_hands_it_over_is_the_same_message(text: str, nick: str, action: bool) -> None:
    d = delivery()
    d.text, d.username = text or "x", nick
    d.event.action = action
    body = post_body(d, MARK, Formats())
    # what another talkbridge reading that api account gets: api.go keeps every field it was given
    back = parse({**body, "account": "api.tb", "protocol": "api", "gateway": "gw1"}, max_file=10)
    assert back.skip == "own post"
    other = received(
        {**body, "account": "api.tb", "gateway": "gw1"}, account=ACCOUNT, gateways=GATEWAYS, mark="another", max_file=10
    ).event
    assert (other.text, other.sender_name, other.action) == (d.text, nick, action)
