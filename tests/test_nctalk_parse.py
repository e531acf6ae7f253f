"""Property tests over every parser of Talk's chat answers (adapters/talk/chat.py)
and the rendering of messageParameters (adapters/talk/common.py): whatever
bytes a server sends, the answer is a checked value or ``BadAnswer`` — never
another exception."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from adapters.nctalk import safe_name
from adapters.talk.chat import (
    BadAnswer,
    ChatMessage,
    Conversation,
    last_given,
    parse_capabilities,
    parse_page,
    parse_reactions,
    parse_rooms,
)
from adapters.talk.common import render
from tests.ingress_props import PROPS

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text()
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=30
)

# PHP's json_encode fails on invalid UTF-8: Talk never sends a lone surrogate
# (st.characters with arguments would draw them; st.text() alone does not).
no_braces = st.characters(exclude_characters="{}", exclude_categories=("Cs",))
param = st.fixed_dictionaries(
    {"type": st.sampled_from(["user", "guest", "file", "call", "highlight", "deck-card"]),
     "id": st.text(no_braces, max_size=10),
     "name": st.text(no_braces, max_size=20)},
    optional={"path": st.text(max_size=20), "size": st.integers(0, 10**9) | st.text(max_size=5),
              "mimetype": st.text(max_size=10), "link": st.text(max_size=20)},
)  # fmt: skip
parameters = st.just([]) | st.dictionaries(st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True), param, min_size=1,
                                           max_size=4)  # fmt: skip
message = st.fixed_dictionaries(
    {"id": st.integers(0, 2**62), "token": st.text(max_size=8),
     "actorType": st.sampled_from(["users", "guests", "bots"]),
     "actorId": st.text(max_size=12), "actorDisplayName": st.text(max_size=12), "timestamp": st.integers(0, 2**40),
     "message": st.text(max_size=60), "messageParameters": parameters, "systemMessage": st.sampled_from(
         ["", "reaction", "reaction_revoked", "message_edited", "message_deleted", "user_added", "call_ended"]),
     "messageType": st.sampled_from(["comment", "system", "comment_deleted", "voice-message", "command"]),
     "referenceId": st.text(max_size=64)},
)  # fmt: skip


def ocs(data: Any) -> bytes:
    return json.dumps({"ocs": {"meta": {"status": "ok", "statuscode": 200}, "data": data}}).encode()


@PROPS
@given(st.binary(max_size=200) | anything.map(lambda v: json.dumps(v).encode()) | anything.map(ocs))
def test_any_answer_is_a_page_or_bad_answer(body: bytes) -> None:
    try:
        page = parse_page(body)
    except BadAnswer:
        return
    assert all(isinstance(m, ChatMessage) for m in page)


@PROPS
@given(st.lists(message, max_size=5), st.data())
def test_a_page_of_messages_is_read_as_talk_sent_it(raw: list[dict[str, Any]], data: st.DataObject) -> None:
    for item in raw:
        if data.draw(st.booleans()):
            item["parent"] = data.draw(
                message | st.fixed_dictionaries({"id": st.integers(0, 99), "deleted": st.just(True)})
            )
    page = parse_page(ocs(raw))
    for item, msg in zip(raw, page, strict=True):
        assert (msg.id, msg.actor, msg.message, msg.system) == (
            item["id"], f"{item['actorType']}/{item['actorId']}", item["message"], item["systemMessage"],
        )  # fmt: skip
        assert msg.parameters == item["messageParameters"]
        assert (msg.parent is None) == ("parent" not in item)


@PROPS
@given(message, st.sampled_from(["id", "actorId", "message", "messageParameters", "timestamp", "parent"]), anything)
def test_a_message_with_a_field_of_the_wrong_kind_refuses_the_page(raw: dict[str, Any], key: str, value: Any) -> None:
    raw[key] = value
    try:
        parse_page(ocs([raw]))
    except BadAnswer:
        pass


@PROPS
@given(st.text(max_size=30))
def test_last_given_is_a_message_id_or_bad_answer(header: str) -> None:
    try:
        value = last_given(header)
    except BadAnswer:
        return
    assert value == int(header.strip()) and value > 0


@PROPS
@given(anything.map(ocs) | st.binary(max_size=100))
def test_capabilities_and_reactions_parse_or_refuse(body: bytes) -> None:
    for parser in (parse_capabilities, parse_reactions):
        try:
            parser(body)
        except BadAnswer:
            pass


@PROPS
@given(st.text(max_size=80), parameters)
def test_rendering_replaces_known_placeholders_and_never_fails(text: str, params: Any) -> None:
    keys = list(params) if isinstance(params, dict) else []
    message = text + "".join("{" + k + "}" for k in keys)
    out, files = render(message, params)
    assert isinstance(out, str)
    placeholders = [m.group(1) for m in re.finditer(r"\{([A-Za-z0-9_\-]+)\}", message)]
    assert len(files) == sum(1 for k in placeholders if k in keys and params[k]["type"] == "file")
    for k in keys:
        if params[k]["type"] != "file" and (params[k]["name"] or params[k]["id"]):  # named: replaced
            assert "{" + k + "}" not in out or "{" + k + "}" in params[k]["name"]


@PROPS
@given(st.text(max_size=300))
def test_a_file_name_is_always_safe_for_webdav(name: str) -> None:
    safe = safe_name(name)
    assert safe and "/" not in safe and "\\" not in safe and safe not in (".", "..") and len(safe) <= 200


conversation = st.fixed_dictionaries(
    {"id": st.integers(1, 10**6), "token": st.text(st.characters(codec="utf-8"), min_size=1, max_size=64),
     "type": st.integers(1, 6), "name": st.text(max_size=20), "displayName": st.text(max_size=20),
     "participantType": st.integers(1, 6), "readOnly": st.integers(0, 1), "lastActivity": st.integers(0, 2**40)},
)  # fmt: skip


@PROPS
@given(st.lists(conversation, max_size=6))
def test_a_room_list_is_read_as_talk_sent_it(raw: list[dict[str, Any]]) -> None:
    try:
        rooms = parse_rooms(ocs(raw))
    except BadAnswer:  # only for a token that is not one (a control character)
        assert any(not item["token"].isprintable() for item in raw)
        return
    assert [(c.token, c.type) for c in rooms] == [(item["token"], item["type"]) for item in raw]
    assert [c.name for c in rooms] == [item["displayName"] or item["name"] for item in raw]


@PROPS
@given(anything.map(ocs) | anything.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=100),
       st.lists(conversation, min_size=1, max_size=3), st.sampled_from(["token", "type"]), anything)  # fmt: skip
def test_any_room_list_answer_is_conversations_or_bad_answer(body: bytes, raw: list, key: str, value: Any) -> None:
    raw[0][key] = value
    for answer in (body, ocs(raw)):
        try:
            rooms = parse_rooms(answer)
        except BadAnswer:
            continue
        assert all(isinstance(c, Conversation) and c.token and isinstance(c.type, int) for c in rooms)
