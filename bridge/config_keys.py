"""The keys a config may hold, declared: each one's type, default and range
(bridge/options.py ``Option``), and where it takes effect.

- ``COMMON_OPTIONS``: Matterbridge's [general]-level keys, which every account
  understands (a protocol adds its own: its ``ProtocolSpec.options``);
- ``OWN_SECTIONS``: talkbridge's own top-level sections, ``[redis]``,
  ``[http]``, ``[bus]``, ``[workers]``, ``[instagram]``, ``[admin]``,
  ``[log]``, ``[alerts]``;
- ``PERSONA_OPTIONS``: a ``[persona.NAME]`` table;
- ``GATEWAY_OPTIONS``: talkbridge's keys on a ``[[gateway]]`` or in a
  channel entry's ``options``.

Declarations only: bridge/config_loader.py checks a file against them and
bridge/config.py holds what it builds; both find a key here whatever its
case (``find_option``), as Matterbridge's viper config does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bridge.options import Option

# The URL forms bridge/connections.py connects to; here so that checking a
# config needs no Redis client.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")

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
    # talkbridge's own: Instagram link previews in every room of the account
    # (workers/instagram.py; also per gateway and per channel: Config.instagram_enabled)
    "Instagram": Option(bool, default=False),
    "Charset": Option(str, default="", not_implemented="every protocol talkbridge bridges is UTF-8"),
}

# Sections of a Matterbridge config that hold no accounts.
MATTERBRIDGE_SECTIONS = {"general", "gateway", "samechannelgateway", "tengo"}


@dataclass(frozen=True, slots=True)
class OwnSection:
    """One of our own top-level sections and its keys."""

    options: dict[str, Option]


OWN_SECTIONS: dict[str, OwnSection] = {
    "redis": OwnSection(
        {
            "URL": Option(str, default="", secret=True, help="empty: embedded Redis"),
            "DataDir": Option(str, default="talkbridge-data"),
            "AppendFsync": Option(str, default="everysec", choices=("always", "everysec", "no")),
            "KeyPrefix": Option(str, default="tb"),
            "RedisServer": Option(str, default="", help="redis-server binary for the embedded default"),
        }
    ),
    "http": OwnSection(
        {
            "BindAddress": Option(str, default="127.0.0.1:4280"),
            "MaxBodyBytes": Option(int, default=1 << 20, min=1024),
            # every listener (this one, each api account's): bridge/listener.py
            "RequestTimeoutSeconds": Option(
                (int, float), default=10, above=0, max=86400, help="for a request head, then its body"
            ),
            "IdleTimeoutSeconds": Option(
                (int, float), default=75, above=0, max=86400, help="a kept-alive connection between requests"
            ),
            "MaxConnections": Option(int, default=1000, min=1, help="open connections per listener"),
            # who may read /metrics and /readyz's detail on this listener: bridge/http.py
            "MetricsFrom": Option(
                list, default=("127.0.0.0/8", "::1"), help="client addresses/networks trusted without the token"
            ),
            "MetricsToken": Option(
                str, default="", secret=True, help="a bearer token for /metrics and /readyz's detail (env:/file:)"
            ),
        }
    ),
    "bus": OwnSection(
        {
            "MaxDeliveries": Option(int, default=5, min=1),
            "RetryBaseSeconds": Option((int, float), default=0.5),
            "RetryMaxSeconds": Option((int, float), default=30.0),
            "StreamMaxLen": Option(int, default=0, help="0: trim only what was consumed"),
            "DeadLetterMaxLen": Option(int, default=100_000),
            "MessageMapDays": Option((int, float), default=7, above=0),
            "MessageMapPerRoom": Option(int, default=5000, min=100, help="copies a room's id map keeps"),
            "LeaseSeconds": Option((int, float), default=15, min=2),
            "BatchSize": Option(int, default=200, min=1),
        }
    ),
    # arq workers (`talkbridge worker`): workers/settings.py
    "workers": OwnSection(
        {
            # arq's default of 0.5 s caps a worker near 200 jobs/s and adds up to
            # half a second to every job (docs/benchmarks.md)
            "PollDelay": Option((int, float), default=0.05, above=0, max=10),
            "MaxJobs": Option(int, default=10, min=1, help="jobs one worker runs at a time"),
            "JobTimeout": Option((int, float), default=300, above=0),
            "KeepResultSeconds": Option((int, float), default=3600, min=0),
        }
    ),
    # Instagram link previews: workers/instagram.py, docs/instagram.md
    "instagram": OwnSection(
        {
            "RequestsPerMinute": Option(int, default=30, min=1, help="fetches per minute, all workers together"),
            "RoomRequestsPerMinute": Option(int, default=6, min=1, help="fetches per minute for one room"),
            "RateWindowSeconds": Option(
                (int, float), default=60, min=1, help="the window the two limits count in (60: per minute)"
            ),
            "CacheSeconds": Option((int, float), default=86400, min=0),
            "DedupeSeconds": Option((int, float), default=60, min=0),
            "CookiesFile": Option(str, default="", help="Netscape cookies file for logged-in fetching"),
            "MaxMediaBytes": Option(int, default=50_000_000, min=1),
            "QueueNoticeSeconds": Option((int, float), default=5, min=0),
            "FetchTimeout": Option((int, float), default=30, above=0),
            "MaxImages": Option(int, default=10, min=1),
        }
    ),
    # the management page (bridge/admin, docs/operations.md): served when User and Password are set
    "admin": OwnSection(
        {
            "BindAddress": Option(str, default="127.0.0.1:4281", help="its own listener; localhost unless set"),
            "User": Option(str, default=""),
            "Password": Option(
                str, default="", secret=True, help="the password (env:/file:), or its scrypt:/pbkdf2: hash"
            ),
            "SessionHours": Option((int, float), default=12, above=0, max=24 * 90),
            "MaxFailedLogins": Option(int, default=5, min=1, help="per client, within LockoutMinutes"),
            "MaxFailedLoginsAll": Option(int, default=50, min=1, help="from all clients, within LockoutMinutes"),
            "LockoutMinutes": Option((int, float), default=15, above=0, max=24 * 60),
            # a client that logged in may still try at the MaxFailedLoginsAll limit this long (0: nobody may)
            "KnownAddressDays": Option((int, float), default=30, min=0, max=3650, help="see MaxFailedLoginsAll"),
            "SecureCookie": Option(bool, default=False, help="true behind an HTTPS proxy"),
            # the names the page answers to, on any port (bridge/admin/web.py: DNS rebinding)
            "Hosts": Option(list, default=(), help="default: BindAddress's host, localhost, 127.0.0.1, ::1"),
            "RefreshSeconds": Option((int, float), default=2, min=0.5, max=60, help="live updates' interval"),
        }
    ),
    "log": OwnSection(
        {
            "Level": Option(str, default="info", choices=("debug", "info", "warning", "error")),
            "Format": Option(str, default="text", choices=("text", "json")),
        }
    ),
    # admin-room alerts (bridge/alerts.py, docs/operations-alerts.md); the room is [general] AdminRoom
    "alerts": OwnSection(
        {
            "FailedMinutes": Option((int, float), default=5, above=0, help="a room or account failing this long"),
            "DeadLetterThreshold": Option(int, default=1, min=1, help="dead letters within the window"),
            "DeadLetterWindowMinutes": Option((int, float), default=10, above=0),
            "MaxPerMinute": Option(int, default=10, min=1, help="messages to the admin room, whole fleet"),
            "RepeatMinutes": Option((int, float), default=10, min=0, help="a condition back this soon waits"),
            "CheckSeconds": Option((int, float), default=10, above=0, max=3600),
        }
    ),
}

# ``[persona.NAME]``: an LLM persona (workers/llm.py, docs/persona.md)
PERSONA_OPTIONS: dict[str, Option] = {
    "Name": Option(str, default="", help="the @-name that calls it; default: NAME"),
    "Endpoint": Option(str, required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1"),
    "Model": Option(str, required=True),
    "APIKey": Option(str, default="", secret=True),
    "SystemPrompt": Option(str, default=""),
    "SystemPromptFile": Option(str, default="", help="read into SystemPrompt"),
    "MaxTokens": Option(int, default=256, min=1),
    "Temperature": Option((int, float), default=0.7, min=0, max=2),
    "History": Option(int, default=10, min=0, max=200, help="recent room messages sent as context"),
    "Timeout": Option((int, float), default=55, above=0, max=3600),
}
MAX_PROMPT_BYTES = 64 * 1024
# Keys a [[gateway]] table may carry beside name, enable and its channels, and
# the same as a channel entry's ``options``: talkbridge's own.
GATEWAY_OPTIONS: dict[str, Option] = {
    "Instagram": Option(bool, default=None),
    "Persona": Option(str, default=None),
}

DIRECTIONS = ("inout", "in", "out")


def find_option(specs: Mapping[str, Option], low: str) -> Option | None:
    for key, spec in specs.items():
        if key.lower() == low:
            return spec
    return None
