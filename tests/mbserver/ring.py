"""zfjagann/golang-ring as Matterbridge's api bridge uses it, line for line:
vendor/github.com/zfjagann/golang-ring/ring.go (read at matterbridge commit
6ceb1e40, the stored version; 1.26's go.mod names
v0.0.0-20220330170733-19bcea1b6289). ``DefaultCapacity`` is 10; the zero
Ring (``ring.Ring{}``) has head 0 and no buffer until ``checkInit``;
``Enqueue`` on a full ring overwrites the oldest value; ``Values`` of an
empty ring is an empty (not nil) slice, so it marshals as ``[]``.
"""

from __future__ import annotations

from typing import Any

DEFAULT_CAPACITY = 10


class Ring:
    def __init__(self) -> None:  # the zero value: head 0, tail 0, buff nil
        self.head = 0
        self.tail = 0
        self.buff: list[Any] | None = None

    def set_capacity(self, size: int) -> None:  # SetCapacity
        self._check_init()
        self._extend(size)

    def enqueue(self, value: Any) -> None:  # Enqueue
        self._check_init()
        self._set(self.head + 1, value)
        old = self.head
        self.head = self._mod(self.head + 1)
        if old != -1 and self.head == self.tail:
            self.tail = self._mod(self.tail + 1)

    def dequeue(self) -> Any:  # Dequeue: None when empty
        self._check_init()
        if self.head == -1:
            return None
        value = self._get(self.tail)
        self._set(self.tail, None)
        if self.tail == self.head:
            self.head, self.tail = -1, 0
        else:
            self.tail = self._mod(self.tail + 1)
        return value

    def values(self) -> list[Any]:  # Values: no checkInit, as in Go
        if self.head == -1:
            return []
        out: list[Any] = []
        for i in range(self.capacity()):
            idx = self._mod(i + self.tail)
            out.append(self._get(idx))
            if idx == self.head:
                break
        return out

    def capacity(self) -> int:
        return len(self.buff) if self.buff is not None else 0

    def _set(self, p: int, value: Any) -> None:
        assert self.buff is not None
        self.buff[self._mod(p)] = value

    def _get(self, p: int) -> Any:
        assert self.buff is not None
        return self.buff[self._mod(p)]

    def _mod(self, p: int) -> int:
        return p % len(self.buff or [None])  # Python's % is never negative, Go's loop fixes that

    def _check_init(self) -> None:
        if self.buff is not None:
            return
        self.buff = [None] * DEFAULT_CAPACITY
        self.head, self.tail = -1, 0

    def _extend(self, size: int) -> None:
        assert self.buff is not None
        if size == len(self.buff):
            return
        if size < len(self.buff):
            if self.head == -1:
                self.buff = self.buff[:size]
            else:  # keep the most recent values
                self.buff = [self.buff[self._mod(self.head - i)] for i in range(size - 1, -1, -1)]
                self.head, self.tail = len(self.buff) - 1, 0
            return
        grow = [None] * (size - len(self.buff))
        if self.head == -1 or self.head >= self.tail:
            self.buff = self.buff + grow
        else:  # contents wrap around the end: keep them in order
            part1 = self.buff[: self.head + 1]
            part2 = self.buff[self.tail :]
            self.buff = part1 + grow + part2
            self.tail = self.tail + len(grow)
