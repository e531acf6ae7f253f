"""The persona's parsers and its chat-completions client.

The client is tested against a real model (llama.cpp's server with
SmolLM2-135M, tests/llama_rig.py) and, for what a model will not do on cue
(time out, fail, answer garbage), against a small local server (FakeLLM).
"""

from __future__ import annotations

import json
import re
import string

import httpx
import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.helpers import free_port
from tests.llama_rig import FakeLLM, LlamaServer, fake_llm_fixture, llama_server_fixture  # noqa: F401
from tests.talkbot_rig import until
from workers.llm_client import MAX_RESPONSE_BYTES, LLMError, Persona, complete, parse_completion
from workers.llm_job import build_messages
from workers.llm_queue import history_item
from workers.llm_trigger import question_of, strip_mention

ASCII_NAMES = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True).filter(lambda n: not n.endswith("."))
NAMES = st.from_regex(r"[\w.-]{1,64}", fullmatch=True)  # what the config accepts as Name
NAME_CHARS = string.ascii_letters + string.digits + "_-"


def persona(endpoint: str = "http://127.0.0.1:9/v1", **kw) -> Persona:
    values = {"Endpoint": endpoint, "Model": "test-model", "Name": "Inara", **kw}
    return Persona.from_config("inara", values)


# ---------------------------------------------------------------------------------------
# The mention
# ---------------------------------------------------------------------------------------
def test_mentions() -> None:
    assert strip_mention("@Inara what is 2+2?", "Inara") == "what is 2+2?"
    assert strip_mention("  @inara: hi", "Inara") == "hi"
    assert strip_mention("@INARA, hi there ", "Inara") == "hi there"
    assert strip_mention("@Inara", "Inara") == ""
    assert strip_mention("@Inara. Hi", "Inara") == ". Hi"
    assert strip_mention("@Inara2 hi", "Inara") is None
    assert strip_mention("@Inara.bot hi", "Inara") is None
    assert strip_mention("@Inara-x hi", "Inara") is None
    assert strip_mention("hi @Inara", "Inara") is None
    assert strip_mention("Inara hi", "Inara") is None
    assert strip_mention("@In.ra hi", "In.ra") == "hi"
    assert strip_mention("@Inxra hi", "In.ra") is None  # the name is literal, not a pattern
    # the mention mode asks only with a mention; the bot's own rooms ask with every message
    assert question_of("@Inara hi", "Inara", every_message=False) == "hi"
    assert question_of("hello all", "Inara", every_message=False) is None
    assert question_of("hello all", "Inara", every_message=True) == "hello all"
    assert question_of("@Inara hello", "Inara", every_message=True) == "hello"
    assert question_of("@Inara", "Inara", every_message=True) is None  # nothing asked
    assert question_of("   ", "Inara", every_message=True) is None


@given(name=ASCII_NAMES, sep=st.sampled_from([" ", ": ", ", ", "\n", ":", "  ,  "]), rest=st.text())
@example(name="a", sep=" ", rest=":x")
def test_a_mention_is_stripped(name: str, sep: str, rest: str) -> None:
    text = f"@{name}{sep}{rest}"
    expected = re.sub(r"^[\s:,]*", "", rest).strip()
    assert strip_mention(text, name) == expected
    assert strip_mention(text.upper(), name.lower()) == strip_mention(text.upper(), name.upper())


@given(name=ASCII_NAMES, text=st.text())
def test_anything_else_is_no_mention(name: str, text: str) -> None:
    rest = strip_mention(text, name)
    if rest is not None:
        head = text.lstrip()
        assert head[:1] == "@" and re.fullmatch(re.escape(name), head[1 : len(name) + 1], re.IGNORECASE)
        assert not re.match(r"[\w-]|\.[\w-]", head[len(name) + 1 :])  # the name ends there
        assert rest == rest.strip() and rest in text


@given(name=ASCII_NAMES, extra=st.sampled_from(list(NAME_CHARS)), rest=st.text())
def test_a_longer_name_is_someone_else(name: str, extra: str, rest: str) -> None:
    assert strip_mention(f"@{name}{extra} {rest}", name) is None
    assert strip_mention(f"@{name}.{extra}{rest}", name) is None


@given(name=NAMES, text=st.text(), every=st.booleans())
def test_the_parser_takes_any_text(name: str, text: str, every: bool) -> None:
    question = question_of(text, name, every)
    assert question is None or (question == question.strip() and question != "" and question in text)


# ---------------------------------------------------------------------------------------
# The answer
# ---------------------------------------------------------------------------------------
def completion(content: object, **message: object) -> bytes:
    return orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content, **message}}]})


def test_completions() -> None:
    assert parse_completion(completion("  Paris.  ")) == "Paris."
    assert parse_completion(completion([{"type": "text", "text": "Pa"}, {"type": "text", "text": "ris"}])) == "Paris"
    assert parse_completion(completion("<think>\nhmm, France\n</think>\n\nParis")) == "Paris"
    assert parse_completion(completion(None, refusal="I can't help with that.")) == "I can't help with that."
    for bad, kind in [
        (b"", "malformed"),
        (b"<html>502 Bad Gateway</html>", "malformed"),
        (b"[]", "malformed"),
        (b'{"choices": []}', "malformed"),
        (b'{"object": "chat.completion"}', "malformed"),
        (b'{"choices": [{"text": "legacy completion"}]}', "malformed"),
        (b'{"choices": [{"message": "text"}]}', "malformed"),
        (completion(42), "malformed"),
        (completion([{"type": "text"}]), "malformed"),
        (completion("   "), "empty"),
        (completion(None), "empty"),
        (completion("<think>only thoughts</think>"), "empty"),
    ]:
        with pytest.raises(LLMError) as caught:
            parse_completion(bad)
        assert caught.value.kind == kind, bad
    with pytest.raises(LLMError, match="model not loaded"):
        parse_completion(b'{"error": {"message": "model not loaded", "type": "server_error"}}')


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
MESSAGES = st.dictionaries(st.sampled_from(["role", "content", "refusal"]), JSON)
SHAPED = st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries({"message": MESSAGES}), max_size=2)})


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()  # the stdlib writes what orjson refuses too (integers past 64 bits)


@given(body=st.binary() | JSON.map(dumps) | SHAPED.map(dumps))
def test_any_answer_is_text_or_an_llm_error(body: bytes) -> None:
    try:
        text = parse_completion(body)
    except LLMError as exc:
        assert exc.kind in ("malformed", "empty") and exc.detail
    else:
        assert isinstance(text, str) and text and text == text.strip()


@given(content=st.text().filter(lambda t: t.strip() and not t.lstrip().startswith("<think>")))
def test_a_completion_gives_its_text(content: str) -> None:
    assert parse_completion(completion(content)) == content.strip()


# ---------------------------------------------------------------------------------------
# The messages sent
# ---------------------------------------------------------------------------------------
def test_the_model_sees_the_rooms_recent_messages_before_the_question() -> None:
    p = persona(History=2, SystemPrompt="You are Inara.")
    history = [
        history_item("e1", "user", "Bob", "first"),
        history_item("e2", "user", "Alice", "second"),
        history_item("re:e0", "assistant", "Inara", "my earlier reply"),
        history_item("q1", "user", "Alice", "the question"),
        history_item("e3", "user", "Bob", "said after the question"),
    ]
    assert build_messages(p, history, "q1", "Alice", "the question") == [
        {"role": "system", "content": "You are Inara."},
        {"role": "user", "content": "Alice: second"},
        {"role": "assistant", "content": "my earlier reply"},
        {"role": "user", "content": "Alice: the question"},
    ]
    # a question no longer in the history (trimmed) goes alone; History 0 sends none
    assert len(build_messages(p, history, "gone", "Alice", "q")) == 2
    assert len(build_messages(persona(History=0), history, "q1", "Alice", "q")) == 2
    # no SystemPrompt: a short default that names the persona
    assert "Inara" in build_messages(persona(), [], "q", "A", "q")[0]["content"]


# ---------------------------------------------------------------------------------------
# The client, against a local server
# ---------------------------------------------------------------------------------------
async def test_a_completion_is_asked_as_openai_asks_it(fake_llm: FakeLLM) -> None:
    p = persona(fake_llm.endpoint + "/", APIKey="sk-secret", MaxTokens=64, Temperature=0.25)
    async with httpx.AsyncClient() as http:
        text = await complete(http, p, [{"role": "user", "content": "Alice: hi"}], 10)
    assert text == "answer 1: Alice: hi"
    [seen] = fake_llm.seen
    assert seen.body == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "Alice: hi"}],
        "max_tokens": 64,
        "temperature": 0.25,
        "stream": False,
    }
    assert seen.headers["Authorization"] == "Bearer sk-secret"
    assert "Authorization" not in await _headers_without_key(fake_llm)


async def _headers_without_key(fake_llm: FakeLLM) -> dict[str, str]:
    async with httpx.AsyncClient() as http:
        await complete(http, persona(fake_llm.endpoint), [{"role": "user", "content": "x"}], 10)
    return fake_llm.seen[-1].headers


async def test_no_answer_within_the_timeout_is_a_timeout(fake_llm: FakeLLM) -> None:
    fake_llm.hold = True
    async with httpx.AsyncClient() as http:
        with pytest.raises(LLMError) as caught:
            await complete(http, persona(fake_llm.endpoint), [{"role": "user", "content": "x"}], 0.3)
    assert caught.value.kind == "timeout" and not caught.value.alerts
    await until(lambda: fake_llm.held() == 1, what="the request held at the server")


@pytest.mark.parametrize(
    ("status", "body", "alerts", "detail"),
    [
        (500, b'{"error": {"message": "CUDA out of memory"}}', True, "HTTP 500: CUDA out of memory"),
        (502, b"<html><body>Bad Gateway</body></html>", True, "HTTP 502: <html><body>Bad Gateway</body></html>"),
        (503, b"", True, "HTTP 503: (no body)"),
        (401, b'{"error": {"message": "Incorrect API key provided"}}', True, "HTTP 401: Incorrect API key"),
        (404, b'{"error": "model \\"x\\" not found, try pulling it first"}', True, 'HTTP 404: model "x" not found'),
        (400, b'{"error": {"message": "context length exceeded"}}', False, "HTTP 400: context length exceeded"),
    ],
)
async def test_an_error_status_is_an_llm_error(
    fake_llm: FakeLLM, status: int, body: bytes, alerts: bool, detail: str
) -> None:
    fake_llm.answer, fake_llm.status, fake_llm.body = "scripted", status, body
    async with httpx.AsyncClient() as http:
        with pytest.raises(LLMError) as caught:
            await complete(http, persona(fake_llm.endpoint), [{"role": "user", "content": "x"}], 10)
    assert caught.value.kind == "status" and caught.value.status == status
    assert caught.value.alerts is alerts
    assert caught.value.detail.startswith(detail)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b'{"choices": [', "malformed"),
        (b'{"id": "chatcmpl-1", "object": "chat.completion"}', "malformed"),
        (b"x" * (MAX_RESPONSE_BYTES + 1), "malformed"),
        (completion(""), "empty"),
    ],
)
async def test_a_malformed_answer_is_an_llm_error(fake_llm: FakeLLM, body: bytes, kind: str) -> None:
    fake_llm.answer, fake_llm.status, fake_llm.body = "scripted", 200, body
    async with httpx.AsyncClient() as http:
        with pytest.raises(LLMError) as caught:
            await complete(http, persona(fake_llm.endpoint), [{"role": "user", "content": "x"}], 10)
    assert caught.value.kind == kind
    assert caught.value.alerts is (kind == "malformed")


async def test_a_refused_connection_is_unreachable() -> None:
    p = persona(f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    async with httpx.AsyncClient() as http:
        with pytest.raises(LLMError) as caught:
            await complete(http, p, [{"role": "user", "content": "x"}], 10)
    assert caught.value.kind == "unreachable" and caught.value.alerts


def test_credentials_in_the_endpoint_are_not_shown() -> None:
    p = persona("https://user:pass@llm.example.com:8443/v1?key=abc")
    assert p.shown_endpoint == "https://llm.example.com:8443/v1"
    assert p.url == "https://user:pass@llm.example.com:8443/v1/chat/completions?key=abc"
    assert persona("http://h/v1/").url == "http://h/v1/chat/completions"


# ---------------------------------------------------------------------------------------
# The client, against a real model
# ---------------------------------------------------------------------------------------
async def test_a_real_model_answers(llama_server: LlamaServer) -> None:
    p = persona(llama_server.endpoint, Model="smollm2", MaxTokens=32, Temperature=0.0)
    messages = build_messages(p, [], "q", "Alice", "What is the capital of France?")
    async with httpx.AsyncClient() as http:
        text = await complete(http, p, messages, 120)
    assert isinstance(text, str) and text.strip() == text and len(text) > 0
