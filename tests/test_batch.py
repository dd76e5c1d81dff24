"""The batch model: what counts as a sample, when a batch is empty, a stall's culprit."""

from __future__ import annotations

from sample_frames import MAIN, PERIOD, START, WORK, python

from ebpf_stream._model.batch import Batch, SlowCall, Stall, StallStack
from ebpf_stream._model.events import LoopStall, MemoryTotals, OomKill, SlowSyscall
from ebpf_stream._model.profile import Frame, FrameKind, Profile

HANDLER = python("handle", "/srv/app.py", 12)
UNNAMED = Frame("[unknown python]", "[unknown]", FrameKind.PYTHON)  # no line: not named


def profile(samples: int = 0) -> Profile:
    p = Profile(PERIOD, START, START + 100 * PERIOD)
    if samples:
        p.add(7, "app", (MAIN, WORK), samples)
    return p


def stall(*stacks: StallStack) -> Stall:
    return Stall(LoopStall(START, 7, 8, "app", START - 10**8, 10**8), stacks)


def test_records_count_as_samples() -> None:
    slow = SlowCall(SlowSyscall(START, 7, 8, "app", "read", 10**6, 0, [], []), ())
    oom = OomKill(START, 9, "hog", 1 << 30, 1 << 29, 0, 0, 0)
    batch = Batch(profile(3), records=[slow, oom, stall()])
    assert batch.sample_count == 6
    assert [(r.pid, r.comm) for r in batch.records] == [(7, "app"), (9, "hog"), (7, "app")]


def test_a_batch_is_empty_only_with_nothing_to_say() -> None:
    assert Batch(profile()).empty
    assert not Batch(profile(1)).empty
    assert not Batch(profile(), dropped=2).empty, "losses are news"
    assert not Batch(profile(), totals=[MemoryTotals(7, "app", *[0] * 11)]).empty
    assert not Batch(profile(), records=[stall()]).empty


def test_the_culprit_is_the_innermost_named_python_frame_of_the_heaviest_stack() -> None:
    heaviest = StallStack((MAIN, HANDLER, UNNAMED, WORK), slept_ns=10**8)
    lighter = StallStack((MAIN, python("other", "/srv/app.py", 3)), samples=5)
    assert stall(heaviest, lighter).culprit == HANDLER
    assert stall(StallStack((MAIN, WORK), samples=9)).culprit is None, "no Python frame"
    assert stall().culprit is None, "no stack seen"
