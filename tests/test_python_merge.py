"""Splicing Python frames into native stacks (``_python/merge.py``)."""

from __future__ import annotations

import pytest

from ebpf_stream._model.events import PYTHON_FRAME_ENTRY
from ebpf_stream._model.profile import Frame, FrameKind
from ebpf_stream._symbols.merge import EVAL_LOOP, merge, runs


def native(name: str, module: str = "libpython3.11.so") -> Frame:
    return Frame(name, module, FrameKind.NATIVE)


def py(name: str) -> Frame:
    return Frame(name, "app.py", FrameKind.PYTHON, 0, 1)


LOOP = native(EVAL_LOOP)
GARBAGE = native("[unknown]+0x1234", "[unknown]")
# What a frame-pointer walk reads past an interpreter frame built without
# frame pointers: data addresses (the heap, the interpreter's data segment),
# small integers, or now and then a word that happens to point into code.
NOISE = {
    "data": [native("[unknown]+0x7f4ecea12e00", "[unknown]"),
             native("[unknown]+0x7f4ecf056240", "[unknown]")],
    "small": [native("[unknown]+0x2", "[unknown]")],
    "code": [native("long_dealloc")],
    "none": [],
}


def test_runs_end_at_each_entry_frame() -> None:
    frames = [py("c"), py("b"), py("a"), py("main")]
    flags = [0, PYTHON_FRAME_ENTRY, 0, PYTHON_FRAME_ENTRY]
    assert runs(frames, flags) == [[py("c"), py("b")], [py("a"), py("main")]]


def test_each_loop_frame_is_replaced_by_its_run() -> None:
    # Leaf first, as an interpreter with frame pointers unwinds: a C call made
    # from the inner run, which a C function called from the outer run entered.
    stack = [native("PyNumber_Add"), LOOP, native("PyObject_Call"), LOOP, native("Py_RunMain"),
             native("main", "python"), native("_start", "python")]
    python = [[py("inner")], [py("outer"), py("<module>")]]
    assert merge(stack, python) == (
        native("PyNumber_Add"), py("inner"), native("PyObject_Call"), py("outer"),
        py("<module>"))


@pytest.mark.parametrize("noise", list(NOISE))
@pytest.mark.parametrize("leaf", [[], [native("x_add")], [native("clock_gettime", "[vdso]")]])
def test_the_outermost_python_frame_is_the_root_whatever_the_walk_read_past_it(
        leaf: list[Frame], noise: str) -> None:
    # A pure-Python thread sampled in the loop itself or in a C function it
    # called; the loop frame is the last the walk got right.
    python = [[py("leaf"), py("main"), py("<module>")]]
    assert merge([*leaf, LOOP, *NOISE[noise]], python) == (
        *leaf, py("leaf"), py("main"), py("<module>"))


@pytest.mark.parametrize("noise", list(NOISE))
def test_a_thread_started_by_threading_is_rooted_at_its_bootstrap(noise: str) -> None:
    # 3.13 runs a thread's target in the same loop call as Thread._bootstrap;
    # 3.11 enters the loop again for it, which leaves one run unpaired.
    bootstrap = [py("Thread.run"), py("Thread._bootstrap_inner"), py("Thread._bootstrap")]
    expected = (py("spin"), *bootstrap)
    assert merge([LOOP, *NOISE[noise]], [[py("spin"), *bootstrap]]) == expected
    assert merge([LOOP, *NOISE[noise]], [[py("spin")], bootstrap]) == expected


def test_a_loop_frame_past_the_last_run_is_noise_too() -> None:
    stack = [native("PyNumber_Add"), LOOP, native("PyObject_Call"), LOOP]
    assert merge(stack, [[py("main"), py("<module>")]]) == (
        native("PyNumber_Add"), py("main"), py("<module>"))


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
