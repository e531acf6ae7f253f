"""What an event says beyond its kind: ``Event.action`` and ``Event.event_name``
(bridge/events.py), typed, and on the wire exactly where every version so far
put them (``extra["action"]``, ``extra["event"]``).

The payloads below are literal bytes written by the code before the typed
properties (a rolling upgrade meets them in the streams); an event built
through the properties is written as the same bytes, so a daemon of the
older version reads it with the same meaning."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge.events import Delivery, Event, EventKind, event_from_wire, event_to_wire

OLD_ACTION = (
    b'{"v":1,"e":{"kind":"message","account":"api.a","channel":"api","sender_name":"Alice","text":"waves",'
    b'"origin":["api.a/api"],"extra":{"action":true},"id":"e1","timestamp":1700000000.5}}'
)
OLD_TYPING = (
    b'{"v":1,"e":{"kind":"other","account":"api.a","channel":"api","sender_name":"Alice",'
    b'"extra":{"event":"user_typing","worker":"llm"},"id":"e2","timestamp":1700000001.0},'
    b'"a":"api.b","c":"api","g":"g","u":"Alice: ","t":""}'
)
OLD_NOTICE = (  # Matrix wrote "notice" until it was found to be read nowhere: still an ordinary message
    b'{"v":1,"e":{"kind":"message","account":"matrix.m","channel":"!r:x","text":"a notice",'
    b'"extra":{"notice":true},"id":"e3","timestamp":1700000002.0}}'
)


def test_an_old_action_decodes_as_an_action() -> None:
    event = event_from_wire(OLD_ACTION)
    assert (event.kind, event.text, event.action, event.event_name) == (EventKind.MESSAGE, "waves", True, "")


def test_an_old_other_event_decodes_with_its_name_and_keeps_private_extras() -> None:
    delivery = Delivery.from_wire(OLD_TYPING)
    assert delivery.event.kind == EventKind.OTHER
    assert (delivery.event.event_name, delivery.event.action) == ("user_typing", False)
    assert delivery.event.extra["worker"] == "llm"  # workers/results.py's own key, passed on untouched


def test_an_old_notice_decodes_as_a_plain_message() -> None:
    event = event_from_wire(OLD_NOTICE)
    assert (event.kind, event.text, event.action, event.event_name) == (EventKind.MESSAGE, "a notice", False, "")


def test_events_built_through_the_properties_are_written_as_before() -> None:
    action = Event(kind=EventKind.MESSAGE, account="api.a", channel="api", sender_name="Alice", text="waves",
                   origin=["api.a/api"], id="e1", timestamp=1700000000.5)  # fmt: skip
    action.action = True
    assert event_to_wire(action) == OLD_ACTION
    typing = Event(kind=EventKind.OTHER, account="api.a", channel="api", sender_name="Alice",
                   id="e2", timestamp=1700000001.0)  # fmt: skip
    typing.event_name = "user_typing"
    typing.extra["worker"] = "llm"
    delivery = Delivery(event=typing, account="api.b", channel="api", gateway="g", username="Alice: ", text="")
    assert delivery.to_wire() == OLD_TYPING


def test_clearing_a_property_leaves_no_key_behind() -> None:
    event = event_from_wire(OLD_ACTION)
    event.action = False
    event.event_name = ""
    assert event.extra == {} and b"extra" not in event_to_wire(event)


@given(
    action=st.booleans(),
    name=st.text(),
    private=st.dictionaries(st.text().filter(lambda k: k not in ("action", "event")), st.text()),
)
def test_the_properties_survive_the_wire(action: bool, name: str, private: dict[str, str]) -> None:
    event = Event(kind=EventKind.OTHER, account="api.a", channel="api", extra=dict(private))
    event.action, event.event_name = action, name
    back = event_from_wire(event_to_wire(event))
    assert (back.action, back.event_name) == (action, name)
    assert {k: v for k, v in back.extra.items() if k not in ("action", "event")} == private
