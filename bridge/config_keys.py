"""The keys a config may hold, declared: each one's type, default and range
(bridge/options.py ``Option``), and where it takes effect.

- ``COMMON_OPTIONS``: Matterbridge's [general]-level keys, which every account
  understands (a protocol adds its own: its ``ProtocolSpec.options``; a
  feature its switches: ``FeatureSpec.account_options``);
- ``OWN_SECTIONS``: the core's own top-level sections, ``[redis]``,
  ``[http]``, ``[bus]``, ``[admin]``, ``[log]``, ``[alerts]``, each a typed
  section (bridge/options.py ``setting``): the loader builds it once and the
  program reads ``config.bus.stream_max_len``.

The workers' features declare the rest where they read it
(workers/feature_settings.py, a ``FeatureSpec`` each): their sections, the
switches they add to accounts, gateways and channel entries, and their
``[KIND.NAME]`` tables. The core declares no key of its own on a
``[[gateway]]`` or in a channel entry's ``options``.

Declarations only: bridge/config_loader.py checks a file against them and
bridge/config.py holds what it builds; both find a key here whatever its
case (``find_option``), as Matterbridge's viper config does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bridge.options import Option, setting

# The URL forms bridge/connections.py connects to; here so that checking a
# config needs no Redis client.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")

DEFAULT_TAKEOVER_SECONDS = 3.0  # [bus] TakeoverSeconds when unset (and LeaseSeconds is at least twice it)

_NO_MEDIA_SERVER = "talkbridge carries files itself and has no media server"

# Keys every account understands (Matterbridge's [general]-level options).
# Where each one takes effect is said beside it; the ones with
# ``not_implemented`` are accepted (a matterbridge.toml loads as it is) and
# warned about when set.
COMMON_OPTIONS: dict[str, Option] = {
    "RemoteNickFormat": Option(str, default="{NICK}"),  # router, destination's
    "IgnoreNicks": Option(str, default=""),  # router, source's
    "IgnoreMessages": Option(str, default=""),  # router, source's
    "ReplaceMessages": Option(list, default=()),  # router, source's
    "ReplaceNicks": Option(list, default=()),  # router, source's
    "Label": Option(str, default=""),  # router: {LABEL}
    "ShowJoinPart": Option(bool, default=False),  # router, destination's
    "NoSendJoinPart": Option(bool, default=False),  # router, source's
    "StripNick": Option(bool, default=False),  # router, destination's
    "MediaDownloadSize": Option(int, default=1_000_000, min=0),  # api: largest file accepted in a POST
    "MediaServerDownload": Option(str, default="", not_implemented=_NO_MEDIA_SERVER),
    "MediaDownloadPath": Option(str, default="", not_implemented=_NO_MEDIA_SERVER),
    "MediaDownloadBlackList": Option(list, default=(), not_implemented=_NO_MEDIA_SERVER),
    "MediaServerUpload": Option(str, default="", not_implemented=_NO_MEDIA_SERVER),
    "IconURL": Option(str, default=""),  # router, destination's: the avatar of a message without one
    "EditDisable": Option(bool, default=False),  # router, source's
    "EditSuffix": Option(str, default=""),  # router, source's
    "PrefixMessagesWithNick": Option(
        bool,
        default=False,
        not_implemented="a Talk bot always puts the nick before the text, an api account never does",
    ),
    # router, destination's: either lets an api client's topic_change events through
    "ShowTopicChange": Option(bool, default=False),
    "SyncTopic": Option(bool, default=False),
    # router, destination's; talkbridge's default is true (see the README)
    "PreserveThreading": Option(bool, default=True),
    "ExtractNicks": Option(list, default=(), not_implemented="not yet: rewrite nicks with ReplaceNicks"),
    "IgnoreFailureOnStart": Option(
        bool, default=False, not_implemented="an account that fails to start never stops the others"
    ),
    "MessageSplit": Option(bool, default=False, not_implemented="a Talk bot always splits long messages"),
    "MessageLength": Option(int, default=0, min=0, not_implemented="only a Talk bot account limits length"),
    "Debug": Option(bool, default=False, not_implemented='use [log] Level = "debug"'),
    "Charset": Option(str, default="", not_implemented="every protocol talkbridge bridges is UTF-8"),
}

# Sections of a Matterbridge config that hold no accounts.
MATTERBRIDGE_SECTIONS = {"general", "gateway", "samechannelgateway", "tengo"}


@dataclass(frozen=True, slots=True)
class RedisSection:
    """``[redis]``: bridge/connections.py; KeyPrefix starts every key."""

    url: str = setting("URL", Option(str, default="", secret=True, help="empty: embedded Redis"))
    data_dir: str = setting("DataDir", Option(str, default="talkbridge-data"))
    append_fsync: str = setting("AppendFsync", Option(str, default="everysec", choices=("always", "everysec", "no")))
    key_prefix: str = setting("KeyPrefix", Option(str, default="tb"))
    redis_server: str = setting(
        "RedisServer", Option(str, default="", help="redis-server binary for the embedded default")
    )
    # acknowledged writes wait for this many replicas (Redis WAIT): bridge/groupcommit.py, docs/operations.md
    min_replicas: int = setting(
        "MinReplicas", Option(int, default=0, min=0, help="replicas an acknowledged write waits for; 0: none")
    )
    replica_wait_seconds: float = setting(
        "ReplicaWaitSeconds",
        Option((int, float), default=2, above=0, max=60, help="how long it waits for them before answering 503"),
    )


@dataclass(frozen=True, slots=True)
class HttpSection:
    """``[http]``: the daemon's listener (bridge/daemon.py)."""

    bind_address: str = setting("BindAddress", Option(str, default="127.0.0.1:4280"))
    max_body_bytes: int = setting("MaxBodyBytes", Option(int, default=1 << 20, min=1024))
    # every listener (this one, each api account's): bridge/listener.py
    request_timeout_seconds: float = setting(
        "RequestTimeoutSeconds",
        Option((int, float), default=10, above=0, max=86400, help="for a request head, then its body"),
    )
    idle_timeout_seconds: float = setting(
        "IdleTimeoutSeconds",
        Option((int, float), default=75, above=0, max=86400, help="a kept-alive connection between requests"),
    )
    max_connections: int = setting(
        "MaxConnections", Option(int, default=1000, min=1, help="open connections per listener")
    )
    # who may read /metrics and /readyz's detail on this listener: bridge/http.py
    metrics_from: Sequence[str] = setting(
        "MetricsFrom",
        Option(list, default=("127.0.0.0/8", "::1"), help="client addresses/networks trusted without the token"),
    )
    metrics_token: str = setting(
        "MetricsToken",
        Option(str, default="", secret=True, help="a bearer token for /metrics and /readyz's detail (env:/file:)"),
    )


@dataclass(frozen=True, slots=True)
class BusSection:
    """``[bus]``: the streams (bridge/bus.py) and the delivery lanes."""

    max_deliveries: int = setting("MaxDeliveries", Option(int, default=5, min=1))
    retry_base_seconds: float = setting("RetryBaseSeconds", Option((int, float), default=0.5))
    retry_max_seconds: float = setting("RetryMaxSeconds", Option((int, float), default=30.0))
    stream_max_len: int = setting("StreamMaxLen", Option(int, default=0, help="0: trim only what was consumed"))
    dead_letter_max_len: int = setting("DeadLetterMaxLen", Option(int, default=100_000))
    message_map_days: float = setting("MessageMapDays", Option((int, float), default=7, above=0))
    message_map_per_room: int = setting(
        "MessageMapPerRoom", Option(int, default=5000, min=100, help="copies a room's id map keeps")
    )
    lease_seconds: float = setting("LeaseSeconds", Option((int, float), default=15, min=2))
    # a dead instance's accounts are taken over after this (bridge/lease.py, Liveness); unset: takeover_window
    takeover_seconds: float | None = setting(
        "TakeoverSeconds",
        Option((int, float), default=None, min=1, help="3 by default, half of LeaseSeconds when that is shorter"),
    )
    batch_size: int = setting("BatchSize", Option(int, default=200, min=1))

    @property
    def takeover_window(self) -> float:
        """How long an instance's heartbeat may lapse before the others take
        its accounts over: TakeoverSeconds, by default 3 s (half of
        LeaseSeconds when that is shorter, so the default is always valid)."""
        if self.takeover_seconds is not None:
            return float(self.takeover_seconds)
        return min(DEFAULT_TAKEOVER_SECONDS, self.lease_seconds / 2)

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for what the declarations cannot say."""
        if self.takeover_seconds is not None and self.takeover_seconds >= self.lease_seconds:
            return [("bus.TakeoverSeconds", f"must be less than LeaseSeconds ({self.lease_seconds:g})")]
        return []


@dataclass(frozen=True, slots=True)
class AdminSection:
    """``[admin]``: the management page (bridge/admin, docs/operations.md),
    served when User and Password are set."""

    bind_address: str = setting(
        "BindAddress", Option(str, default="127.0.0.1:4281", help="its own listener; localhost unless set")
    )
    user: str = setting("User", Option(str, default=""))
    password: str = setting(
        "Password",
        Option(str, default="", secret=True, help="the password (env:/file:), or its scrypt:/pbkdf2: hash"),
    )
    session_hours: float = setting("SessionHours", Option((int, float), default=12, above=0, max=24 * 90))
    max_failed_logins: int = setting(
        "MaxFailedLogins", Option(int, default=5, min=1, help="per client, within LockoutMinutes")
    )
    max_failed_logins_all: int = setting(
        "MaxFailedLoginsAll", Option(int, default=50, min=1, help="from all clients, within LockoutMinutes")
    )
    lockout_minutes: float = setting("LockoutMinutes", Option((int, float), default=15, above=0, max=24 * 60))
    # a client that logged in may still try at the MaxFailedLoginsAll limit this long (0: nobody may)
    known_address_days: float = setting(
        "KnownAddressDays", Option((int, float), default=30, min=0, max=3650, help="see MaxFailedLoginsAll")
    )
    secure_cookie: bool = setting("SecureCookie", Option(bool, default=False, help="true behind an HTTPS proxy"))
    # the names the page answers to, on any port (bridge/admin/web.py: DNS rebinding)
    hosts: Sequence[str] = setting(
        "Hosts", Option(list, default=(), help="default: BindAddress's host, localhost, 127.0.0.1, ::1")
    )
    refresh_seconds: float = setting(
        "RefreshSeconds", Option((int, float), default=2, min=0.5, max=60, help="live updates' interval")
    )


@dataclass(frozen=True, slots=True)
class LogSection:
    """``[log]``: bridge/cli.py setup_logging."""

    level: str = setting("Level", Option(str, default="info", choices=("debug", "info", "warning", "error")))
    format: str = setting("Format", Option(str, default="text", choices=("text", "json")))


@dataclass(frozen=True, slots=True)
class AlertsSection:
    """``[alerts]``: admin-room alerts (bridge/alerts.py, docs/operations-alerts.md);
    the room is [general] AdminRoom."""

    failed_minutes: float = setting(
        "FailedMinutes", Option((int, float), default=5, above=0, help="a room or account failing this long")
    )
    dead_letter_threshold: int = setting(
        "DeadLetterThreshold", Option(int, default=1, min=1, help="dead letters within the window")
    )
    dead_letter_window_minutes: float = setting("DeadLetterWindowMinutes", Option((int, float), default=10, above=0))
    max_per_minute: int = setting(
        "MaxPerMinute", Option(int, default=10, min=1, help="messages to the admin room, whole fleet")
    )
    repeat_minutes: float = setting(
        "RepeatMinutes", Option((int, float), default=10, min=0, help="a condition back this soon waits")
    )
    check_seconds: float = setting("CheckSeconds", Option((int, float), default=10, above=0, max=3600))


# The core's own sections, by name; the workers' features add theirs
# (bridge/options.py FeatureSpec, declared in workers/feature_settings.py).
OWN_SECTIONS: dict[str, type] = {
    "redis": RedisSection,
    "http": HttpSection,
    "bus": BusSection,
    "admin": AdminSection,
    "log": LogSection,
    "alerts": AlertsSection,
}

DIRECTIONS = ("inout", "in", "out")


def find_option(specs: Mapping[str, Option], low: str) -> Option | None:
    for key, spec in specs.items():
        if key.lower() == low:
            return spec
    return None
