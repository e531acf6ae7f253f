"""Takeover in seconds, the parts (bridge/lease.py): the compare-and-delete
that frees a dead owner's lease, the alive keys and their judgement, on the
suite's Redis and on a Redis Cluster (the alive keys of the instances are in
different slots), and ``[bus] TakeoverSeconds`` as the config loader reads it.
The daemons doing it for real: tests/test_takeover.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters import AdapterRegistry
from bridge.config import ConfigError, load_config
from bridge.keys import alive_key
from bridge.lease import Lease, Liveness
from bridge.options import protocol_specs
from tests.talkbot_rig import until

SPECS = protocol_specs(AdapterRegistry())
API = '[api.a]\nBindAddress = "127.0.0.1:0"\nToken = "t"\n'


async def takes_over_only_from_the_named_owner(redis: Redis | RedisCluster) -> None:
    dead = Lease(redis, "tb", "api.b", "dead-instance", 30)
    assert await dead.acquire()
    stale = dead.fence
    successor = Lease(redis, "tb", "api.b", "survivor", 30)
    other = Lease(redis, "tb", "api.b", "third", 30)
    assert not await successor.acquire()  # held for 30 s
    assert not await successor.take_over("someone-else")  # it names another owner: untouched
    assert await successor.holder() == "dead-instance"
    assert await successor.take_over("dead-instance")
    assert await successor.holder() is None
    assert not await other.take_over("dead-instance")  # a second survivor's attempt finds nothing to free
    assert await successor.acquire()
    assert successor.token == dead.token + 1  # the acquisition raised the fence
    # the "dead" owner resumed: its token is not the current one, which every fenced script checks
    # (bridge/idmap.py tb_fenced; tests/test_idmap.py shows such a write refused)
    assert await redis.get(successor.fence_key) == successor.fence.token.encode() != stale.token.encode()
    assert not await dead.renew()  # and its renewal fails: it stops


async def test_a_dead_owners_lease_is_freed_only_while_it_names_it(redis: Redis) -> None:
    await takes_over_only_from_the_named_owner(redis)


async def test_a_dead_owners_lease_is_freed_on_a_cluster(cluster: RedisCluster) -> None:
    await takes_over_only_from_the_named_owner(cluster)


async def judges_only_instances_it_saw_alive(redis: Redis | RedisCluster) -> None:
    here = Liveness(redis, "tb", "here", 30)
    await redis.set(alive_key("tb", "peer"), b"1", px=30_000)
    assert await here.judge(["here", "peer", "old-version"]) == (set(), 3)  # nobody dead; all three live
    await redis.delete(alive_key("tb", "peer"))  # its key lapsed
    assert await here.judge(["here", "peer", "old-version"]) == ({"peer"}, 2)  # never seen: "old-version" is live
    assert await here.judge(["here", "peer", "old-version"]) == (set(), 2)  # reported once, still counted out
    here.retry({"peer"})  # taking over failed part way
    assert await here.judge(["here", "peer", "old-version"]) == ({"peer"}, 2)
    await redis.set(alive_key("tb", "peer"), b"1", px=30_000)  # it was only slow
    assert await here.judge(["here", "peer", "old-version"]) == (set(), 3)
    await redis.delete(alive_key("tb", "peer"))
    assert await here.judge(["here", "old-version"]) == (set(), 2)  # left the instances set: forgotten
    assert await here.judge(["here", "peer", "old-version"]) == (set(), 3)  # back in it, not seen alive since


async def test_only_instances_seen_alive_are_judged_dead(redis: Redis) -> None:
    await judges_only_instances_it_saw_alive(redis)


async def test_alive_keys_in_many_slots_are_judged_on_a_cluster(cluster: RedisCluster) -> None:
    await judges_only_instances_it_saw_alive(cluster)


async def test_an_instance_judges_nobody_until_its_own_beats_held_for_a_window(redis: Redis) -> None:
    here = Liveness(redis, "tb", "here", 0.3)
    assert not await here.beat()  # its key did not exist: the window starts now
    await until(here.beat, what="a whole window of steady beats")
    assert await redis.pttl(here.key) > 0  # on Redis's clock
    await redis.delete(here.key)  # lapsed (Redis restarted empty, failed over, or we were frozen)
    assert not await here.beat()
    await until(here.beat, what="a window again")
    here.lapsed()  # a beat failed
    assert not await here.beat()
    await here.leave()
    assert await redis.exists(here.key) == 0


def load(tmp_path: Path, bus: str):
    path = tmp_path / "talkbridge.toml"
    path.write_text(API + "[bus]\n" + bus)
    return load_config(path, SPECS)


def test_takeover_seconds_defaults_to_three_or_half_a_short_lease(tmp_path: Path) -> None:
    assert load(tmp_path, "").bus.takeover_window == 3
    assert load(tmp_path, "LeaseSeconds = 4\n").bus.takeover_window == 2  # the default is always valid
    assert load(tmp_path, "LeaseSeconds = 30\nTakeoverSeconds = 5\n").bus.takeover_window == 5


@pytest.mark.parametrize(
    ("bus", "problem"),
    [
        ("TakeoverSeconds = 15\n", "bus.TakeoverSeconds: must be less than LeaseSeconds (15)"),
        ("LeaseSeconds = 4\nTakeoverSeconds = 5\n", "bus.TakeoverSeconds: must be less than LeaseSeconds (4)"),
        ("TakeoverSeconds = 0.5\n", "bus.TakeoverSeconds: must be"),
    ],
)
def test_a_takeover_window_not_shorter_than_the_lease_is_refused(tmp_path: Path, bus: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, bus)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
