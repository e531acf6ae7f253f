"""Matrix (``[matrix.NAME]``) over matrix-nio: adapters/matrix/adapter.py."""

from adapters.matrix.adapter import Matrix

__all__ = ["Matrix"]
