"""Typed config sections and the features' own declarations: what a file
sets is read back by attribute, secrets stay out of reprs, and the workers'
sections, switches and tables are known only when their declarations are
handed to the loader (tests/test_architecture.py: the core names none of them)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import AdapterRegistry
from bridge.config import ConfigError, load_config
from bridge.options import protocol_specs, section_values
from workers.feature_settings import FEATURE_SPECS, JOB_MARGIN, InstagramSection, WorkersSection

SPECS = protocol_specs(AdapterRegistry())
API = '[api.a]\nBindAddress = "127.0.0.1:0"\nToken = "t"\n'
PERSONA = '[persona.ada]\nEndpoint = "http://127.0.0.1:9/v1"\nModel = "m"\nTimeout = 55\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "talkbridge.toml"
    path.write_text(text)
    return path


def test_sections_are_read_by_attribute_and_frozen(tmp_path: Path) -> None:
    text = API + (
        '[redis]\nURL = "redis://:hunter2secret@db:6379/0"\nkeyprefix = "tb2"\n'
        "[bus]\nStreamMaxLen = 5000\n[http]\nMetricsFrom = ['10.0.0.0/8']\n"
        "[workers]\nJobTimeout = 90\n[instagram]\nMaxImages = 3\n"
    )
    config = load_config(write(tmp_path, text), SPECS, features=FEATURE_SPECS)
    assert (config.redis.key_prefix, config.bus.stream_max_len, config.bus.batch_size) == ("tb2", 5000, 200)
    assert config.http.metrics_from == ["10.0.0.0/8"]
    assert config.settings(WorkersSection).job_timeout == 90
    assert config.settings(InstagramSection).max_images == 3
    assert config.section("redis")["KeyPrefix"] == "tb2"  # the same values by key, as the file spells them
    assert section_values(config.bus) == config.section("bus")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bus.batch_size = 1  # type: ignore[misc]
    assert "hunter2secret" not in repr(config.redis) and "url" not in repr(config.redis)


def test_a_persona_timeout_beyond_the_job_is_warned_about_with_the_margin(tmp_path: Path) -> None:
    text = API + PERSONA + "[workers]\nJobTimeout = 30\n"
    config = load_config(write(tmp_path, text), SPECS, features=FEATURE_SPECS)
    assert config.warnings == [
        f"persona.ada.Timeout: 55 s does not fit in [workers] JobTimeout = 30 s less {JOB_MARGIN} s; "
        f"the worker waits {30 - JOB_MARGIN} s for an answer"
    ]
    fits = load_config(
        write(tmp_path, text.replace("JobTimeout = 30", "JobTimeout = 58")), SPECS, features=FEATURE_SPECS
    )
    assert fits.warnings == []


def test_the_workers_sections_are_the_features_declarations(tmp_path: Path) -> None:
    """Without them (a loader handed the adapters' specs only), [workers] and
    [persona.NAME] are not known; with them, a bad key is named as before."""
    with pytest.raises(ConfigError) as bare:
        load_config(write(tmp_path, API + "[workers]\nMaxJobs = 2\n" + PERSONA), SPECS)
    assert bare.value.problems == [
        'workers: protocol "workers" is not supported (supported: api, matrix, matterbridge, nctalk, nctalkbot)',
        'persona: protocol "persona" is not supported (supported: api, matrix, matterbridge, nctalk, nctalkbot)',
    ]
    with pytest.raises(ConfigError) as bad:
        load_config(write(tmp_path, API + "[instagram]\nMaxImages = 0\nColour = 1\n"), SPECS, features=FEATURE_SPECS)
    assert bad.value.problems[0] == "instagram.MaxImages: must be at least 1"
    assert bad.value.problems[1].startswith("instagram.Colour: unknown key (known: RequestsPerMinute, ")


def test_the_features_declarations_import_no_worker_machinery() -> None:
    """The CLI hands them to every config check (check-config too): reading
    them pulls in neither arq nor an HTTP client nor Redis."""
    code = (
        "import sys, workers.feature_settings\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('arq', 'httpx', 'redis', 'aiohttp'))\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


SWITCHES = (
    "[general]\nInstagram = true\n"
    + API.replace('Token = "t"\n', 'Token = "t"\nInstagram = true\n')
    + '[api.b]\nBindAddress = "127.0.0.1:0"\nToken = "u"\n'
    + '[[gateway]]\nname = "g"\nenable = true\nInstagram = true\nPersona = "ada"\n'
    + '[[gateway.inout]]\naccount = "api.a"\nchannel = "api"\noptions = { Instagram = "yes" }\n'
    + '[[gateway.inout]]\naccount = "api.b"\nchannel = "api"\n'
)


def test_the_features_switches_are_unknown_keys_without_their_declarations(tmp_path: Path) -> None:
    """A loader handed the adapters' specs only knows no Instagram or Persona
    switch: on an account or a gateway they are unknown keys like any other
    (warned about and ignored), in a channel entry's options they are ignored
    like Matterbridge's; with the declarations they are checked."""
    bare = load_config(write(tmp_path, SWITCHES), SPECS)
    assert bare.warnings == [
        "api.a.Instagram: unknown key, ignored",
        "gateway[0].Instagram: unknown key, ignored",
        "gateway[0].Persona: unknown key, ignored",
    ]
    assert [gw.options for gw in bare.gateways] == [{}]
    assert [e.options for e in bare.gateways[0].entries] == [{}, {}]
    with pytest.raises(ConfigError) as declared:
        load_config(write(tmp_path, SWITCHES), SPECS, features=FEATURE_SPECS)
    assert declared.value.problems == [
        "gateway[0].inout[0].options.Instagram: must be true or false, not a string",
        'gateway "g".Persona: no [persona.ada] is defined',
    ]
