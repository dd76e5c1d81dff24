"""A bounded mapping: every cache of the symbolizer is one, so that a host
profiled for weeks, with processes and libraries coming and going, keeps a
fixed ceiling on what symbolization holds."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Lru"]

_K = TypeVar("_K")
_V = TypeVar("_V")


class Lru(Generic[_K, _V]):
    """A dict that forgets its least recently used entries beyond ``capacity``.

    Each entry counts 1 towards it, or what ``weigh`` says (bytes, say): the
    newest entry is kept even if it weighs more than the capacity alone.
    """

    __slots__ = ("_capacity", "_data", "_weigh", "_weight")

    def __init__(self, capacity: int, weigh: Callable[[_V], int] | None = None) -> None:
        self._capacity = capacity
        self._data: OrderedDict[_K, _V] = OrderedDict()
        self._weigh = weigh
        self._weight = 0  # of the entries held, when weighed

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self.pop(key)
        self._data[key] = value
        if self._weigh is None:
            if len(self._data) > self._capacity:
                self._data.popitem(last=False)
            return
        self._weight += self._weigh(value)
        while self._weight > self._capacity and len(self._data) > 1:
            _, old = self._data.popitem(last=False)
            self._weight -= self._weigh(old)

    def pop(self, key: _K) -> None:
        old = self._data.pop(key, None)
        if old is not None and self._weigh is not None:
            self._weight -= self._weigh(old)

    def __iter__(self) -> Iterator[_K]:
        """The keys, least recently used first, as they are now: the caller may pop them."""
        return iter(list(self._data))
