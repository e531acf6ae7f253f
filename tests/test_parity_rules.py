"""Matterbridge parity, points 1 and 2 of issue 8: no rule in a config can
take the daemon down, and rules are Go regexps with Go's replacement rules.

The reference is Matterbridge v1.26 (42wim/matterbridge, read through the
search tool) and Go's regexp package (golang/go):

- gateway/gateway.go @ 4ab72acec656dafd304f88359b509b1f27c06604:
  ``modifyMessage`` applies ``ReplaceMessages`` with ``regexp.Compile`` and
  ``re.ReplaceAllString``, ``modifyUsername`` ``ReplaceNicks`` the same way;
  on a rule that fails both log ``regexp in %s failed`` and ``break``: the
  message goes on with the rules before it. ``ignoreText`` matches
  ``IgnoreNicks`` / ``IgnoreMessages`` (``strings.Fields``) with
  ``re.MatchString``.
- src/regexp/regexp.go @ 07177f28857be8a24b45fedf55710395772a15fb:
  ``replaceAll`` (empty matches; at least one character of progress),
  ``expand`` and ``extract`` (``$name`` as long as possible, ``${name}``,
  ``$$``, an unknown or unmatched group is empty, no leading zeros).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import AdapterRegistry
from bridge.cli import main
from bridge.config import Rewrite, load_config
from bridge.events import Event, EventKind
from bridge.goregex import GoRegexError, GoRegexp, decode, encode
from bridge.keys import dead_letters_key
from bridge.options import ProtocolSpec, protocol_specs
from bridge.router import Router
from tests.helpers import Daemon, RedisServer, api_pair_config
from tests.test_api_e2e import Api

SPECS = {"chat": ProtocolSpec("chat", {})}


def _with_account_keys(path: Path, account: str, lines: str) -> None:
    text = path.read_text()
    path.write_text(text.replace(f"[{account}]\n", f"[{account}]\n{lines}\n", 1))


def test_a_group_reference_without_a_group_neither_stops_the_daemon_nor_the_stream(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The crash of issue 8: ``ReplaceMessages = [["foo", "$1"]]`` passed
    check-config and failed on the first matching message (at first it took
    the daemon down, since poison containment it dead-lettered the message).
    As in Go (regexp.go ``expand``), ``$1`` without a group is empty: "foo
    bar" arrives as " bar", and what follows arrives too, through the same
    daemon process. Failed before the fix."""
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    path, (pa, pb, http) = api_pair_config(tmp_path, redis_server.url)
    _with_account_keys(path, "api.a", 'ReplaceMessages = [["foo", "$1"]]')
    out = io.StringIO()
    assert main(["check-config", str(path)], out=out) == 0  # valid Go; a warning says what it does
    assert "warning: api.a.ReplaceMessages[0]: $1 expands to nothing: 'foo' has no group 1" in out.getvalue()
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        a, b = Api(pa, "token-a"), Api(pb, "token-b")
        for text in ("foo bar", "no match", "foofoo"):
            assert a.post(text=text, username="alice", gateway="g").status_code == 200
        got = b.wait_messages(3)
        # the emptied one too: gateway.go checks for empty text before modifyMessage
        assert [m["text"] for m in got] == [" bar", "no match", ""]
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert client.xlen(dead_letters_key("tb")) == 0
        assert httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=5).status_code == 200
    finally:
        assert daemon.stop() == 0
        client.close()
    assert "Traceback" not in daemon.log(), daemon.log()


@pytest.mark.parametrize(
    "key, value, reason",
    [
        (
            "ReplaceMessages",
            '[["(unclosed", "x"]]',
            "ReplaceMessages[0]: bad regular expression '(unclosed': missing )",
        ),
        ("ReplaceNicks", '[["a**", "x"]]', "ReplaceNicks[0]: bad regular expression 'a**': bad repetition operator"),
        ("IgnoreMessages", '"ok [z-a]"', "IgnoreMessages: bad regular expression '[z-a]': invalid character class"),
        ("IgnoreNicks", '"(?P<n"', "IgnoreNicks: bad regular expression '(?P<n': invalid named capture"),
        ("ReplaceMessages", '[["\\\\C", "x"]]', "ReplaceMessages[0]: bad regular expression '\\\\C': invalid escape"),
        ("ReplaceMessages", '[["a\\\\Z", "x"]]', "ReplaceMessages[0]: bad regular expression 'a\\\\Z': invalid escape"),
        ("ReplaceNicks", '[["a", 1]]', 'ReplaceNicks[0]: must be a pair of strings ["regex", "replacement"]'),
        ("ReplaceNicks", '[["a", "b", "c"]]', 'ReplaceNicks[0]: must be a pair of strings ["regex", "replacement"]'),
    ],
)
def test_check_config_refuses_what_go_refuses_naming_the_key_and_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, reason: str
) -> None:
    """Every pattern is compiled at check-config, as Go's ``regexp.Compile``
    would (``\\C`` and ``\\Z`` are not Go), and refused with exit 2 and one
    line naming the key, instead of failing at every message the way
    gateway.go's ``regexp in %s failed`` does."""
    path, _ = api_pair_config(tmp_path, None)
    _with_account_keys(path, "api.a", f"{key} = {value}")
    assert main(["check-config", str(path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"api.a.{reason}"), line


def test_go_syntax_loads_and_matches_as_in_go(tmp_path: Path) -> None:
    """Rules written for Go's RE2 dialect: ``\\p{Lu}``, ``\\z``,
    ``[[:digit:]]``, ``(?U)`` and ``\\Q…\\E`` load (check-config refused some
    of them under Python's re) and give Go's results; ``$`` matches only at
    the very end without ``(?m)`` (Python's also before a final newline)."""
    rules = [
        ["\\p{Lu}", "_"],
        ["[[:digit:]]+", "#"],
        ["(?U)<.+>", "[tag]"],
        ["\\Qa.b\\E", "A-B"],
        ["end\\z", "END"],
        ["x$", "X"],
    ]
    toml_rules = ", ".join(f'["{p.replace(chr(92), chr(92) * 2)}", "{r}"]' for p, r in rules)
    r = _router(tmp_path, f"ReplaceMessages = [{toml_rules}]")
    [d] = r.route(_msg("Hi <b>42</b> a.b axb the end"))
    assert d.text == "_i [tag]#[tag] A-B axb the END"
    assert [d.text for m in ("the end\n", "x\n", "ax") for d in r.route(_msg(m))] == ["the end\n", "x\n", "aX"]


@pytest.mark.parametrize(
    "pattern, template, text, expected",
    [
        ("x*", "-", "abd", "-a-b-d-"),  # Go's empty matches (Python's re.sub gives the same here...)
        ("a*", "-", "baaac", "-b-c-"),  # ...but not here: "-b--c-" (no empty match right after a match)
        ("(a)(b)", "$1x", "ab", ""),  # $1x is the group named "1x": none, so empty
        ("(a)(b)", "${1}x", "ab", "ax"),
        ("(a)(b)", "$$1", "ab", "$1"),
        ("(a)(b)", "$2$1", "ab", "ba"),
        ("(a)(b)", "$3", "ab", ""),  # out of range: empty
        ("(a)(b)", "${01}", "ab", ""),  # leading zero: a name, and none has it
        ("(?P<w>b)", "<$w>", "abc", "a<b>c"),
        ("(?P<w>b)", "<${w}_>", "abc", "a<b_>c"),
        ("(?P<n>a)|(?P<n>b)", "[$n]", "ab", "[a][b]"),  # the first group of that name that matched
        ("(a)|(b)", "[$1]", "ab", "[a][]"),  # a group that did not take part: empty
        ("b", "$", "abc", "a$c"),  # a lone $ is text
        ("b", "${x", "abc", "a${xc"),  # so is a malformed one
        ("", "-", "héllo", "-h-é-l-l-o-"),  # progress is one character, not one byte
        ("é*", "-", "aé", "-a-"),
        ("(?i)straße", "x", "STRASSE Straße", "STRASSE x"),  # simple case folding only, as in Go
    ],
)
def test_replacement_follows_go_replace_all_string(pattern: str, template: str, text: str, expected: str) -> None:
    regexp = GoRegexp.compile(pattern)
    assert decode(regexp.replace_all(encode(text), regexp.template(template))) == expected


def test_a_rule_that_fails_on_a_message_is_logged_and_the_message_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No rule should fail at run time any more (each is compiled and checked
    at load), but if one does it costs neither the message nor the route
    loop: the error names the account and the key, and, as gateway.go's loop
    does on a failing rule (``break``), the rules after it are skipped."""
    r = _router(tmp_path, 'ReplaceMessages = [["a", "A"], ["b", "B"], ["c", "C"]]')
    first, second, third = r.accounts["chat.a"].rules.replace_messages

    class Broken:
        pattern = "b"

        def replace_all(self, src: bytes, template: object) -> bytes:
            raise RuntimeError("a bug in a rule")

    broken = Rewrite(second.key, Broken(), second.template)  # type: ignore[arg-type]
    rules = r.accounts["chat.a"].rules
    object.__setattr__(rules, "replace_messages", (first, broken, third))
    with caplog.at_level(logging.ERROR, logger="talkbridge.router"):
        [d] = r.route(_msg("abc"))
    assert d.text == "Abc"  # the first rule applied; the failing one and the one after it not
    assert "chat.a: ReplaceMessages[1] failed on a message (RuntimeError: a bug in a rule)" in caplog.text


# properties ----------------------------------------------------------------------------
TEMPLATE_TEXT = st.text(alphabet=st.sampled_from("$ {}01_9aZxé-\\"), max_size=16)
PATTERNS = ["(a)(b)?", "(?P<x>a+)|(?P<y>b)", "x*", "", "[[:alpha:]]+", "(?U)(.+)"]


@settings(max_examples=200, deadline=None)
@given(template=TEMPLATE_TEXT, text=st.text(max_size=30), pattern=st.sampled_from(PATTERNS))
def test_any_template_expands_without_an_error(template: str, text: str, pattern: str) -> None:
    """Go's ``Expand`` has no error case: any replacement, over any text,
    gives a text (references to nothing are empty, malformed ones literal)."""
    regexp = GoRegexp.compile(pattern)
    out = decode(regexp.replace_all(encode(text), regexp.template(template)))
    assert isinstance(out, str)
    if not regexp.search(encode(text)):
        assert out == text


@settings(max_examples=200, deadline=None)
@given(needle=st.text(min_size=1, max_size=4), template=st.text(max_size=6), text=st.text(max_size=40))
def test_a_literal_rule_is_a_plain_replace(needle: str, template: str, text: str) -> None:
    """A quoted pattern and a replacement without ``$``: Go's ReplaceAllString
    is ``strings.ReplaceAll``."""
    regexp = GoRegexp.compile("\\Q" + needle.replace("\\E", "\\E\\\\E\\Q") + "\\E")
    template = template.replace("$", "")
    assert decode(regexp.replace_all(encode(text), regexp.template(template))) == text.replace(needle, template)


@settings(max_examples=300, deadline=None)
@given(pattern=st.text(alphabet=st.sampled_from("()[]{}?*+|\\^$.:<>PQECpLuz-az09=!"), max_size=14))
def test_any_pattern_compiles_or_is_refused_with_a_reason(pattern: str) -> None:
    """A pattern either compiles or raises GoRegexError with a reason: never
    another exception, and never a refusal without words."""
    try:
        regexp = GoRegexp.compile(pattern)
    except GoRegexError as exc:
        assert str(exc)
        return
    assert len(regexp.names) == regexp._re.groups + 1
    regexp.search(b"some text (with) [brackets] 09 az")


# helpers -----------------------------------------------------------------------------------
def _router(tmp_path: Path, a_options: str) -> Router:
    path = tmp_path / "r.toml"
    path.write_text(
        f"[chat.a]\n{a_options}\n[chat.b]\n"
        '[[gateway]]\nname = "g"\nenable = true\n'
        '[[gateway.inout]]\naccount = "chat.a"\nchannel = "x"\n'
        '[[gateway.inout]]\naccount = "chat.b"\nchannel = "x"\n'
    )
    return Router(load_config(path, SPECS))


def _msg(text: str, nick: str = "alice") -> Event:
    return Event(kind=EventKind.MESSAGE, account="chat.a", channel="x", sender_name=nick, text=text)


def test_the_shipped_adapters_declare_what_the_loader_reads() -> None:
    """The api account's channel is fixed at "api" and it passes on other
    events; the Talk bot does neither (bridge/adapter.py AdapterTraits)."""
    specs = protocol_specs(AdapterRegistry())
    assert (specs["api"].fixed_channel, specs["api"].relays_other_events) == ("api", True)
    assert (specs["nctalkbot"].fixed_channel, specs["nctalkbot"].relays_other_events) == (None, False)
