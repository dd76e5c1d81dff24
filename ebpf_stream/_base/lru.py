"""A bounded mapping: every cache of the symbolizer is one, so that a host
profiled for weeks, with processes and libraries coming and going, keeps a
fixed ceiling on what symbolization holds."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Lru"]

_K = TypeVar("_K")
_V = TypeVar("_V")


class Lru(Generic[_K, _V]):
    """A dict that forgets its least recently used entries beyond ``capacity``."""

    __slots__ = ("_capacity", "_data")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._data: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self._capacity:
            self._data.popitem(last=False)

    def pop(self, key: _K) -> None:
        self._data.pop(key, None)

    def __iter__(self) -> Iterator[_K]:
        """The keys, least recently used first, as they are now: the caller may pop them."""
        return iter(list(self._data))
