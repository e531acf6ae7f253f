"""Prometheus metrics, on a registry passed in (never the global one)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _asyncio_tasks() -> float:
    """Tasks alive on the running loop (a scrape runs inside it); NaN outside one."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return float("nan")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...
        ProcessCollector(registry=r)
        # python_gc_collections_total{generation}, python_gc_objects_collected_total: the
        # daemon raises the collector's thresholds (bridge/cli.py), so watch what it leaves
        GCCollector(registry=r)
        self.asyncio_tasks = Gauge(
            "talkbridge_asyncio_tasks", "asyncio tasks alive in the daemon's event loop (at scrape time)", registry=r
        )
        self.asyncio_tasks.set_function(_asyncio_tasks)
        self.events_in = Counter("talkbridge_events_in", "Events accepted from a network", ["account"], registry=r)
        self.events_out = Counter("talkbridge_events_out", "Events delivered to a network", ["account"], registry=r)
        self.skipped = Counter(
            "talkbridge_deliveries_skipped",
            "Deliveries not sent (already delivered, or nothing to edit/react to)",
            ["account", "reason"],
            registry=r,
        )
        self.rejected = Counter(
            "talkbridge_ingress_rejected", "Inbound requests refused", ["account", "reason"], registry=r
        )
        self.delivery_errors = Counter(
            "talkbridge_delivery_errors", "Failed delivery attempts", ["account", "kind"], registry=r
        )
        self.dead_letters = Counter(
            "talkbridge_dead_letters", "Entries moved to the dead-letter stream", ["stream"], registry=r
        )
        self.latency = Histogram(
            "talkbridge_delivery_latency_seconds",
            "From the source event to its delivery",
            ["account"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_length = Gauge("talkbridge_stream_length", "Entries in a stream", ["stream"], registry=r)
        self.stream_lag = Gauge(
            "talkbridge_stream_lag", "Entries not yet read by the consumer group", ["stream"], registry=r
        )
        self.stream_pending = Gauge(
            "talkbridge_stream_pending", "Entries read but not acknowledged", ["stream"], registry=r
        )
        self.stream_oldest_pending = Gauge(
            "talkbridge_stream_oldest_pending_seconds", "Age of the oldest unacknowledged entry", ["stream"], registry=r
        )
        self.dlq_length = Gauge("talkbridge_dead_letter_length", "Entries in the dead-letter stream", registry=r)
        self.account_connected = Gauge(
            "talkbridge_account_connected",
            "1 while this instance holds the account and is connected",
            ["account"],
            registry=r,
        )
        self.account_failed = Gauge(
            "talkbridge_account_failed",
            "1 when the account's credentials were refused (alert on this)",
            ["account"],
            registry=r,
        )
        self.room_failed = Gauge(
            "talkbridge_room_failed",
            "1 while one room of a polling account fails (retried with backoff, never dropped; the log says why)",
            ["account", "room"],
            registry=r,
        )
        self.account_restarts = Counter(
            "talkbridge_account_restarts",
            "Accounts restarted after an error nobody foresaw (the log has its traceback)",
            ["account"],
            registry=r,
        )
        self.receive_restarts = Counter(
            "talkbridge_receive_restarts",
            "An adapter's receive loop started again after it raised or returned (the log says why)",
            ["account"],
            registry=r,
        )
        self.api_buffer_dropped = Counter(
            "talkbridge_api_buffer_dropped", "Messages pushed out of a full api Buffer", ["account"], registry=r
        )
        # Redis itself (issue 20): reachability, Sentinel failovers, replicas behind acknowledgements
        self.redis_up = Gauge(
            "talkbridge_redis_up", "1 while this instance's Redis answers, 0 while it does not", registry=r
        )
        self.redis_failovers = Counter(
            "talkbridge_redis_failovers", "Times this instance found a new Redis master (Sentinel failover)", registry=r
        )
        self.redis_replicas = Gauge(
            "talkbridge_redis_replicas", "Replicas connected to the Redis master, as the master reports", registry=r
        )
        self.redis_min_replicas = Gauge(
            "talkbridge_redis_min_replicas",
            "[redis] MinReplicas: replicas every acknowledged write waits for",
            registry=r,
        )
        self.replication_short = Counter(
            "talkbridge_replication_short",
            "Writes fewer than MinReplicas replicas confirmed in time (an ingress answered 503, a delivery held back)",
            ["what"],
            registry=r,
        )
        self.lease_takeovers = Counter(
            "talkbridge_lease_takeovers",
            "Accounts this instance took from an instance whose heartbeat lapsed",
            ["account"],
            registry=r,
        )
