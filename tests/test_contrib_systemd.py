"""contrib/talkbridge.service and its config: systemd accepts the unit
(``systemd-analyze verify``, Debian's ``systemd`` package), rates it well
hardened (``systemd-analyze security --offline``), it carries the hardening
the issue asks for, and every secret the example config reads comes from
the unit's LoadCredential through ``file:${CREDENTIALS_DIRECTORY}/NAME``
(seed 001's pattern), which ``talkbridge check-config`` resolves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

UNIT = ROOT / "contrib" / "talkbridge.service"
CONFIG = ROOT / "contrib" / "talkbridge.toml"
EXEC = "/opt/talkbridge/bin/talkbridge"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is missing: apt-get install systemd"
    return found


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values, as systemd reads a unit (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"a key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit, its ExecStart pointed at this checkout's talkbridge (verify
    checks that the binary exists and is executable)."""
    here = shutil.which("talkbridge", path=str(Path(sys.executable).parent))
    assert here is not None
    text = UNIT.read_text()
    assert EXEC in text
    path = tmp_path / "talkbridge.service"
    path.write_text(text.replace(EXEC, here))
    return path


def test_systemd_verify_accepts_the_unit_without_a_word(unit_here: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", unit_here.name],
        cwd=unit_here.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 even for an unknown key: it must also say nothing
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result


def test_systemd_rates_the_unit_ok(unit_here: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", unit_here.name],
        cwd=unit_here.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result
    score = re.search(r"Overall exposure level for talkbridge\.service: (\d+\.\d+) (\w+)", result.stdout)
    assert score is not None, result.stdout
    assert float(score.group(1)) <= 2.0 and score.group(2) == "OK", score.group(0)


def test_the_unit_is_hardened_as_asked() -> None:
    service = unit_keys(UNIT.read_text())["Service"]
    expected = {
        "DynamicUser": ["yes"],
        "StateDirectory": ["talkbridge"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "NoNewPrivileges": ["yes"],
        "CapabilityBoundingSet": [""],
        "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["2"],  # a bad config: a restart loop cannot fix it
        "UMask": ["0077"],
    }
    for key, values in expected.items():
        assert service.get(key) == values, (key, service.get(key))
    assert service["ExecStart"] == [f"{EXEC} run --config /etc/talkbridge/talkbridge.toml"]
    assert not any(key.startswith("Environment") and "SECRET" in " ".join(v).upper() for key, v in service.items())


def test_every_secret_of_the_config_is_a_credential_of_the_unit() -> None:
    service = unit_keys(UNIT.read_text())["Service"]
    credentials = {value.split(":", 1)[0] for value in service["LoadCredential"]}
    live = "\n".join(line for line in CONFIG.read_text().splitlines() if not line.lstrip().startswith("#"))
    named = set(re.findall(r'"file:\$\{CREDENTIALS_DIRECTORY\}/([\w.-]+)"', live))
    assert credentials == named == {"bot-secret", "api-token", "admin-password"}
    assert all(value.split(":", 1)[1].startswith("/etc/talkbridge/credentials/") for value in service["LoadCredential"])


def check_config(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"} | environ
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", "check-config", str(CONFIG)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_reads_the_secrets_from_the_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "bot-secret").write_text("b" * 64 + "\n")
    (tmp_path / "api-token").write_text("a-token\n")
    (tmp_path / "admin-password").write_text("a long enough password\n")
    ok = check_config({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert ok.returncode == 0, ok.stderr
    assert f"{CONFIG}: OK" in ok.stdout and "b" * 64 not in ok.stdout + ok.stderr  # never printed
    # outside systemd, the variable is not set: each secret says so, naming its key
    refused = check_config({})
    assert refused.returncode == 2
    assert "nctalkbot.cloud.BotSecret: environment variable CREDENTIALS_DIRECTORY is not set" in refused.stderr
    assert "api.tools.Token: environment variable CREDENTIALS_DIRECTORY is not set" in refused.stderr
    # a credential the service was not given
    (tmp_path / "api-token").unlink()
    missing = check_config({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert missing.returncode == 2
    assert f"api.tools.Token: cannot read {tmp_path}/api-token: No such file or directory" in missing.stderr
