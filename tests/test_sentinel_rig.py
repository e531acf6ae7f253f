"""The Sentinel rig itself: a real failover, and what a client sees of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.sentinel_rig import SentinelRig, _replication, running


@pytest.fixture
def sentinel_rig(tmp_path: Path) -> Iterator[SentinelRig]:
    with running(tmp_path) as rig:
        yield rig


def test_kill_master_promotes_a_replica_that_keeps_replicated_writes(sentinel_rig: SentinelRig) -> None:
    old = sentinel_rig.master_port()
    master = redis.Redis(port=old)
    master.set("kept", "yes")
    assert master.wait(2, 5000) == 2  # on both replicas before the kill
    master.close()

    assert sentinel_rig.kill_master() == old
    new = sentinel_rig.wait_failover(old)

    assert new != old and new in sentinel_rig.data_ports
    assert _replication(new)["role"] == "master"
    assert redis.Redis(port=new).get("kept") == b"yes"
    assert sentinel_rig.url.startswith("redis+sentinel://127.0.0.1:") and sentinel_rig.url.endswith("/talkbridge")
