"""Symbol address ranges, and the sorting and alias resolution that make them.

kallsyms and ELF symbol tables both come as lists of symbols in no
guaranteed order, several of them at one address (aliases), some without a
size.  Both become a :class:`Ranges`: one symbol per address, sorted, each
with how far it reaches.  Lookups bisect it, one address at a time: a stack
has at most 127 frames, so there is nothing to gain from batching them.

Everything here works on ``array`` columns and iterates in C (``map``,
``itertools``) where it can: a kernel has over 100k symbols, and a Python
object per symbol would cost megabytes and a Python loop per symbol tenths
of a second.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from itertools import chain, compress, count, groupby, islice, repeat
from operator import and_, eq, gt, lshift, or_, sub

__all__ = ["Ranges", "one_per_address", "reach", "underscores"]

_ADDRESS_MAX = 2**64 - 1
# How far a symbol without a size may reach.  Functions are smaller than this,
# and it stops addresses far past the last symbol of a region resolving to it.
_MAX_UNSIZED = 1 << 16


class Ranges:
    """Symbol ranges sorted by start: symbol ``i`` covers ``starts[i]`` up to,
    not including, ``starts[i] + lengths[i]``."""

    __slots__ = ("lengths", "starts")

    def __init__(self, starts: array[int], lengths: array[int]) -> None:
        self.starts = starts
        self.lengths = lengths

    def find(self, address: int) -> int:
        """The index of the range holding ``address``, or -1."""
        index = bisect_right(self.starts, address) - 1
        if index >= 0 and address - self.starts[index] < self.lengths[index]:
            return index
        return -1


def one_per_address(values: array[int], preference: Callable[[int], tuple[int, ...]]) -> tuple[
        array[int], array[int]]:
    """Indices of ``values`` (unsigned) that sort them, one per value, and the
    sorted values.  Of equal values (aliases) the index whose ``preference``
    is least is kept, then the lowest.

    Aliases are few (hundreds among 100k kernel symbols), so ``preference``
    is asked only about them.
    """
    order = _sorting_order(values)
    if order is None:  # sorted already
        order, ordered = array("I", range(len(values))), values
    else:
        ordered = array("Q", map(values.__getitem__, order))
    # Positions in order whose value equals the one before.
    tied = list(compress(count(1), map(eq, ordered, islice(ordered, 1, None))))
    if not tied:
        return order, ordered
    selected = bytearray(b"\1") * len(order)
    # Consecutive tied positions, with the position before them, are one run.
    for _, run in groupby(enumerate(tied), lambda item: item[1] - item[0]):
        positions = [position for _, position in run]
        first, last = positions[0] - 1, positions[-1]
        order[first] = order[min(range(first, last + 1), key=lambda p: preference(order[p]))]
        selected[first + 1:last + 1] = bytes(last - first)
    return array("I", compress(order, selected)), array("Q", compress(ordered, selected))


def _sorting_order(values: array[int]) -> array[int] | None:
    """Indices that sort ``values``, equal values in index order; None if
    they are sorted already.

    Sorting needs a Python int per value, some 40 bytes each.  kallsyms lists
    the core kernel in address order and then the modules, so only what
    follows the longest sorted prefix is sorted, and merged into it: values
    below the prefix's last one one by one, the rest (the modules, above the
    core kernel) in bulk.  A mostly unsorted list (an ELF symbol table) is
    sorted whole.
    """
    n = len(values)
    prefix = next(compress(count(1), map(gt, values, islice(values, 1, None))), n)
    if prefix == n:
        return None
    if prefix < n // 2:
        prefix = 0
    # value << shift | index: one int per value, which sorts by value, then index.
    shift = n.bit_length()
    mask = (1 << shift) - 1
    tail = sorted(map(or_, map(lshift, islice(values, prefix, None), repeat(shift)),
                      range(prefix, n)))
    merged = bisect_left(tail, values[prefix - 1] << shift) if prefix else 0
    order = array("I")
    at = 0
    for packed in islice(tail, merged):
        end = bisect_right(values, packed >> shift, at, prefix)
        order.extend(range(at, end))
        order.append(packed & mask)
        at = end
    order.extend(range(at, prefix))
    order.extend(map(and_, islice(tail, merged, None), repeat(mask)))
    return order


def reach(starts: array[int], stops: Iterable[int] = ()) -> array[int]:
    """How far each symbol may reach when it has no size: to the next start,
    or to the next of ``stops`` (addresses that end code, such as data), but at
    most 64 KiB.  ``starts`` is sorted and has no duplicates."""
    ends = chain(islice(starts, 1, None), (_ADDRESS_MAX,))
    lengths = array("I", map(min, map(sub, ends, starts), repeat(_MAX_UNSIZED)))
    for stop in stops:
        index = bisect_left(starts, stop) - 1  # the last symbol that starts before it
        if index >= 0:
            lengths[index] = min(lengths[index], stop - starts[index])
    return lengths


def underscores(name: bytes | bytearray) -> int:
    """How many of the first two characters of ``name`` are '_': aliases with
    fewer are the plainer names (write over __write)."""
    return 0 if name[:1] != b"_" else 1 + (name[1:2] == b"_")
