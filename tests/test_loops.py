"""Gathering a stalled loop's stacks (``_loops.py``), from hand-made records."""

from __future__ import annotations

import os
import subprocess

import pytest

from ebpf_stream._model.events import CpuSample, LoopBlocked, LoopStall, LoopThread, LoopTotals
from ebpf_stream._model.profile import Frame, FrameKind
from ebpf_stream._pipeline import loops
from ebpf_stream._pipeline.loops import LoopWatch


def py(name: str, module: str = "/srv/app.py") -> Frame:
    return Frame(name, module, FrameKind.PYTHON, 0, 1)


ASYNCIO_WAIT = (py("main"),
                py("BaseEventLoop.run_forever", "/usr/lib/python3.11/asyncio/base_events.py"),
                py("EpollSelector.select", "/usr/lib/python3.11/selectors.py"))
OTHER_WAIT = (py("serve"), py("EpollSelector.select", "/usr/lib/python3.11/selectors.py"))
CULPRIT = (py("Handle._run", "/usr/lib/python3.11/asyncio/events.py"), py("handler"), py("culprit"))
# Python stack keys -> root-first frames, as the batcher's resolver would give them.
STACKS = {1: ASYNCIO_WAIT, 2: OTHER_WAIT, 3: CULPRIT}


def watch() -> LoopWatch:
    w = LoopWatch(lambda pid, key: STACKS.get(key))
    w.thread(LoopThread(10, 10, 1))  # the main thread runs asyncio
    w.thread(LoopThread(10, 11, 2))  # a selector in a worker thread does not
    return w


def sample(tid: int, busy_since: int) -> CpuSample:
    return CpuSample(0, 10, tid, 0, "app", -14, -14, 0, busy_since)


def test_a_stall_carries_its_sleeps_and_samples_heaviest_first() -> None:
    w = watch()
    w.sample(sample(10, 500), ASYNCIO_WAIT)
    w.blocked(LoopBlocked(10, 10, 500, 300_000_000, 3))
    w.sample(sample(10, 400), ASYNCIO_WAIT)  # an earlier period: not this stall's
    w.blocked(LoopBlocked(10, 10, 600, 200_000_000, 3))
    w.sample(sample(10, 600), ASYNCIO_WAIT)
    stall = w.stall(LoopStall(0, 10, 10, "app", 600, 310_000_000))
    assert stall is not None
    assert [(s.frames, s.samples, s.slept_ns) for s in stall.stacks] == [
        (CULPRIT, 0, 200_000_000), (ASYNCIO_WAIT, 1, 0)]


def test_pollers_other_than_asyncio_never_stall() -> None:
    w = watch()
    w.blocked(LoopBlocked(10, 11, 700, 300_000_000, 3))
    assert w.stall(LoopStall(0, 10, 11, "app", 700, 300_000_000)) is None
    assert w.stall(LoopStall(0, 10, 12, "app", 700, 300_000_000)) is None  # never seen waiting
    assert not w.keeps(LoopTotals(10, 11, "app", 1, 1, [0] * 32))
    assert w.keeps(LoopTotals(10, 10, "app", 1, 1, [0] * 32))


def test_a_stall_without_records_still_reports_its_duration() -> None:
    stall = watch().stall(LoopStall(5, 10, 10, "app", 800, 150_000_000))
    assert stall is not None and stall.stacks == () and stall.stall.duration_ns == 150_000_000


def test_forgetting_a_process_forgets_its_loops() -> None:
    w = watch()
    w.forget(10)
    assert w.stall(LoopStall(0, 10, 10, "app", 600, 300_000_000)) is None


def test_a_stall_tells_by_its_own_wait_without_its_threads_first_record() -> None:
    """A thread whose first record was lost, or whose first wait came before
    its process was walked, still has its stalls, with their stacks."""
    w = LoopWatch(lambda pid, key: STACKS.get(key))
    w.blocked(LoopBlocked(10, 10, 500, 300_000_000, 3))
    stall = w.stall(LoopStall(0, 10, 10, "app", 500, 310_000_000, python_stack=1))
    assert stall is not None and stall.stacks[0].frames == CULPRIT
    assert w.keeps(LoopTotals(10, 10, "app", 1, 1, [0] * 32))
    assert w.stall(LoopStall(0, 10, 11, "app", 700, 300_000_000, python_stack=2)) is None
    # Not walked: the thread's earlier asyncio wait decides.
    assert w.stall(LoopStall(0, 10, 10, "app", 900, 300_000_000)) is not None


def test_an_exited_process_is_forgotten_at_the_second_look_after_its_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "_EXITED_EVERY_S", 0.0)
    exited = subprocess.Popen(["true"])
    exited.wait()
    w = LoopWatch(lambda pid, key: STACKS.get(key))
    for pid in (exited.pid, os.getpid()):
        w.thread(LoopThread(pid, pid, 1))
    w.forget_exited()  # found gone: its last stall may still be on its way
    assert w.keeps(LoopTotals(exited.pid, exited.pid, "app", 1, 1, [0] * 32))
    w.forget_exited()
    assert not w.keeps(LoopTotals(exited.pid, exited.pid, "app", 1, 1, [0] * 32))
    assert w.keeps(LoopTotals(os.getpid(), os.getpid(), "app", 1, 1, [0] * 32))
