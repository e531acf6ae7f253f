"""The features the workers run, one module each.

A feature module offers ``trigger(config, redis, prefix) -> Trigger | None``
(workers/triggers.py) and ``FUNCTIONS``, its arq job coroutines. Adding a
feature is one line here.
"""

from __future__ import annotations

from types import ModuleType

from workers import instagram, llm

FEATURES: list[ModuleType] = [instagram, llm]
