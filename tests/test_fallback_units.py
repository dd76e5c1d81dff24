"""The fallback's parts, in this process: stack encoding, thread clocks, busy periods."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from ebpf_stream._probes.fallback import busy
from ebpf_stream._probes.fallback.calls import FUTEX, Calls
from ebpf_stream._probes.fallback.stacks import StackKeys, cpu_ns, native_ids, stack_key, walk
from ebpf_stream._python.code import line_of


def test_a_walked_stack_names_the_lines_the_interpreter_reports() -> None:
    """lasti is in code units, as the kernel's walker reads it: the batcher's line
    table lookup gives each frame's own f_lineno."""
    def inner() -> list[tuple[int, int]]:
        frames, truncated = walk(sys._getframe())
        assert not truncated
        # The callers' frames, which wait in their calls; this one has moved on since.
        frame = sys._getframe().f_back
        lines = []
        for code, lasti, first_line, _ in frames[1:]:
            assert frame is not None and code == id(frame.f_code)
            lines.append((line_of(frame.f_code.co_linetable, first_line, lasti), frame.f_lineno))
            frame = frame.f_back
        return lines

    for walked, actual in inner():
        assert walked == actual


def test_a_stack_is_sent_once_per_epoch_and_again_in_the_next_but_one() -> None:
    keys = StackKeys()
    out: list[object] = []
    frame = sys._getframe(1)  # the caller's: it waits in this call, at one instruction
    key = keys.key(frame, out)  # type: ignore[arg-type]
    assert key == stack_key(walk(frame)[0]) and key & 1 and key > 0
    assert keys.key(frame, out) == key and len(out) == 1  # type: ignore[arg-type]
    keys.next_epoch()
    keys.key(frame, out)  # type: ignore[arg-type]
    assert len(out) == 1, "sent in the last epoch: the batcher still holds it"
    keys.next_epoch()
    keys.key(frame, out)  # type: ignore[arg-type]
    assert len(out) == 2


def test_a_threads_cpu_clock_counts_its_own_cpu_and_fails_once_it_is_gone() -> None:
    found: dict[str, int] = {}

    def spin() -> None:
        found["tid"] = threading.get_native_id()
        end = time.thread_time_ns() + 50_000_000
        while time.thread_time_ns() < end:
            pass
        found["cpu"] = time.thread_time_ns()

    thread = threading.Thread(target=spin)
    thread.start()
    assert thread.ident is not None
    tid = native_ids()[thread.ident]
    thread.join()
    assert tid == found["tid"]
    assert cpu_ns(threading.get_native_id()) is not None
    # Read once: the thread may still be exiting (and spend a little more) or be gone.
    after = cpu_ns(tid)
    assert after is None or found["cpu"] <= after <= found["cpu"] + 5_000_000, after
    assert cpu_ns(2**22 + 12345) is None, "no such thread"


def test_a_selector_loop_times_each_busy_period_and_is_given_back_its_selector() -> None:
    async def main() -> busy.BusyPeriods:
        loop = asyncio.get_running_loop()
        original = loop._selector  # type: ignore[attr-defined]
        periods = busy.watch(loop, threading.get_native_id(), stall_ns=100_000_000)
        assert loop._selector is not original  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
        time.sleep(0.15)  # a stall
        await asyncio.sleep(0.01)
        time.sleep(0.02)  # busy, below the threshold
        await asyncio.sleep(0.01)
        periods.close()
        assert loop._selector is original  # type: ignore[attr-defined]
        return periods

    periods = asyncio.run(main())
    (since, duration, ended) = periods.stalls.popleft()
    assert 150_000_000 <= duration < 170_000_000 and ended == since + duration
    assert periods.count >= 3 and sum(periods.buckets) == periods.count
    assert periods.buckets[duration.bit_length() - 1] >= 1


def test_a_thread_waiting_for_the_gil_is_told_from_one_blocked_in_a_lock() -> None:
    """Both wait in a futex; only the GIL's is taken for a thread that runs."""
    calls = Calls()
    assert calls.learn_gil()
    lock = threading.Lock()
    lock.acquire()
    done = False

    def nap() -> None:
        while not done:
            time.sleep(0.0005)

    blocked = threading.Thread(target=lock.acquire)
    napping = threading.Thread(target=nap)
    blocked.start()
    napping.start()
    try:
        assert blocked.native_id is not None and napping.native_id is not None
        seen = set()
        deadline = time.monotonic() + 2
        while len(seen) < 2 and time.monotonic() < deadline:
            in_lock = calls.now(blocked.native_id)
            if in_lock is not None and in_lock[0] == FUTEX:
                assert not calls.wants_gil(in_lock)
                seen.add("lock")
            napper = calls.now(napping.native_id)
            if napper is not None and napper[0] == FUTEX and calls.wants_gil(napper):
                seen.add("gil")
        assert seen == {"lock", "gil"}
    finally:
        done = True
        lock.release()
        blocked.join()
        napping.join()
    assert calls.now(blocked.native_id) is None


def test_a_loop_without_a_selector_is_polled_for_its_waits() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> busy.BusyPeriods:
        periods = busy.watch(asyncio.get_running_loop(), threading.get_native_id(),
                             stall_ns=100_000_000)
        stop = threading.Event()

        def poll() -> None:
            calls = Calls()
            calls.learn_gil()
            while not stop.wait(0.01):
                periods.poll(time.monotonic_ns(), calls)

        poller = threading.Thread(target=poll)
        poller.start()
        await asyncio.sleep(0.05)
        time.sleep(0.2)
        await asyncio.sleep(0.05)
        stop.set()
        poller.join()
        return periods

    periods = uvloop.run(main())
    (_, duration, _) = periods.stalls.popleft()
    assert 180_000_000 <= duration <= 220_000_000
    assert not periods.stalls


def test_threads_that_come_and_go_are_sampled_then_forgotten() -> None:
    """A pool that churns threads gets the same idents over and over: each new
    thread is sampled all the same, and the sampler's tables do not grow."""
    from ebpf_stream import EbpfConfig
    from ebpf_stream._base.overhead import CpuMeter
    from ebpf_stream._base.stats import Stats
    from ebpf_stream._probes.fallback import FallbackProbe

    def burn() -> None:
        end = time.thread_time_ns() + 30_000_000
        while time.thread_time_ns() < end:
            pass

    async def main() -> FallbackProbe:
        probe = FallbackProbe(EbpfConfig().with_sample_rate(99), Stats(), CpuMeter(),
                              watch_loop=False)
        await probe.open()
        probe.start()
        for _ in range(10):
            thread = threading.Thread(target=burn)
            thread.start()
            await asyncio.sleep(0.05)
            thread.join()
        await asyncio.sleep(0.1)
        probe.stop()
        probe.close()
        return probe

    probe = asyncio.run(main())
    assert probe._stats.received > 0
    assert len(probe._cpu) <= threading.active_count() + 1, probe._cpu
