"""A persona's chat model (workers/llm.py describes the feature): ``Persona``,
its ``[persona.NAME]`` settings, and ``complete``, one call to an
OpenAI-compatible ``POST {Endpoint}/chat/completions`` whose answer
``parse_completion`` reads. Anything but an answer is an ``LLMError``: its
``kind`` says what failed, ``alerts`` whether the admin should hear of it.
No call is retried: one question, one call.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

MAX_RESPONSE_BYTES = 1_000_000  # a chat completion is a few KiB; more is not one
NO_ALERT_STATUSES = frozenset({400, 413, 422})  # this question's fault (too long…), not the service's


@dataclass(frozen=True, slots=True)
class Persona:
    key: str  # the NAME of [persona.NAME]
    name: str  # how it is called: @name
    endpoint: str
    model: str
    api_key: str
    system_prompt: str
    max_tokens: int
    temperature: float
    history: int
    timeout: float

    @classmethod
    def from_config(cls, key: str, values: dict[str, Any]) -> Persona:
        return cls(
            key=key,
            name=str(values.get("Name") or key),
            endpoint=str(values["Endpoint"]),
            model=str(values["Model"]),
            api_key=str(values.get("APIKey") or ""),
            system_prompt=str(values.get("SystemPrompt") or ""),
            max_tokens=int(values.get("MaxTokens", 256)),
            temperature=float(values.get("Temperature", 0.7)),
            history=int(values.get("History", 10)),
            timeout=float(values.get("Timeout", 55)),
        )

    @property
    def url(self) -> str:
        """``Endpoint`` + ``/chat/completions`` (a query string, some proxies' key, stays after it)."""
        parts = urlsplit(self.endpoint)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))

    @property
    def shown_endpoint(self) -> str:
        """The endpoint for logs and alerts: no credentials, no query."""
        parts = urlsplit(self.endpoint)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))

    def system(self) -> str:
        return self.system_prompt or f"You are {self.name}, a helpful assistant in a group chat. Answer briefly."


# ---------------------------------------------------------------------------------------
# Parsing: the model's answer
# ---------------------------------------------------------------------------------------
class LLMError(Exception):
    """A chat completion that did not give an answer.

    ``kind``: ``timeout``, ``unreachable`` (connection refused, reset, DNS),
    ``status`` (an HTTP error status), ``malformed`` (not a chat completion),
    ``empty`` (a completion without text)."""

    def __init__(self, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status

    @property
    def alerts(self) -> bool:
        """Whether the admin should hear of it: the service or its config, not this question."""
        if self.kind == "status":
            return self.status not in NO_ALERT_STATUSES
        return self.kind in ("unreachable", "malformed")


_THINK = re.compile(r"\A\s*<think>.*?</think>", flags=re.DOTALL)


def parse_completion(body: bytes) -> str:
    """The assistant's text from an OpenAI chat completion; LLMError otherwise.

    ``content`` may be a string or a list of parts (``{"type": "text",
    "text": …}``); a reasoning model's leading ``<think>…</think>`` is
    dropped."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise LLMError("malformed", f"the answer is not JSON: {_snippet(body)!r}") from None
    if not isinstance(data, dict):
        raise LLMError("malformed", f"the answer is not a JSON object: {_snippet(body)!r}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        error = _error_message(data)
        what = f"an error: {error}" if error else f"no choices: {_snippet(body)!r}"
        raise LLMError("malformed", f"the answer has {what}")
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise LLMError("malformed", "choices[0].message is missing")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if not all(isinstance(p, str) for p in parts):
            raise LLMError("malformed", "choices[0].message.content has a text part without text")
        content = "".join(parts)  # type: ignore[arg-type]
    elif content is None:
        refusal = message.get("refusal")
        content = refusal if isinstance(refusal, str) else ""
    if not isinstance(content, str):
        raise LLMError("malformed", f"choices[0].message.content is {type(content).__name__}, not text")
    text = _THINK.sub("", content).strip()
    if not text:
        reason = first.get("finish_reason")
        raise LLMError("empty", f"the model answered no text (finish_reason {reason!r})")
    return text


def _error_message(data: dict[str, Any]) -> str:
    """OpenAI's ``{"error": {"message": …}}``, or ``{"error": "…"}`` / ``{"detail": …}`` (vLLM, FastAPI)."""
    error = data.get("error", data.get("detail"))
    if isinstance(error, dict):
        error = error.get("message", error)
    if error is None:
        return ""
    return _oneline(error if isinstance(error, str) else json.dumps(error, ensure_ascii=False))


def _oneline(text: str, limit: int = 200) -> str:
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _snippet(body: bytes, limit: int = 80) -> str:
    return _oneline(body[: limit * 4].decode("utf-8", "replace"), limit)


def _status_detail(status: int, body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    error = _error_message(data) if isinstance(data, dict) else ""
    return f"HTTP {status}: {error or _snippet(body) or '(no body)'}"


# ---------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------
async def complete(
    http: httpx.AsyncClient, persona: Persona, messages: Sequence[dict[str, str]], seconds: float
) -> str:
    """One chat completion, within ``seconds`` in all (connect, the
    model's thinking, the answer's bytes); LLMError for anything but an answer."""
    body = {
        "model": persona.model,
        "messages": list(messages),
        "max_tokens": persona.max_tokens,
        "temperature": persona.temperature,
        "stream": False,
    }
    headers = {"Accept": "application/json"}
    if persona.api_key:
        headers["Authorization"] = f"Bearer {persona.api_key}"
    try:
        async with asyncio.timeout(seconds):
            async with http.stream(
                "POST", persona.url, json=body, headers=headers, timeout=httpx.Timeout(seconds)
            ) as resp:
                status = resp.status_code
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise LLMError("malformed", f"the answer is larger than {MAX_RESPONSE_BYTES} bytes", status)
    except (TimeoutError, httpx.TimeoutException):
        raise LLMError("timeout", f"no answer within {seconds:g} s") from None
    except httpx.HTTPError as exc:
        raise LLMError("unreachable", f"{type(exc).__name__}: {_oneline(str(exc)) or 'no detail'}") from None
    if not 200 <= status < 300:
        raise LLMError("status", _status_detail(status, bytes(data)), status)
    return parse_completion(bytes(data))
