"""Splicing Python frames into native stacks (``_python/merge.py``)."""

from __future__ import annotations

from ebpf_stream._events import PYTHON_FRAME_ENTRY
from ebpf_stream._profile import Frame, FrameKind
from ebpf_stream._python.merge import EVAL_LOOP, merge, runs


def native(name: str, module: str = "libpython3.11.so") -> Frame:
    return Frame(name, module, FrameKind.NATIVE)


def py(name: str) -> Frame:
    return Frame(name, "app.py", FrameKind.PYTHON, 0, 1)


LOOP = native(EVAL_LOOP)
GARBAGE = native("[unknown]+0x1234", "[unknown]")


def test_runs_end_at_each_entry_frame() -> None:
    frames = [py("c"), py("b"), py("a"), py("main")]
    flags = [0, PYTHON_FRAME_ENTRY, 0, PYTHON_FRAME_ENTRY]
    assert runs(frames, flags) == [[py("c"), py("b")], [py("a"), py("main")]]


def test_each_loop_frame_is_replaced_by_its_run() -> None:
    # Leaf first: a C call made from the inner run, which a C function called
    # from the outer run entered.
    stack = [native("PyNumber_Add"), LOOP, native("PyObject_Call"), LOOP, native("main", "python")]
    python = [[py("inner")], [py("outer"), py("<module>")]]
    assert merge(stack, python) == (
        native("PyNumber_Add"), py("inner"), native("PyObject_Call"), py("outer"),
        py("<module>"), native("main", "python"))


def test_a_truncated_native_stack_keeps_the_outer_runs_and_drops_the_noise() -> None:
    stack = [native("PyNumber_Add"), LOOP, GARBAGE, native("memcpy", "libc.so.6")]
    python = [[py("inner")], [py("outer")]]
    assert merge(stack, python) == (native("PyNumber_Add"), py("inner"), py("outer"))


def test_without_a_loop_frame_only_the_named_leaf_frames_stay() -> None:
    stack = [native("time_sleep"), native("PyObject_Vectorcall"), GARBAGE, native("strlen")]
    python = [[py("culprit"), py("main")]]
    assert merge(stack, python) == (
        native("time_sleep"), native("PyObject_Vectorcall"), py("culprit"), py("main"))


def test_no_python_stack_leaves_the_native_one_alone() -> None:
    stack = [native("work", "a.out"), native("main", "a.out")]
    assert merge(stack, []) == tuple(stack)
