"""The bounded mapping every cache of the symbolizer is."""

from __future__ import annotations

from ebpf_stream._base.lru import Lru


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: Lru[str, int] = Lru(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # b is now the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_weighed_entries_are_kept_under_their_total() -> None:
    cache: Lru[str, bytes] = Lru(10, len)
    cache.put("a", b"x" * 4)
    cache.put("b", b"x" * 4)
    cache.put("a", b"x" * 2)  # replaced, not counted twice
    cache.put("c", b"x" * 4)
    assert list(cache) == ["b", "a", "c"]
    cache.put("d", b"x" * 5)
    assert list(cache) == ["c", "d"]
    cache.put("e", b"x" * 20)  # alone over the capacity: kept, the rest gone
    assert list(cache) == ["e"]
    cache.pop("e")
    cache.put("f", b"x" * 10)
    assert list(cache) == ["f"]
