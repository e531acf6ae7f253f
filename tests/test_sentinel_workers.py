"""Workers through ``redis+sentinel://`` across a failover: arq's poll loop
and a job's own Redis calls meet a dead master, and the worker carries on
with the promoted replica instead of exiting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from bridge.keys import workers_key
from tests.helpers import WorkerProcess, api_pair_config, wait_for
from tests.sentinel_rig import SentinelRig, running


@pytest.fixture
def sentinel_rig(tmp_path: Path) -> Iterator[SentinelRig]:
    with running(tmp_path / "rig") as rig:
        yield rig


def beating(port: int) -> list[bytes]:
    """The workers whose heartbeat is on the server at ``port``."""
    client = sync_redis.Redis(port=port)
    try:
        return client.zrange(workers_key("tb"), 0, -1)
    except sync_redis.ConnectionError:
        return []
    finally:
        client.close()


def test_a_worker_survives_the_master_killed_and_beats_on_the_promoted_replica(
    tmp_path: Path, sentinel_rig: SentinelRig
) -> None:
    path, _ = api_pair_config(tmp_path, sentinel_rig.url)
    worker = WorkerProcess(path, tmp_path / "worker.log").start()
    try:
        old = sentinel_rig.master_port()
        wait_for(lambda: beating(old), what="the worker's heartbeat")
        sentinel_rig.kill_master()
        new = sentinel_rig.wait_failover(old)
        # the beat is written afresh on the new master (its replicated copy is
        # removed first: the test sees a beat written after the failover)
        sync_redis.Redis(port=new).delete(workers_key("tb"))
        wait_for(lambda: beating(new) or worker.proc.poll() is not None, timeout=30, what="a beat after the failover")
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert beating(new)
    finally:
        worker.stop()
