"""What Matrix wants to know about a file before it is sent: its msgtype and,
for images, width and height (``info.w``/``info.h``), read from the first
bytes of PNG, GIF, JPEG and WebP files. Total over any bytes: None when
the size cannot be read."""

from __future__ import annotations

import struct

MAX_SIDE = 1 << 16


def msgtype_for(mime: str) -> str:
    major = mime.split("/", 1)[0].lower()
    return {"image": "m.image", "video": "m.video", "audio": "m.audio"}.get(major, "m.file")


def _ok(w: int, h: int) -> tuple[int, int] | None:
    return (w, h) if 0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE else None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF, JPEG or WebP image, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return _ok(w, h)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return _ok(w, h)
    if data[:2] == b"\xff\xd8":
        return _jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack("<HH", data[26:30])
            return _ok(w & 0x3FFF, h & 0x3FFF)
        if chunk == b"VP8L" and data[20:21] == b"\x2f":
            bits = int.from_bytes(data[21:25], "little")
            return _ok((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        if chunk == b"VP8X":
            w = int.from_bytes(data[24:27], "little") + 1
            h = int.from_bytes(data[27:30], "little") + 1
            return _ok(w, h)
    return None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return _ok(w, h)
        i += 2 + length
    return None
