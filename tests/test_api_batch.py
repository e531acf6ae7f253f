"""The api account's delivery script: one batch, one buffer entry per delivery."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from adapters import AdapterRegistry
from adapters.api import MatterbridgeAPI
from bridge.bus import Bus, BusSettings
from bridge.config import load_config
from bridge.daemon import adapter_context
from bridge.events import Delivery, Event, EventKind
from bridge.idmap import IdMap
from bridge.metrics import Metrics
from bridge.options import protocol_specs
from tests.test_metrics_gauges import CONFIG


def delivery(text: str, event_id: str) -> Delivery:
    event = Event(kind=EventKind.MESSAGE, account="api.a", channel="api", sender_name="alice", text=text, id=event_id)
    return Delivery(event=event, account="api.b", channel="api", gateway="g", username="alice", text=text)


async def test_a_delivery_twice_in_one_batch_is_buffered_once(redis: Redis, tmp_path: Path) -> None:
    """The same event published twice (a stale owner's repeated page, a replayed
    webhook) can land in one batch; the script's marker check must see the copy
    it wrote moments before in the same call, not only the id map as it was."""
    path = tmp_path / "g.toml"
    path.write_text(CONFIG)
    registry = AdapterRegistry()
    config = load_config(path, protocol_specs(registry))
    bus = Bus(redis, BusSettings())
    idmap = IdMap(redis, bus.prefix, 3600)
    adapter = MatterbridgeAPI(adapter_context(config, "api.b", redis, bus.publish, Metrics(), bus.prefix, idmap))
    first, other = delivery("hello", "e1"), delivery("other", "e2")
    ids = await adapter.send_batch([first, other, delivery("hello", "e1")])
    assert await redis.xlen(adapter.buffer_key) == 2
    assert ids[0] is not None and ids[1] not in (None, ids[0])
    # a later batch finds the copy in the id map, and answers as the same batch did
    assert await adapter.send_batch([delivery("hello", "e1")]) == [ids[2]]
    assert await redis.xlen(adapter.buffer_key) == 2
