"""``[matterbridge.NAME]`` in the config: what check-config understands and
says, and the one line it answers for each mistake (exit 2, nothing started)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from adapters import AdapterRegistry
from bridge.cli import main
from bridge.config import Config, ConfigError, load_config
from bridge.options import protocol_specs
from tests.helpers import ConfigToml


def config_text(**keys: object) -> str:
    account = {"URL": "http://127.0.0.1:4242", "Token": "env:MB_TOKEN", **keys}
    account = {k: v for k, v in account.items() if v is not None}
    toml = ConfigToml().section("matterbridge.mb", **account).api("local", 5001)
    return toml.gateway("g", ("matterbridge.mb", "team"), ("api.local", "api")).text()


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "talkbridge.toml"
    path.write_text(text)
    return load_config(path, protocol_specs(AdapterRegistry()), environ={"MB_TOKEN": "t0ken", **(environ or {})})


def test_check_config_says_what_it_understood_and_never_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MB_TOKEN", "s3cret-token")
    path = tmp_path / "talkbridge.toml"
    path.write_text(config_text(Receive="Stream"))
    buffer = io.StringIO()
    assert main(["check-config", str(path)], out=buffer) == 0
    out = buffer.getvalue()
    assert (
        "matterbridge.mb  (matterbridge, receives http://127.0.0.1:4242/api/stream; "
        "posts to http://127.0.0.1:4242/api/message)" in out
    )
    assert "inout  matterbridge.mb  team" in out
    assert "s3cret-token" not in out


def test_the_keys_and_their_defaults(tmp_path: Path) -> None:
    acct = load(tmp_path, config_text()).accounts["matterbridge.mb"]
    assert acct.get("Token") == "t0ken"  # env: resolved
    assert (acct.get("Receive"), acct.get("PollSeconds"), acct.get("ReplayWindow")) == ("auto", 1, 10000)
    assert (acct.get("EditFormat"), acct.get("ReactionFormat"), acct.get("DeleteFormat")) == ("{TEXT} (edited)", "", "")


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"URL": None}, "matterbridge.mb.URL: is required"),
        ({"URL": "ftp://host"}, 'matterbridge.mb.URL: "ftp://host" is not an http(s) URL'),
        ({"URL": "http://"}, 'matterbridge.mb.URL: "http://" is not an http(s) URL'),
        ({"URL": "http://h:4242/api"}, "must be the base URL"),
        ({"URL": "http://h:4242/?token=x"}, "must be the base URL"),
        ({"URL": 4242}, 'matterbridge.mb.URL: "4242" is not an http(s) URL'),  # weakly typed, as viper reads it
        ({"Receive": "carrier-pigeon"}, "matterbridge.mb.Receive: must be"),
        ({"PollSeconds": 0}, "matterbridge.mb.PollSeconds: must be more than 0"),
        ({"ReplayWindow": 5}, "matterbridge.mb.ReplayWindow: must be at least 100"),
        ({"Token": "env:NOT_SET_ANYWHERE"}, "NOT_SET_ANYWHERE"),
    ],
)
def test_each_mistake_is_one_line_naming_the_key(tmp_path: Path, keys: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, config_text(**keys))
    assert len(err.value.problems) == 1 and problem in err.value.problems[0], err.value.problems


def test_a_missing_token_is_a_warning(tmp_path: Path) -> None:
    config = load(tmp_path, config_text(Token=None))
    assert any("matterbridge.mb: no Token" in w for w in config.warnings)


def test_check_config_exits_2_on_a_bad_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MB_TOKEN", "t")
    path = tmp_path / "talkbridge.toml"
    path.write_text(config_text(URL="localhost:4242"))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['matterbridge.mb.URL: "localhost:4242" is not an http(s) URL']
