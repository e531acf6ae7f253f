"""Property-based checks for HTTP ingress, reusable for every route an adapter adds.

Describe a route with ``Route`` — its port and path, the methods it serves,
how to make valid credentials for a body (a Bearer token, an HMAC), and a few
*valid* payloads — and ``requests(route)`` generates what a hostile or broken
client sends: any bytes in any header value, any content type, bodies that
are not UTF-8, not JSON, JSON of any shape (wrong types in any field,
nulls, huge numbers, deep nesting, lone surrogates), and the route's own
payloads with fields replaced or removed — sent with valid credentials too,
so they get past the authentication that would otherwise refuse them first.

Requests go over a raw socket (well-behaved HTTP clients refuse to send most
of this). ``Ingress.check`` asserts what every ingress route must hold:

- the answer is a status below 500, a 4xx with a reason in its body;
- nothing is published unless the answer is a 2xx;
- the daemon still answers ``/healthz``;
- nothing was logged at ERROR or with a traceback.

A new adapter's test module builds its ``Route`` and runs
``ingress.check(route, request)`` under ``@given(requests(route))``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Bounded: the whole module of property tests stays within seconds. A deeper
# run: TALKBRIDGE_PROPS_EXAMPLES=5000 python -m pytest tests/test_ingress_props.py
PROPS = settings(
    max_examples=int(os.environ.get("TALKBRIDGE_PROPS_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Headers the harness sets itself so every exchange is one framed request on
# one connection; framing attacks have their own explicit tests.
FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"host"}
INTERESTING_HEADERS = (
    b"Authorization",
    b"Content-Type",
    b"Content-Encoding",
    b"Accept",
    b"Accept-Encoding",
    b"Accept-Charset",
    b"Cookie",
    b"Expect",
    b"Origin",
    b"Range",
    b"User-Agent",
    b"X-Forwarded-For",
    b"X-Real-IP",
    b"X-Nextcloud-Talk-Random",
    b"X-Nextcloud-Talk-Signature",
    b"X-Nextcloud-Talk-Backend",
    b"If-None-Match",
)
CONTENT_TYPES = (
    b"application/json",
    b"application/json; charset=utf-8",
    b"application/json; charset=latin-1",
    b"application/json; charset=bogus",
    b"application/x-www-form-urlencoded",
    b"application/x-www-form-urlencoded; charset=utf-8",
    b"application/x-www-form-urlencoded; charset=latin-1",
    b"application/x-www-form-urlencoded; charset=bogus-\xff",
    b"multipart/form-data",
    b"multipart/form-data; boundary=xyz",
    b"text/plain",
    b"application/octet-stream",
    b"",
    b";;;",
    b"application/json; charset",
    b"\xff\xfe/\x00",
)
METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"TRACE", b"PROPFIND", b"get")


# requests and answers ----------------------------------------------------------------
@dataclass(frozen=True)
class RawRequest:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def encode(self) -> bytes:
        lines = [self.method + b" " + self.target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
        lines += [name + b": " + value for name, value in self.headers]
        lines.append(b"Content-Length: %d" % len(self.body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body

    def __repr__(self) -> str:  # what Hypothesis prints for a failing example
        return f"RawRequest({self.encode()!r})"


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(port: int, data: bytes, timeout: float = 15.0, read_body: bool = True) -> RawResponse:
    """Send raw bytes (a request saying ``Connection: close``), read one final
    answer (1xx skipped) and, unless ``read_body`` is off (an endless
    ``/api/stream``), everything up to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed without an answer (got {buf!r})")
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            if status >= 200:
                break
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if read_body:
            # to the server's close: whatever it logs about this request is logged by then
            while chunk := sock.recv(65536):
                buf += chunk
        body = buf[: int(length)] if length is not None and length.isdigit() else b""
        return RawResponse(status, headers, body)


# hostile values --------------------------------------------------------------------------
class Encoded:
    """A JSON document carried as a string inside another (Talk's ``object.content``)."""

    def __init__(self, value: Any) -> None:
        self.value = value


@dataclass(frozen=True)
class Lexical:
    """JSON text no Python value encodes to: huge numbers, lone surrogates, NaN, deep nesting."""

    text: str


LEXICAL = st.one_of(
    st.integers(20, 6000).map(lambda n: Lexical("9" * n)),  # past 64 bits, past Python's 4,300 digits
    st.integers(20, 400).map(lambda n: Lexical("-" + "9" * n)),
    st.sampled_from(["1e999", "-1e999", "1e-999", "NaN", "Infinity", "-0", "0.0000000000000000000001", "1E400"]).map(
        Lexical
    ),
    st.sampled_from(['"\\ud800"', '"\\udfff\\ud800"', '"a\\u0000b"', '"\\uffff"', '"\\ud83d\\ude00"']).map(Lexical),
    st.integers(1, 3000).map(lambda n: Lexical("[" * n + "]" * n)),  # orjson refuses past 1,024
    st.integers(1, 400).map(lambda n: Lexical('{"a":' * n + "1" + "}" * n)),
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**80),
    st.integers(min_value=-(2**80), max_value=-(2**63) + 2),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", " ", "0", "-1", "g", "api", "x" * 200, "../etc/passwd", "a/b", ".", "..", "\x00", "👍"]),
    LEXICAL,
)

KEYS = ["id", "type", "text", "file", "Name", "object", "content", "message", "parameters"]
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=12,
)


def to_json(value: Any, ascii_only: bool = True) -> str:
    """JSON text of a value that may hold ``Encoded`` and ``Lexical`` parts."""
    if isinstance(value, Lexical):
        return value.text
    if isinstance(value, Encoded):
        return json.dumps(to_json(value.value, ascii_only), ensure_ascii=ascii_only)
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k), ensure_ascii=ascii_only)}:{to_json(v, ascii_only)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, Encoded):
        yield from _paths(value.value, (*prefix, Encoded))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield (*prefix, i)
            yield from _paths(item, (*prefix, i))


def _container(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc.value if step is Encoded else doc[step]
    return doc.value if isinstance(doc, Encoded) else doc


@st.composite
def mutated(draw: st.DrawFn, templates: Sequence[Any]) -> Any:
    """One of the route's valid payloads with one to three fields replaced by
    hostile values, removed, or an unknown field added."""
    doc = copy.deepcopy(draw(st.sampled_from(list(templates))))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not paths or action == "add":
            parent = _container(doc, draw(st.sampled_from([(), *paths])) if paths else ())
            if isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
            elif isinstance(parent, list):
                parent.append(draw(JSON_VALUES))
            continue
        path = draw(st.sampled_from(paths))
        parent = _container(doc, path[:-1])
        key = path[-1]
        if key is Encoded:
            continue
        if action == "delete":
            del parent[key]
        else:
            parent[key] = draw(JSON_VALUES)
    return doc


def _form(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"&".join(quote_from_bytes(k).encode() + b"=" + quote_from_bytes(v).encode() for k, v in pairs)


def bodies(templates: Sequence[Any] = ()) -> st.SearchStrategy[bytes]:
    """Any bytes; text in several encodings; JSON of any shape; form posts
    (percent-encoded bytes that are not UTF-8 among them); and, given the
    route's valid payloads, those with hostile fields."""
    shapes = [JSON_VALUES]
    if templates:
        shapes = [mutated(templates), mutated(templates), JSON_VALUES]
    as_json = st.tuples(st.one_of(*shapes), st.booleans()).map(lambda v: to_json(v[0], v[1]).encode("utf-8"))
    latin1_json = st.one_of(*shapes).map(lambda v: to_json(v, False).encode("latin-1", "replace"))
    encoded_text = st.tuples(st.text(max_size=200), st.sampled_from(["utf-8", "latin-1", "utf-16", "utf-32"])).map(
        lambda v: v[0].encode(v[1], "replace")
    )
    form_pairs = st.lists(
        st.tuples(
            st.sampled_from([b"text", b"username", b"gateway", b"event", b"id", b"Extra"]) | st.binary(max_size=8),
            st.binary(max_size=30),
        ),
        max_size=5,
    )
    return st.one_of(
        st.binary(max_size=512),
        encoded_text,
        as_json,
        as_json,
        latin1_json,
        form_pairs.map(_form),
        form_pairs.map(lambda pairs: b"&".join(k + b"=" + v for k, v in pairs)),  # raw, not even percent-encoded
        st.just(b""),
    )


def header_values() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.text(max_size=40).map(lambda s: s.encode("utf-8").replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b"", b" ", b"Bearer", b"Bearer ", b"Bearer \xff\xfe", b"gzip", b"deflate", b"br"]),
        st.sampled_from([b"100-continue", b"100-Continue", b"chunked", b"*/*", b"\x00", b"\xff\xfe"]),
    )


def header_names() -> st.SearchStrategy[bytes]:
    token = st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}\Z")
    odd = st.binary(min_size=1, max_size=12).filter(lambda b: b":" not in b and b"\r" not in b and b"\n" not in b)
    return st.one_of(st.sampled_from(INTERESTING_HEADERS), token, odd).filter(lambda n: n.lower() not in FRAMING)


# routes ------------------------------------------------------------------------------------
Signer = Callable[[bytes], list[tuple[bytes, bytes]]]


@dataclass(frozen=True)
class Route:
    """One ingress route, as the property tests see it."""

    name: str
    port: int
    path: str
    methods: tuple[str, ...] = ("POST",)
    auth: Signer | None = None  # valid credentials for a body (None: the route needs none)
    templates: Sequence[Any] = ()  # valid payloads, the starting points of hostile ones
    content_types: tuple[bytes, ...] = CONTENT_TYPES
    streams: bool = False  # a 200 is an endless stream (read the head only)


@st.composite
def requests(draw: st.DrawFn, route: Route) -> RawRequest:
    method = draw(st.sampled_from([m.encode() for m in route.methods]) | st.sampled_from(METHODS))
    target = route.path.encode()
    if draw(st.integers(0, 9)) == 0:
        target += b"?" + draw(st.binary(max_size=20)).hex().encode() + b"=%ff%fe"
    body = draw(bodies(route.templates))
    headers: list[tuple[bytes, bytes]] = []
    if route.auth is not None:
        how = draw(st.sampled_from(["valid", "valid", "valid", "absent", "garbage"]))
        if how == "valid":
            headers += route.auth(body)
        elif how == "garbage":
            headers += [(name, draw(header_values())) for name, _ in route.auth(body)]
    if draw(st.booleans()):
        headers.append((b"Content-Type", draw(st.sampled_from(route.content_types) | header_values())))
    headers += draw(st.lists(st.tuples(header_names(), header_values()), max_size=4))
    return RawRequest(method, target, tuple(headers), body)


# the environment ---------------------------------------------------------------------------
class BadLogs(logging.Handler):
    """Records that must never appear: ERROR and above, or any traceback."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            with self._lock_records:
                self.records.append(record)

    def take(self) -> list[str]:
        with self._lock_records:
            out = [self.format(r) for r in self.records]
            self.records.clear()
        return out


@dataclass
class Ingress:
    """A running daemon as the property tests see it."""

    health_port: int
    published: Callable[[], object]  # changes whenever anything is published
    bad_logs: BadLogs
    seen: dict[str, int] = field(default_factory=dict)  # status counts, for the report

    def check(self, route: Route, request: RawRequest) -> RawResponse:
        before = self.published()
        endless = route.streams and request.method in (b"GET", b"HEAD")  # a 200 never ends
        resp = exchange(route.port, request.encode(), read_body=not endless)
        self.seen[f"{route.name} {resp.status}"] = self.seen.get(f"{route.name} {resp.status}", 0) + 1
        assert resp.status < 500, f"{route.name}: {resp.status} {resp.body[:300]!r}"
        if resp.status >= 400 and request.method != b"HEAD":
            assert resp.body.strip(), f"{route.name}: {resp.status} without a reason"
        if not 200 <= resp.status < 300:
            assert self.published() == before, f"{route.name}: {resp.status} but something was published"
        health = exchange(self.health_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert health.status == 200
        bad = self.bad_logs.take()
        assert not bad, f"{route.name}: logged as an error or with a traceback:\n" + "\n".join(bad)
        return resp
