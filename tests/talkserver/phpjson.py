"""PHP's ``json_encode`` with default flags, byte for byte.

Talk encodes webhook bodies (and the ``content`` string inside them) with
``json_encode($data, JSON_THROW_ON_ERROR)``: no ``JSON_UNESCAPED_SLASHES``,
no ``JSON_UNESCAPED_UNICODE``. So ``/`` becomes ``\\/`` and every non-ASCII
character a lowercase ``\\uXXXX`` escape (astral ones as a UTF-16 surrogate
pair), exactly what Python's ``ensure_ascii`` produces. An empty PHP array is
``[]``, so callers pass ``[]`` (a list) for "no parameters".
"""

from __future__ import annotations

import json
from typing import Any


def php_json_encode(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    # '/' never occurs outside strings in JSON, so a blanket replace is exact.
    return text.replace("/", "\\/")


def php_ocs_json(value: Any) -> str:
    """OCS responses: ``json_encode($response, JSON_HEX_TAG)`` (< and > as \\u003C / \\u003E)."""
    return php_json_encode(value).replace("<", "\\u003C").replace(">", "\\u003E")
