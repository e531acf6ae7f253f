"""One Matrix room event (its raw JSON, as the homeserver sent it) -> what
talkbridge relays of it, in network-neutral terms.

Total over any input: a malformed, oversized or unknown event becomes a
``Skip`` with the reason (the adapter logs the bad ones), never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from adapters.matrix.convert import html_to_markdown
from bridge.events import EventKind

MAX_TEXT = 65536  # characters; Matrix events are at most 64 KiB in all
MAX_ID = 255  # the spec's limit for event ids, user ids and room ids
MEDIA_TYPES = {"m.image", "m.file", "m.video", "m.audio"}
TEXT_TYPES = {"m.text", "m.notice", "m.emote"}
HTML = "org.matrix.custom.html"
ENCRYPTED_NOTE = "(an end-to-end encrypted message: talkbridge cannot decrypt it)"
UNDECRYPTABLE_NOTE = "(an encrypted message that could not be decrypted)"
BAD_FILE_NOTE = "(an encrypted file, {name}, that failed its integrity check: not relayed)"
_MXC = re.compile(r"mxc://([A-Za-z0-9.:\-\[\]]{1,255})/([A-Za-z0-9_\-]{1,255})")


@dataclass(frozen=True, slots=True)
class FileSecret:
    """An encrypted attachment's ``file`` object: what decrypts it (the
    AES-CTR key, its iv) and checks it (the ciphertext's SHA-256)."""

    key: str  # the JWK's "k", unpadded base64url
    iv: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Media:
    server: str
    media_id: str
    name: str
    mime: str
    size: int | None  # as the event says; the download still enforces the limit
    secret: FileSecret | None = None  # an encrypted attachment (in an encrypted room)

    @property
    def mxc(self) -> str:
        return f"mxc://{self.server}/{self.media_id}"


@dataclass(frozen=True, slots=True)
class Incoming:
    kind: EventKind
    event_id: str
    sender: str
    timestamp: float  # seconds
    text: str = ""
    reply_to: str | None = None
    target_id: str | None = None  # edit, redaction, reaction: the event concerned
    reaction: str | None = None
    media: Media | None = None
    msgtype: str = ""
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str
    bad: bool = False  # malformed or hostile (logged as a warning), not merely not bridged


def _str(value: Any, limit: int = MAX_ID) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _valid_id(value: Any, sigil: str) -> str | None:
    text = _str(value)
    if text is None or not text.startswith(sigil) or any(c.isspace() or ord(c) < 32 for c in text):
        return None
    return text


def strip_reply_fallback(body: str) -> str:
    """Drop the ``> <@user> quoted`` lines a reply's plain body starts with."""
    lines = body.split("\n")
    if not lines or not lines[0].startswith("> "):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    if i < len(lines) and lines[i] == "":
        return "\n".join(lines[i + 1 :])
    return body


def _text(content: dict[str, Any], reply: bool) -> str | None:
    body = content.get("body")
    if not isinstance(body, str):
        return None
    formatted = content.get("formatted_body")
    if content.get("format") == HTML and isinstance(formatted, str) and len(formatted) <= 4 * MAX_TEXT:
        text = html_to_markdown(formatted)  # drops <mx-reply> itself
        if text or not body.strip():
            return text
    return strip_reply_fallback(body) if reply else body


def _relates(content: dict[str, Any]) -> dict[str, Any]:
    rel = content.get("m.relates_to")
    return rel if isinstance(rel, dict) else {}


def _reply_to(rel: dict[str, Any]) -> str | None:
    inner = rel.get("m.in_reply_to")
    return _valid_id(inner.get("event_id"), "$") if isinstance(inner, dict) else None


def file_secret(file: Any) -> tuple[str, FileSecret] | None:
    """The url and secret of an encrypted attachment's ``file`` object
    (``{"url", "key": {"k", "alg": "A256CTR", ...}, "iv", "hashes": {"sha256"}, "v": "v2"}``), or None."""
    if not isinstance(file, dict):
        return None
    key, hashes = file.get("key"), file.get("hashes")
    if not isinstance(key, dict) or not isinstance(hashes, dict) or key.get("alg", "A256CTR") != "A256CTR":
        return None
    url, k, iv, sha = (
        _str(file.get("url")),
        _str(key.get("k"), 64),
        _str(file.get("iv"), 64),
        _str(hashes.get("sha256"), 64),
    )
    if url is None or k is None or iv is None or sha is None or file.get("v", "v2") != "v2":
        return None
    return url, FileSecret(k, iv, sha)


def _media(content: dict[str, Any], msgtype: str, decrypt_files: bool = False) -> Media | Skip:
    url = content.get("url")
    secret = None
    if not isinstance(url, str):
        if isinstance(content.get("file"), dict):
            if not decrypt_files:
                return Skip("an encrypted file")
            found = file_secret(content["file"])
            if found is None:
                return Skip(f"{msgtype} with a malformed encrypted file object", bad=True)
            url, secret = found
        else:
            return Skip(f"{msgtype} without a url", bad=True)
    m = _MXC.fullmatch(url)
    if m is None:
        return Skip(f"{msgtype} url is not an mxc:// URI", bad=True)
    info = content.get("info") if isinstance(content.get("info"), dict) else {}
    size = info.get("size")
    mime = info.get("mimetype")
    name = content.get("filename") if isinstance(content.get("filename"), str) else content.get("body")
    return Media(
        server=m.group(1),
        media_id=m.group(2),
        name=(name if isinstance(name, str) and name.strip() else "file")[:255],
        mime=mime if isinstance(mime, str) and 0 < len(mime) <= 255 else "application/octet-stream",
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
        secret=secret,
    )


def parse_event(source: Any, own_user: str, keep_quoted: bool = False, decrypt_files: bool = False) -> Incoming | Skip:
    """A room timeline event -> ``Incoming`` or why it is not relayed;
    ``decrypt_files``: an encrypted attachment is ``Media`` with its secret, not a notice."""
    if not isinstance(source, dict):
        return Skip("not an object", bad=True)
    etype = source.get("type")
    event_id = _valid_id(source.get("event_id"), "$")
    sender = _valid_id(source.get("sender"), "@")
    if not isinstance(etype, str) or event_id is None or sender is None:
        return Skip("no valid type, event_id or sender", bad=True)
    if sender == own_user:
        return Skip("our own event")
    if "state_key" in source:
        return Skip("a state event")
    unsigned = source.get("unsigned")
    if isinstance(unsigned, dict) and unsigned.get("redacted_because") is not None:
        return Skip("redacted before it was seen")
    content = source.get("content")
    if not isinstance(content, dict):
        return Skip("content is not an object", bad=True)
    ts = source.get("origin_server_ts")
    timestamp = ts / 1000 if isinstance(ts, int | float) and not isinstance(ts, bool) and 0 <= ts < 1e15 else 0.0
    base = {"event_id": event_id, "sender": sender, "timestamp": timestamp}

    if etype == "m.room.encrypted":
        return Incoming(EventKind.MESSAGE, text=ENCRYPTED_NOTE, encrypted=True, **base)
    if etype == "m.room.redaction":
        target = _valid_id(source.get("redacts"), "$") or _valid_id(content.get("redacts"), "$")
        if target is None:
            return Skip("a redaction without a valid redacts", bad=True)
        return Incoming(EventKind.DELETE, target_id=target, **base)
    if etype == "m.reaction":
        rel = _relates(content)
        target = _valid_id(rel.get("event_id"), "$")
        key = rel.get("key")
        if rel.get("rel_type") != "m.annotation" or target is None or not isinstance(key, str):
            return Skip("a reaction without an annotation", bad=True)
        if not key or len(key) > 64:
            return Skip("a reaction key that is empty or too long", bad=True)
        return Incoming(EventKind.REACTION, target_id=target, reaction=key, **base)
    if etype != "m.room.message":
        return Skip(f"event type {etype[:64]!r} is not bridged")
    if not content:
        return Skip("redacted (no content)")
    body = content.get("body")
    if isinstance(body, str) and len(body) > MAX_TEXT:
        return Skip(f"oversized body ({len(body)} characters)", bad=True)
    rel = _relates(content)
    if rel.get("rel_type") == "m.replace":
        target = _valid_id(rel.get("event_id"), "$")
        new = content.get("m.new_content")
        if target is None or not isinstance(new, dict):
            return Skip("an edit without a target or m.new_content", bad=True)
        new_type = new.get("msgtype")
        if new_type in MEDIA_TYPES:
            return Skip("an edit of a file")
        text = _text(new, reply=False)
        if text is None or new_type not in TEXT_TYPES:
            return Skip("an edit whose new content is not text", bad=True)
        if len(text) > MAX_TEXT:
            return Skip("oversized edit", bad=True)
        return Incoming(EventKind.EDIT, target_id=target, text=text, msgtype=new_type, **base)
    msgtype = content.get("msgtype")
    reply_to = _reply_to(rel)
    if msgtype in TEXT_TYPES:
        if keep_quoted and reply_to is not None and isinstance(body, str):
            return Incoming(EventKind.MESSAGE, text=body, reply_to=reply_to, msgtype=msgtype, **base)
        text = _text(content, reply=reply_to is not None)
        if text is None:
            return Skip(f"{msgtype} without a body", bad=True)
        return Incoming(EventKind.MESSAGE, text=text, reply_to=reply_to, msgtype=msgtype, **base)
    if msgtype in MEDIA_TYPES:
        media = _media(content, msgtype, decrypt_files)
        if isinstance(media, Skip):
            if media.reason == "an encrypted file":
                return Incoming(EventKind.MESSAGE, text=ENCRYPTED_NOTE, encrypted=True, **base)
            return media
        caption = ""
        fname = content.get("filename")
        if isinstance(fname, str) and isinstance(body, str) and body != fname:
            caption = _text(content, reply=reply_to is not None) or ""
        return Incoming(EventKind.MESSAGE, text=caption, reply_to=reply_to, media=media, msgtype=msgtype, **base)
    if isinstance(body, str) and body.strip():  # m.location, unknown msgtypes: their fallback text
        return Incoming(EventKind.MESSAGE, text=body, reply_to=reply_to, msgtype="m.text", **base)
    return Skip(f"msgtype {str(msgtype)[:64]!r} without a body")
