"""Every Redis key talkbridge writes, named in one place.

Each function takes the key prefix (``[redis] KeyPrefix``, ``P`` below,
``tb`` by default) and what the key is about. docs/architecture.md ("Redis
keys") lists them with their owners.

The tag convention: every key of one account carries the hash tag
``{ACCOUNT}`` (the account's full name, ``protocol.name``), so on Redis
Cluster all of them hash to one slot — its lease and fencing token, its
inbound and outbound streams, its id maps, its control marks and its
adapter's own state (``account_key``, which ``AdapterContext.key`` builds) —
and one script may check the lease token and write any of them. Keys that
are no account's (the fleet's: ``P:control``, ``P:log``, ``P:dlq``, …) are
untagged, or tagged by what one script writes together (a room's LLM queue,
a rate limiter, the alerts hash and its companions). An account name never
holds ``{``, ``}``, ``:`` or ``\\x1f`` (the config loader allows letters,
digits, ``.``, ``-`` and ``_``), so no account's tag is a prefix of
another's and ``P:acct:{ACCOUNT}:*`` matches that account's keys only.

Keys written before this layout (``P:in:ACCOUNT``, ``P:acct:ACCOUNT:…``,
``{P:in:ACCOUNT}:…``, ``P:apibuf:{ACCOUNT}``) are named in
bridge/migrate_keys.py, which moves them.
"""

from __future__ import annotations

ID_MAP_SEP = "\x1f"  # in id map keys; never in account names, channel names or ids


def account_tag(account: str) -> str:
    """The Cluster hash tag of every key of ``account``."""
    return "{" + account + "}"


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes (its hash tag, between the
    first ``{`` and the first ``}`` after it, when not empty), or None when
    the whole key is hashed."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


# an account's keys ----------------------------------------------------------------
def inbound_key(prefix: str, account: str) -> str:
    """The stream of events an account received (bridge/bus.py)."""
    return f"{prefix}:in:{account_tag(account)}"


def current_stream_name(prefix: str, stream: str) -> str:
    """A stream as a dead letter names it: one written before this layout
    names an inbound stream ``P:in:ACCOUNT`` (bridge/migrate_keys.py), which
    is ``inbound_key`` now; any other name is returned as it is."""
    head = f"{prefix}:in:"
    account = stream[len(head) :]
    if stream.startswith(head) and account and not any(c in account for c in "{}:"):
        return inbound_key(prefix, account)
    return stream


def outbound_key(prefix: str, account: str) -> str:
    """The stream of deliveries for an account (bridge/bus.py)."""
    return f"{prefix}:out:{account_tag(account)}"


def account_key(prefix: str, account: str, *parts: str) -> str:
    """A key of one account's own: its adapter's state and receive cursors
    (``AdapterContext.key``), its rooms set."""
    return ":".join((prefix, "acct", account_tag(account), *parts))


def rooms_key(prefix: str, account: str) -> str:
    """The rooms an account is in, for gateways whose channel is ``*`` (bridge/rooms.py)."""
    return account_key(prefix, account, "rooms")


def key_layout_key(prefix: str, account: str) -> str:
    """The mark that the account's keys are in this layout (bridge/migrate_keys.py)."""
    return account_key(prefix, account, "key-layout")


def id_map_key(prefix: str, account: str, channel: str) -> str:
    """The base of a room's id map hashes (bridge/idmap.py appends ``␟n`` and ``␟GEN.BUCKET``)."""
    return f"{prefix}:m:{account_tag(account)}{ID_MAP_SEP}{channel}"


def lease_key(prefix: str, account: str) -> str:
    """Which daemon instance owns the account (bridge/lease.py)."""
    return f"{prefix}:lease:{account_tag(account)}"


def fence_key(prefix: str, account: str) -> str:
    """The account's fencing token, raised at every acquisition (bridge/lease.py)."""
    return f"{prefix}:fence:{account_tag(account)}"


def paused_key(prefix: str, account: str) -> str:
    return f"{prefix}:paused:{account_tag(account)}"


def restart_key(prefix: str, account: str) -> str:
    return f"{prefix}:restart:{account_tag(account)}"


def state_key(prefix: str, account: str) -> str:
    return f"{prefix}:state:{account_tag(account)}"


def degraded_key(prefix: str, account: str) -> str:
    return f"{prefix}:degraded:{account_tag(account)}"


# the fleet's keys -------------------------------------------------------------------
def dead_letters_key(prefix: str) -> str:
    return f"{prefix}:dlq"


def installation_mark_key(prefix: str) -> str:
    """A random id of this installation (every daemon on this Redis and
    prefix), set once: a client of another bridge marks what it posts there
    with it and drops what comes back carrying it (adapters/matterbridge)."""
    return f"{prefix}:mark"


def replicated_key(prefix: str) -> str:
    """Written by a replica barrier (bridge/groupcommit.py): a write for WAIT to wait on."""
    return f"{prefix}:replicated"


def control_channel(prefix: str) -> str:
    """The pub/sub channel of operators' requests (bridge/control.py)."""
    return f"{prefix}:control"


def instances_key(prefix: str) -> str:
    """The heartbeat sorted set: instance id -> expiry (ms since the epoch)."""
    return f"{prefix}:instances"


def instance_key(prefix: str, instance: str) -> str:
    return f"{prefix}:instance:{instance}"


def alive_key(prefix: str, instance: str) -> str:
    """An instance's liveness beat, expiring after ``[bus] TakeoverSeconds`` on Redis's clock (bridge/lease.py)."""
    return f"{prefix}:alive:{instance}"


def workers_key(prefix: str) -> str:
    """The workers' heartbeat sorted set: worker id -> expiry (ms since the epoch)."""
    return f"{prefix}:workers"


def worker_key(prefix: str, ident: str) -> str:
    return f"{prefix}:worker:{ident}"


def queue_name(prefix: str) -> str:
    """The arq queue every daemon enqueues to and every worker reads."""
    return f"{prefix}:arq:queue"


def rate_key(prefix: str, bucket: int) -> str:
    return f"{prefix}:rates:{bucket}"


def alerts_key(prefix: str) -> str:
    """The hash of current alerts (the dashboard's source)."""
    return f"{prefix}:alerts"


def alerts_aux_key(prefix: str, name: str) -> str:
    """A companion of the alerts hash, tagged with its name: the same Cluster slot."""
    return "{" + alerts_key(prefix) + "}:" + name


def log_key(prefix: str) -> str:
    """The capped stream of WARN+ records every instance writes (bridge/logstream.py)."""
    return f"{prefix}:log"


def redis_master_key(prefix: str) -> str:
    """The Redis master the fleet uses and its last failover (bridge/redis_watch.py)."""
    return f"{prefix}:redis:master"


def admin_session_key(prefix: str, token_sha256: str) -> str:
    return f"{prefix}:admin:session:{token_sha256}"


def admin_failed_key(prefix: str, client: str) -> str:
    return f"{prefix}:admin:failed:{client}"


def admin_failed_all_key(prefix: str) -> str:
    return f"{prefix}:admin:failed-all"


def admin_known_key(prefix: str, client: str) -> str:
    return f"{prefix}:admin:known:{client}"


# the workers' keys --------------------------------------------------------------------
def llm_room_key(prefix: str, room: str, part: str) -> str:
    """A room's LLM queue, requests, history, lock…, tagged by room (workers/llm_queue.py)."""
    return f"{prefix}:llm:{{{room}}}:{part}"


def llm_alerted_key(prefix: str, persona: str) -> str:
    return f"{prefix}:llm:alerted:{persona}"


def rate_limiter_key(prefix: str, name: str) -> str:
    """The base of a shared rate limiter's keys, tagged by its name (workers/ratelimit.py)."""
    return f"{prefix}:rl:{{{name}}}"


def instagram_breaker_key(prefix: str) -> str:
    return f"{prefix}:ig:breaker"


def instagram_cache_key(prefix: str, target: str) -> str:
    return f"{prefix}:ig:cache:{target}"


def instagram_seen_key(prefix: str, room: str, target: str) -> str:
    return f"{prefix}:ig:seen:{room}:{target}"


def instagram_notice_key(prefix: str, kind: str, room: str) -> str:
    return f"{prefix}:ig:notice:{kind}:{room}"
