"""Config loading: Matterbridge files as they are, and clear errors for bad ones."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import AdapterRegistry
from bridge.cli import main
from bridge.config import ConfigError, load_config
from bridge.options import Option, ProtocolSpec, protocol_specs
from tests.helpers import Daemon, RedisServer, api_pair_config

# Seed 002's federation config, straight quotes. nctalk is described here only
# by the keys the loader needs; the protocol itself is another issue.
SEED_002 = """
## Account 1 - matterbot@nube.nube1.com
[nctalk.nube-minube1-com]
Server="https://nube.minube1.com"
Login="matterbot"
Password="app-password-1"
RemoteNickFormat="[{NICK}@{BRIDGE}] "
## Account 2 - matterbot@nube.nube2.com
[nctalk.nube-minube2-com]
Server="https://nube.minube2.com"
Login="matterbot"
Password="app-password-2"
RemoteNickFormat="[{NICK}@{BRIDGE}] "
## Gateway 1
[[gateway]]
name="gateway-minube1-minube2"
enable=true
[[gateway.inout]]
account="nctalk.nube-minube1-com"
channel="token1"
[[gateway.inout]]
account="nctalk.nube-minube2-com"
channel="token2"
"""

NCTALK = ProtocolSpec(
    "nctalk",
    {"Server": Option(str, required=True), "Login": Option(str, required=True), "Password": Option(str, secret=True)},
)


def specs(**extra: ProtocolSpec) -> dict[str, ProtocolSpec]:
    return {**protocol_specs(AdapterRegistry()), **extra}


def write(tmp_path: Path, text: str, name: str = "bridge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), specs(nctalk=NCTALK), **kw)
    return err.value.problems


API_PAIR = """
[api.a]
BindAddress = "127.0.0.1:5001"
[api.b]
BindAddress = "127.0.0.1:5002"
[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "api.a"
channel = "api"
[[gateway.inout]]
account = "api.b"
channel = "api"
"""


def test_seed_002_config_loads_as_is(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SEED_002), specs(nctalk=NCTALK))
    assert sorted(config.accounts) == ["nctalk.nube-minube1-com", "nctalk.nube-minube2-com"]
    acct = config.accounts["nctalk.nube-minube1-com"]
    assert acct.get("Server") == "https://nube.minube1.com"
    assert acct.get("remotenickformat") == "[{NICK}@{BRIDGE}] "  # viper keys are case-insensitive
    [gw] = config.gateways
    assert gw.name == "gateway-minube1-minube2"
    assert [(e.account, e.channel, e.direction) for e in gw.entries] == [
        ("nctalk.nube-minube1-com", "token1", "inout"),
        ("nctalk.nube-minube2-com", "token2", "inout"),
    ]


def test_seed_002_loads_with_the_real_nctalk_adapter(tmp_path: Path) -> None:
    """With adapters/nctalk/ in PROTOCOLS, seed 002 loads through the real
    registry (its options, not the stub's): unchanged, no problems."""
    config = load_config(write(tmp_path, SEED_002), specs())
    assert sorted(config.accounts) == ["nctalk.nube-minube1-com", "nctalk.nube-minube2-com"]
    assert config.accounts["nctalk.nube-minube1-com"].protocol == "nctalk"


def test_an_unsupported_protocol_is_named_with_the_supported_ones(tmp_path: Path) -> None:
    text = SEED_002.replace("[nctalk.nube-minube1-com]", "[telegram.nube-minube1-com]")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), specs())
    assert any('protocol "telegram" is not supported (supported: api' in p for p in err.value.problems)


def test_typographic_quotes_get_a_hint(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, "[api.a]\nBindAddress=»127.0.0.1:1«\n")
    assert "not valid TOML" in problem and "straight" in problem


def test_account_value_falls_back_to_general(tmp_path: Path) -> None:
    text = '[general]\nRemoteNickFormat = "<{NICK}> "\nIgnoreNicks = "bot1 bot2"\n' + API_PAIR.replace(
        "[api.b]\n", '[api.b]\nRemoteNickFormat = "{NICK}: "\n'
    )
    config = load_config(write(tmp_path, text), specs())
    assert config.accounts["api.a"].get("RemoteNickFormat") == "<{NICK}> "
    assert config.accounts["api.b"].get("RemoteNickFormat") == "{NICK}: "
    assert config.accounts["api.b"].get("IgnoreNicks") == "bot1 bot2"
    assert config.accounts["api.a"].get("Buffer") == 1000  # the adapter's default


def test_unknown_gateway_account_is_named(tmp_path: Path) -> None:
    text = API_PAIR + '[[gateway.inout]]\naccount = "nctalk.foo"\nchannel = "x"\n'
    assert problems(tmp_path, text) == ['gateway[0].inout[2].account: no account "nctalk.foo"']


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    text = """
[api.a]
BindAddress = 5001
Buffer = "big"
IgnoreMessages = "(unclosed"
ReplaceNicks = [["a"]]
[api.b]
Token = "env:TB_TEST_UNSET_VARIABLE"
[redis]
URL = "file:does-not-exist"
Colour = "blue"
[[gateway]]
enable = "yes"
[[gateway.in]]
channel = "api"
"""
    found = problems(tmp_path, text, environ={})
    assert 'api.a.BindAddress: "5001" is not HOST:PORT' in found  # read as the string "5001", as viper does
    assert "api.a.Buffer: must be an integer, not a string" in found
    assert any(p.startswith("api.a.IgnoreMessages: bad regular expression '(unclosed'") for p in found)
    assert 'api.a.ReplaceNicks[0]: must be a pair of strings ["regex", "replacement"]' in found
    assert "api.b.Token: environment variable TB_TEST_UNSET_VARIABLE is not set" in found
    assert "api.b.BindAddress: is required" in found
    assert any(p.startswith("redis.URL: cannot read ") for p in found)
    assert any(p.startswith("redis.Colour: unknown key") for p in found)
    assert "gateway[0].name: is required (a non-empty string)" in found
    assert "gateway[0].enable: must be true or false, not a string" in found
    assert 'gateway[0].in[0].account: is required (a string like "api.myapi")' in found


def test_secrets_from_env_and_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-a-file\n")
    text = API_PAIR.replace("[api.a]\n", '[api.a]\nToken = "env:TB_TOKEN"\n').replace(
        "[api.b]\n", '[api.b]\nToken = "file:token"\n'
    )
    config = load_config(write(tmp_path, text), specs(), environ={"TB_TOKEN": "from-env"})
    assert config.accounts["api.a"].get("Token") == "from-env"
    assert config.accounts["api.b"].get("Token") == "from-a-file"
    assert "from-env" not in repr(config.accounts["api.a"])


def test_a_bad_redis_url_is_named_but_never_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, API_PAIR + '[redis]\nURL = "http://user:hunter2@redis.internal:6379"\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("redis.URL: must start with one of redis://")
    assert "hunter2" not in err


def test_disabled_gateway_is_skipped_with_a_warning(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, API_PAIR.replace("enable = true", "enable = false")), specs())
    assert config.gateways == []
    assert any('gateway "g" is not enabled' in w for w in config.warnings)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[[gateway]]\nname='g'\nenable=true\n[[gateway]]\nname='g'\nenable=true\n", 'gateway "g" is defined twice'),
        ("[api]\n", "must hold accounts as [api.NAME] tables"),
        ("[api.'bad name']\nBindAddress='127.0.0.1:1'\n", "account names may use letters"),
        ("[api.a]\nBindAddress='nowhere'\n", 'api.a.BindAddress: "nowhere" is not HOST:PORT'),
        ("[http]\nBindAddress='x'\n", 'http.BindAddress: "x" is not HOST:PORT'),
        ("[bus]\nMaxDeliveries=0\n", "bus.MaxDeliveries: must be at least 1"),
        ("[redis]\nAppendFsync='sometimes'\n", "redis.AppendFsync: must be always, everysec or no"),
        ("gateway = 3\n", "gateway: must be an array of tables"),
        ("[irc.libera]\nServer='irc.libera.chat'\n", 'protocol "irc" is not supported'),
    ],
)
def test_bad_shapes(tmp_path: Path, text: str, expected: str) -> None:
    assert any(expected in p for p in problems(tmp_path, text)), problems(tmp_path, text)


def test_oversized_and_binary_files_are_refused(tmp_path: Path) -> None:
    big = write(tmp_path, "# " + "x" * (1 << 20) + "\n", "big.toml")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big, specs())
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00[api.a]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary, specs())
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", specs())


def test_check_config_cli_prints_accounts_and_gateways_never_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, API_PAIR.replace("[api.a]\n", '[api.a]\nToken = "s3cret-value"\n'))
    out = io.StringIO()
    assert main(["check-config", str(path)], out=out) == 0
    text = out.getvalue()
    assert "api.a  (api, 127.0.0.1:5001)" in text
    assert "inout  api.b  api" in text
    assert "s3cret-value" not in text


def test_check_config_cli_exit_2_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, API_PAIR + '[[gateway.out]]\naccount = "api.zzz"\nchannel = "api"\n[bus]\nBatchSize = 0\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bus.BatchSize: must be at least 1", 'gateway[0].out[0].account: no account "api.zzz"']


@pytest.mark.parametrize(
    "name, gateway",
    [
        ("example.toml", "demo"),
        ("compose.toml", "demo"),
        ("talk-bot.toml", "team"),
        ("matterbridge-client.toml", "team"),
    ],
)
def test_shipped_configs_are_valid(name: str, gateway: str) -> None:
    shipped = Path(__file__).resolve().parent.parent / "config" / name
    environ = {"TALKBRIDGE_REDIS_URL": "redis://redis:6379/0", "TALK_BOT_SECRET": "s" * 48, "API_TOKEN": "t"}
    environ |= {"MATTERBRIDGE_TOKEN": "m", "NC_APP_PASSWORD": "p"}
    config = load_config(shipped, specs(), environ=environ)
    assert [g.name for g in config.gateways] == [gateway]
    assert config.warnings == []


def test_loading_a_config_imports_no_adapter_bus_or_redis() -> None:
    """The config layer stands alone: checking a file pulls in neither the
    adapters nor the bus nor a Redis client (a fresh interpreter, so nothing
    this test session imported counts)."""
    code = (
        "import sys, bridge.config, bridge.options\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'adapters', 'aiohttp', 'httpx')"
        " or m in ('bridge.bus', 'bridge.events'))\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def counter_spec() -> dict[str, ProtocolSpec]:
    return {
        "counter": ProtocolSpec(
            "counter",
            {
                "Every": Option(int, default=5, min=1),
                "Ratio": Option((int, float), default=0.5, above=0, max=1),
                "Mode": Option(str, default="fast", choices=("fast", "Careful")),
            },
        )
    }


def test_declared_ranges_are_enforced_and_choices_stored_as_declared(tmp_path: Path) -> None:
    """An adapter declares a range or the allowed values once, on its Option;
    the loader checks them (no hand-written check_account for plain ranges)."""
    ok = load_config(write(tmp_path, "[counter.c]\nEvery = 1\nRatio = 1\nMode = 'CAREFUL'\n"), counter_spec())
    acct = ok.accounts["counter.c"]
    assert (acct.get("Every"), acct.get("Ratio"), acct.get("Mode")) == (1, 1, "Careful")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "[counter.c]\nEvery = 0\nRatio = 0\nMode = 'slow'\n"), counter_spec())
    assert err.value.problems == [
        "counter.c.Every: must be at least 1",
        "counter.c.Ratio: must be more than 0 and at most 1",
        "counter.c.Mode: must be fast or Careful",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[api.a]\nBindAddress='127.0.0.1:1'\nBuffer=-1\n", "api.a.Buffer: must be at least 0"),
        ("[http]\nRequestTimeoutSeconds=0\n", "http.RequestTimeoutSeconds: must be more than 0 and at most 86400"),
        ("[bus]\nMessageMapPerRoom=99\n", "bus.MessageMapPerRoom: must be at least 100"),
        ("[log]\nFormat='xml'\n", "log.Format: must be text or json"),
    ],
)
def test_own_sections_and_adapters_keep_their_ranges(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems(tmp_path, text)


def test_choices_match_without_regard_to_case(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, API_PAIR + "[log]\nLevel = 'DEBUG'\nFormat = 'JSON'\n"), specs())
    assert (config.section("log")["Level"], config.section("log")["Format"]) == ("debug", "json")


IGNORED = API_PAIR.replace("[api.a]\n", "[api.a]\nMessageSplit = true\nEditSuffix = ' (edited)'\n").replace(
    "[api.b]\n", "[api.b]\nPreserveThreading = false\n"
)


def test_check_config_warns_about_each_option_it_accepts_but_ignores(tmp_path: Path) -> None:
    """Set in the file and not implemented: one warning naming the key, and
    the config is still fine (exit 0). Implemented options get no warning."""
    path = write(tmp_path, "[general]\nDebug = true\nStripNick = true\n" + IGNORED)
    out = io.StringIO()
    assert main(["check-config", str(path)], out=out) == 0
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: api.a.MessageSplit: accepted but ignored by talkbridge (a Talk bot always splits long messages)",
        'warning: general.Debug: accepted but ignored by talkbridge (use [log] Level = "debug")',
    ]


def test_a_general_option_is_warned_about_only_when_no_account_reads_it(tmp_path: Path) -> None:
    """[general] MessageLength is read by a Talk bot account, not by an api one."""
    api_only = load_config(write(tmp_path, "[general]\nMessageLength = 500\n" + API_PAIR), specs())
    assert [w.split(":")[0] for w in api_only.warnings] == ["general.MessageLength"]
    bot = "[nctalkbot.t]\nServer = 'https://cloud.example.com'\nBotSecret = '" + "s" * 40 + "'\n"
    with_bot = load_config(write(tmp_path, "[general]\nMessageLength = 500\n" + API_PAIR + bot), specs())
    assert with_bot.warnings == []
    assert with_bot.accounts["nctalkbot.t"].get("MessageLength") == 500


def test_the_daemon_logs_the_same_warnings_at_start_up(tmp_path: Path, redis_server: RedisServer) -> None:
    path, (_, _, http) = api_pair_config(tmp_path, redis_server.url)
    path.write_text(path.read_text().replace("[api.a]\n", "[api.a]\nMessageSplit = true\n"))
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        log = daemon.log()
    finally:
        assert daemon.stop() == 0
    assert "config: api.a.MessageSplit: accepted but ignored by talkbridge" in log
