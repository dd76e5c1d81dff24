"""Where this interpreter keeps the running task's context variables.

The kernel finds a sample's request through memory alone: the sampled
thread's ``PyThreadState.context`` is the ``contextvars.Context`` being run
(an asyncio task's own, or the thread's), and a context keeps its variables
in a HAMT, the immutable trie behind ``Context``.  Two things about that
memory vary between interpreters and builds, and are learned here, in the
process itself, rather than from a table:

- the offset of ``context`` in ``PyThreadState``, found by running a known
  context and looking for it in the thread state;
- the addresses of the HAMT's node types, which tell its two node kinds
  apart, read from contexts built to have each kind at their root.

The fixed parts (object headers, the HAMT's node fields) are the same in
every 64-bit build of 3.11 to 3.13 with the default object header; a
lookup mirrored in Python (``find``) proves them before anything is
published, so another build publishes nothing rather than something wrong.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
from typing import NamedTuple

# Fixed offsets, the same in the kernel's copy (kernel/request_context.h).
CONTEXT_VARS = 24  # PyContext.ctx_vars, after the object header and ctx_prev
HAMT_ROOT = 16  # PyHamtObject.h_root
OB_TYPE = 8
OB_SIZE = 16
BITMAP_BITS = 24  # PyHamtNode_Bitmap.b_bitmap, after the variable-size header
BITMAP_ARRAY = 32  # PyHamtNode_Bitmap.b_array: key, value (or NULL, subnode) pairs
ARRAY_NODES = 16  # PyHamtNode_Array.a_array: 32 subnodes
BYTES_DATA = 32  # PyBytesObject.ob_sval
MAX_LEVELS = 7  # a 32-bit hash, 5 bits a level

_SCAN_BYTES = 512  # of PyThreadState searched for the context


class LayoutError(Exception):
    """This interpreter's memory is not laid out as the kernel's lookup expects."""


class Layout(NamedTuple):
    """What the kernel needs to find a context variable's value in this process."""

    thread_context: int  # offset of PyThreadState.context
    bitmap_type: int  # address of the HAMT's bitmap node type
    array_type: int  # address of the HAMT's array node type
    bytes_type: int  # address of ``bytes``


def _word(address: int) -> int:
    return ctypes.c_uint64.from_address(address).value


def _u32(address: int) -> int:
    return ctypes.c_uint32.from_address(address).value


def hamt_hash(var: contextvars.ContextVar[bytes]) -> int:
    """The 32-bit hash the HAMT files ``var`` under (CPython's ``hamt_hash``)."""
    h = hash(var) & 0xFFFF_FFFF_FFFF_FFFF
    folded = (h & 0xFFFF_FFFF) ^ (h >> 32)
    return 0xFFFF_FFFE if folded == 0xFFFF_FFFF else folded


def _root(context: contextvars.Context) -> int:
    return _word(_word(id(context) + CONTEXT_VARS) + HAMT_ROOT)


@functools.cache
def thread_context_offset() -> int:
    """The offset of ``PyThreadState.context``: where a running context is found."""
    current = ctypes.pythonapi.PyThreadState_Get
    current.restype = ctypes.c_void_p

    def offsets(context: contextvars.Context) -> set[int]:
        state = current()
        return {at for at in range(0, _SCAN_BYTES, 8) if _word(state + at) == id(context)}

    one, two = contextvars.Context(), contextvars.Context()
    found = one.run(offsets, one) & two.run(offsets, two)
    if len(found) != 1:
        raise LayoutError("the running context is not found in the thread state")
    return found.pop()


def _array_root() -> contextvars.Context:
    """A context whose HAMT root is an array node: more than 16 variables at its
    first level."""
    def fill() -> contextvars.Context:
        for i in range(64):
            contextvars.ContextVar[bytes](f"ebpf_stream.layout.{i}").set(b"")
        return contextvars.copy_context()

    return contextvars.Context().run(fill)


def discover() -> Layout:
    """This interpreter's layout, or ``LayoutError``."""
    bitmap_type = _word(_root(contextvars.Context()) + OB_TYPE)
    array_type = _word(_root(_array_root()) + OB_TYPE)
    if array_type == bitmap_type:
        raise LayoutError("no array node at the root of a context of 64 variables")
    return Layout(thread_context_offset(), bitmap_type, array_type, id(bytes))


def find(layout: Layout, context: contextvars.Context, var: contextvars.ContextVar[bytes],
         var_hash: int) -> int:
    """The address of ``var``'s value in ``context``, 0 if none: the kernel's
    lookup step for step, to prove ``layout`` before it is published."""
    node = _root(context)
    for level in range(MAX_LEVELS):
        index = (var_hash >> (5 * level)) & 31
        kind = _word(node + OB_TYPE)
        if kind == layout.array_type:
            node = _word(node + ARRAY_NODES + 8 * index)
        elif kind == layout.bitmap_type:
            bitmap = _u32(node + BITMAP_BITS)
            bit = 1 << index
            if not bitmap & bit:
                return 0
            pair = node + BITMAP_ARRAY + 16 * (bitmap & (bit - 1)).bit_count()
            key, value = _word(pair), _word(pair + 8)
            if key:
                return value if key == id(var) else 0
            node = value
        else:
            return 0
        if not node:
            return 0
    return 0


def proven(var: contextvars.ContextVar[bytes]) -> Layout:
    """``discover()``, checked by finding ``var`` in contexts of both root kinds."""
    layout = discover()
    value = b"\x01" * 32
    var_hash = hamt_hash(var)

    def check() -> None:
        var.set(value)
        if find(layout, contextvars.copy_context(), var, var_hash) != id(value):
            raise LayoutError("a context variable is not where the kernel would look")
        if ctypes.string_at(id(value) + BYTES_DATA, len(value)) != value:
            raise LayoutError("bytes are not laid out as expected")

    contextvars.Context().run(check)
    _array_root().run(check)
    return layout
