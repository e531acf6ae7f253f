"""Protocol adapters, one module or package each, all behind ``bridge.adapter.Adapter``.

``PROTOCOLS`` maps the Matterbridge section name to the adapter class; adding
a protocol adds one line here and one module, and touches no other adapter.
Modules are imported on first use so a config without Matrix accounts never
imports matrix-nio.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from bridge.adapter import Adapter

PROTOCOLS: dict[str, str] = {
    "api": "adapters.api:MatterbridgeAPI",
    "matrix": "adapters.matrix:Matrix",
    "matterbridge": "adapters.matterbridge:MatterbridgeClient",
    "nctalk": "adapters.nctalk:TalkUser",
    "nctalkbot": "adapters.nctalk_bot:TalkBot",
}


class AdapterRegistry(Mapping[str, type[Adapter]]):
    """Read-only, lazily importing view of ``PROTOCOLS``."""

    def __init__(self, table: Mapping[str, str] = PROTOCOLS) -> None:
        self._table = dict(table)

    def __getitem__(self, protocol: str) -> type[Adapter]:
        module, _, cls = self._table[protocol].partition(":")
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)
