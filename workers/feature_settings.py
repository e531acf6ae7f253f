"""The settings the workers read, declared here by the features that read
them, as an adapter declares its account keys: ``[workers]`` (the arq
worker itself: workers/settings.py), ``[instagram]`` (workers/instagram.py,
docs/instagram.md) and the keys of a ``[persona.NAME]`` table (workers/llm.py,
docs/persona.md).

Each is a ``FeatureSpec`` (bridge/options.py); the composition root
(bridge/cli.py) hands ``FEATURE_SPECS`` to ``load_config``, which checks the
file against them and builds the typed sections once
(``config.settings(InstagramSection)``). Declarations only: this module
imports nothing but the config layer, so checking a config pulls in neither
arq nor an HTTP client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.options import FeatureSpec, Option, setting

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


# ``[persona.NAME]``: an LLM persona. The loader reads the tables
# (bridge/config_loader.py: Name defaults to NAME, SystemPromptFile is read into SystemPrompt).
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


def warn_persona_timeouts(sections: Mapping[str, Any], personas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A persona whose Timeout does not fit in the job: the worker waits less."""
    job_timeout = sections["workers"].job_timeout
    left = job_timeout - JOB_MARGIN
    return [
        f"persona.{name}.Timeout: {persona['Timeout']} s does not fit in [workers] JobTimeout = "
        f"{job_timeout} s less {JOB_MARGIN} s; the worker waits {max(left, 0)} s for an answer"
        for name, persona in personas.items()
        if persona["Timeout"] > left
    ]


FEATURE_SPECS: tuple[FeatureSpec, ...] = (
    FeatureSpec("workers", sections={"workers": WorkersSection}),
    FeatureSpec("instagram", sections={"instagram": InstagramSection}),
    FeatureSpec("llm", persona_options=PERSONA_OPTIONS, warn=warn_persona_timeouts),
)
