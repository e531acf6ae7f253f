"""The settings the workers read, declared here by the features that read
them, as an adapter declares its account keys: ``[workers]`` (the arq
worker itself and where its queue lives: workers/settings.py), ``[instagram]`` and the ``Instagram``
switch on accounts, gateways and channel entries (workers/instagram.py,
docs/instagram.md), the ``[persona.NAME]`` tables and the ``Persona``
switch on gateways and channel entries (workers/llm.py, docs/persona.md; a
Talk bot account's own ``Persona`` key is its adapter's).

Each is a ``FeatureSpec`` (bridge/options.py); the composition root
(bridge/cli.py) hands ``FEATURE_SPECS`` to ``load_config``, which checks the
file against them and builds the typed sections once
(``config.settings(InstagramSection)``). What a persona table means (its
Name's default, its Endpoint's shape, SystemPromptFile read into
SystemPrompt) is said here too (``load_persona``), and which personas the
rooms name (``check_persona_names``). This module imports nothing but the
config layer, so checking a config pulls in neither arq nor an HTTP client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.config_keys import REDIS_SCHEMES
from bridge.options import FeatureSpec, Option, TableSpec, setting

if TYPE_CHECKING:
    from bridge.config import Config

# seconds a persona's job keeps free of [workers] JobTimeout to post the
# timeout message (workers/llm_job.py); a persona's Timeout beyond what is left is warned about
JOB_MARGIN = 3


@dataclass(frozen=True, slots=True)
class WorkersSection:
    """``[workers]``: arq workers (`talkbridge worker`), workers/settings.py."""

    # arq's default of 0.5 s caps a worker near 200 jobs/s and adds up to
    # half a second to every job (docs/benchmarks.md)
    poll_delay: float = setting("PollDelay", Option((int, float), default=0.05, above=0, max=10))
    max_jobs: int = setting("MaxJobs", Option(int, default=10, min=1, help="jobs one worker runs at a time"))
    job_timeout: float = setting("JobTimeout", Option((int, float), default=300, above=0))
    keep_result_seconds: float = setting("KeepResultSeconds", Option((int, float), default=3600, min=0))
    # arq's queue on a Redis of its own: arq does not run on Redis Cluster, the bus does (queue_redis_problem)
    redis_url: str = setting(
        "RedisURL", Option(str, default="", secret=True, help="the job queue's Redis; empty: [redis] URL's")
    )


# arq runs on one server's key space: a standalone Redis, or Sentinel's master (never a Cluster)
CLUSTER_SCHEME = "redis+cluster://"
QUEUE_SCHEMES = tuple(scheme for scheme in REDIS_SCHEMES if scheme != CLUSTER_SCHEME)


def check_queue_url(config: Config) -> list[str]:
    """``[workers] RedisURL``: a Redis arq can run on. Never echoes the value (it may hold a password)."""
    url = config.settings(WorkersSection).redis_url
    if not url or url.startswith(QUEUE_SCHEMES):
        return []
    if url.startswith(CLUSTER_SCHEME):
        return [
            "workers.RedisURL: arq does not run on Redis Cluster: name a standalone Redis (redis://, rediss://, "
            "unix://) or a Sentinel one (redis+sentinel://) for the job queue; [redis] URL may stay a Cluster"
        ]
    return [f"workers.RedisURL: must start with one of {', '.join(QUEUE_SCHEMES)}"]


def queue_redis_problem(config: Config) -> str | None:
    """Why the job queue has no Redis to run on (None: it has one): it
    stays on ``[redis] URL`` unless ``[workers] RedisURL`` says otherwise,
    and arq cannot run on a Cluster."""
    if config.settings(WorkersSection).redis_url or not config.redis.url.startswith(CLUSTER_SCHEME):
        return None
    return (
        "[redis] URL is a Redis Cluster, where arq (the job queue) does not run: set [workers] RedisURL "
        "to a standalone or Sentinel Redis for the queue (the bus stays on the Cluster)"
    )


def describe_queue(config: Config) -> list[str]:
    """What ``talkbridge check-config`` says of the job queue's Redis: never its URL."""
    return ["job queue: its own Redis ([workers] RedisURL)"] if config.settings(WorkersSection).redis_url else []


@dataclass(frozen=True, slots=True)
class InstagramSection:
    """``[instagram]``: Instagram link previews, workers/instagram.py, docs/instagram.md."""

    requests_per_minute: int = setting(
        "RequestsPerMinute", Option(int, default=30, min=1, help="fetches per minute, all workers together")
    )
    room_requests_per_minute: int = setting(
        "RoomRequestsPerMinute", Option(int, default=6, min=1, help="fetches per minute for one room")
    )
    rate_window_seconds: float = setting(
        "RateWindowSeconds",
        Option((int, float), default=60, min=1, help="the window the two limits count in (60: per minute)"),
    )
    cache_seconds: float = setting("CacheSeconds", Option((int, float), default=86400, min=0))
    dedupe_seconds: float = setting("DedupeSeconds", Option((int, float), default=60, min=0))
    cookies_file: str = setting(
        "CookiesFile", Option(str, default="", help="Netscape cookies file for logged-in fetching")
    )
    max_media_bytes: int = setting("MaxMediaBytes", Option(int, default=50_000_000, min=1))
    queue_notice_seconds: float = setting("QueueNoticeSeconds", Option((int, float), default=5, min=0))
    fetch_timeout: float = setting("FetchTimeout", Option((int, float), default=30, above=0))
    max_images: int = setting("MaxImages", Option(int, default=10, min=1))


# The Instagram switch: previews in every room of an account (or of
# [general]: every account's), of a gateway, or of one channel entry
# (``options``); workers/instagram.py ``instagram_enabled`` says which wins.
INSTAGRAM_ACCOUNT_OPTIONS: dict[str, Option] = {"Instagram": Option(bool, default=False)}
INSTAGRAM_ROOM_OPTIONS: dict[str, Option] = {"Instagram": Option(bool, default=None)}
# The persona answering @Name in a gateway's rooms or one channel entry's;
# workers/llm_trigger.py ``room_persona`` says which wins.
PERSONA_ROOM_OPTIONS: dict[str, Option] = {"Persona": Option(str, default=None)}

PERSONA_TABLE = "persona"
MAX_PROMPT_BYTES = 64 * 1024
# ``[persona.NAME]``: an LLM persona; ``load_persona`` makes what the workers read of a table.
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


def personas(config: Config) -> dict[str, dict[str, Any]]:
    """The ``[persona.NAME]`` tables as ``load_persona`` made them, by NAME
    (secrets resolved, SystemPromptFile read into SystemPrompt)."""
    return config.tables.get(PERSONA_TABLE, {})


def load_persona(name: str, values: dict[str, Any], base: Path) -> tuple[dict[str, Any], list[str]]:
    """One persona table, its keys checked: Name defaults to NAME,
    SystemPromptFile (relative to the config's directory) is read into
    SystemPrompt and dropped. Problems name the key."""
    values = dict(values)
    problems: list[str] = []
    endpoint = values["Endpoint"]
    if endpoint and not re.match(r"https?://[^/\s]+", endpoint):
        problems.append("Endpoint: must be an http:// or https:// URL")
    values["Name"] = values["Name"] or name
    if not re.fullmatch(r"[\w.-]{1,64}", values["Name"]):
        problems.append("Name: must be 1 to 64 letters, digits, '.', '-' or '_' (it is written @Name)")
    prompt_file = values.pop("SystemPromptFile")
    if prompt_file:
        if values["SystemPrompt"]:
            problems.append("SystemPromptFile: set SystemPrompt or SystemPromptFile, not both")
        target = Path(prompt_file).expanduser()
        target = target if target.is_absolute() else base / target
        try:
            data = target.read_bytes()
            if len(data) > MAX_PROMPT_BYTES:
                problems.append(f"SystemPromptFile: {target} is larger than 64 KiB")
            values["SystemPrompt"] = data.decode()
        except OSError as exc:
            problems.append(f"SystemPromptFile: cannot read {target}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            problems.append(f"SystemPromptFile: {target} is not UTF-8 text")
    return values, problems


def check_persona_names(config: Config) -> list[str]:
    """Every persona an account, a gateway or a channel names is defined."""
    named = [(f"{a.name}.Persona", a.values.get("persona")) for a in config.accounts.values()]
    for gw in config.gateways:
        named.append((f'gateway "{gw.name}".Persona', gw.options.get("Persona") or ""))
        named.extend(
            (f'gateway "{gw.name}" {e.account}:{e.channel} options.Persona', e.options.get("Persona"))
            for e in gw.entries
        )
    defined = personas(config)
    return [f"{where}: no [persona.{name}] is defined" for where, name in named if name and name not in defined]


def warn_persona_timeouts(config: Config) -> list[str]:
    """A persona whose Timeout does not fit in the job: the worker waits less."""
    job_timeout = config.settings(WorkersSection).job_timeout
    left = job_timeout - JOB_MARGIN
    return [
        f"persona.{name}.Timeout: {persona['Timeout']} s does not fit in [workers] JobTimeout = "
        f"{job_timeout} s less {JOB_MARGIN} s; the worker waits {max(left, 0)} s for an answer"
        for name, persona in personas(config).items()
        if persona["Timeout"] > left
    ]


def describe_personas(config: Config) -> list[str]:
    """What ``talkbridge check-config`` prints of the personas: never the APIKey."""
    defined = personas(config)
    if not defined:
        return []
    lines = [f"personas ({len(defined)}):"]
    for name, persona in defined.items():
        lines.append(f"  {name}  (@{persona['Name']}, {persona['Model']} at {persona['Endpoint']})")
    return lines


FEATURE_SPECS: tuple[FeatureSpec, ...] = (
    FeatureSpec("workers", sections={"workers": WorkersSection}, check=check_queue_url, describe=describe_queue),
    FeatureSpec(
        "instagram",
        sections={"instagram": InstagramSection},
        account_options=INSTAGRAM_ACCOUNT_OPTIONS,
        room_options=INSTAGRAM_ROOM_OPTIONS,
    ),
    FeatureSpec(
        "llm",
        room_options=PERSONA_ROOM_OPTIONS,
        tables={PERSONA_TABLE: TableSpec(PERSONA_OPTIONS, load=load_persona)},
        check=check_persona_names,
        warn=warn_persona_timeouts,
        describe=describe_personas,
    ),
)
