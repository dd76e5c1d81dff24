"""The fallback probe: the host's own threads, sampled from a thread of ours.

Without BPF the profiler can still see the one process it runs in.  The
main thread (a service's event loop, mostly) is sampled where its CPU goes,
by a timer on its CPU clock (``timer``).  The other threads are sampled
from a thread of ours, which wakes at the configured rate (and, while it
polls a loop for stalls, at least four times per stall threshold) and reads
every thread's CPU clock: a thread gets a sample per sampling period of
CPU it used, at the stack where it stands, once it is found running there
(``calls`` tells which threads are, from the kernel's view).  So the
samples weigh what each thread ran, as the kernel's CPU-clock samples do,
and a thread that waited costs one clock read and no stack walk.

What it emits is what the BPF CPU probe emits (``CpuSample``,
``PythonStack``, the loop records, a ``Watermark`` per message), so the
batcher, the stall reports and every exporter treat both modes alike.
Samples carry no native stacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import threading
import time

import anyio

from ..._base.clock import ring_latency_s, wall_clock_offset_ns
from ..._base.config import EbpfConfig, PythonFrames
from ..._base.overhead import CpuMeter
from ..._base.stats import Stats
from ..._context.threads import ThreadRequest, this_thread
from ..._model.events import (
    NO_STACK,
    CpuSample,
    Event,
    EventMessage,
    LoopBlocked,
    LoopStall,
    LoopThread,
    LoopTotals,
    Watermark,
    encode_events,
)
from ..base import Emit, Probe
from ..pids import process_name
from . import busy as busy_periods
from .calls import RUNNING, Calls
from .stacks import StackKeys, cpu_ns, native_ids, walk
from .timer import MainThreadTimer, Walked

log = logging.getLogger("ebpf_stream")

# A busy loop thread that ran less than this share of a tick was asleep: the
# tick reports where it slept.
_ASLEEP = 0.1
# CPU a thread may use, in sampling periods, before it is found running to
# be sampled: beyond it, a thread that only ever runs between ticks loses it.
_MAX_CREDIT = 100


class FallbackProbe(Probe):
    """Samples the host process's threads in-process, at ``config.sample_rate_hz``.

    With ``watch_loop`` it is opened on the host's event loop, and watches
    that loop for stalls.
    """

    def __init__(self, config: EbpfConfig, stats: Stats, meter: CpuMeter, *,
                 watch_loop: bool) -> None:
        self._config = config
        self._stats = stats
        self._meter = meter
        self._period_ns = config.sample_period_ns
        self._stall_ns = int(config.loop_stall_ms * 1e6)
        self._watch_stalls = (watch_loop and config.python_frames is not PythonFrames.OFF
                              and config.loop_stall_ms > 0)
        self._tick_s = max(self._period_ns, 1_000_000) / 1e9
        self._pid = os.getpid()
        self._comm = process_name(self._pid) or ""
        self._offset = wall_clock_offset_ns()
        self._keys = StackKeys()
        self._cpu: dict[int, int] = {}  # tid -> CPU time at the last tick
        self._credit: dict[int, int] = {}  # tid -> CPU time not yet sampled
        # tid -> (frame id, instruction) where the thread was last found blocked
        self._blocked_at: dict[int, tuple[int, int]] = {}
        self._calls = Calls()
        self._busy: busy_periods.BusyPeriods | None = None
        self._timer: MainThreadTimer | None = None
        self._loop_request: ThreadRequest | None = None  # the loop thread's, read from here
        self._timer_cpu_ns = 0  # of the handler's CPU, what the meter has been told
        self._lock = threading.Lock()
        self._pending: list[Event] = []
        self._pending_samples = 0
        self._started_ns = 0
        self._complete_ns = 0  # every sample before this is in _pending or sent
        self._last_tick_ns = 0
        # Stacks are sent again each epoch, so the batcher can forget old ones.
        self._epoch_ns = int(config.export_interval_s * 1e9)
        self._next_epoch_ns = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the Probe interface ----------------------------------------------------

    async def open(self) -> None:
        if self._watch_stalls:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # another event loop library: no stalls to watch
                loop = None
            if loop is not None:
                self._busy = busy_periods.watch(loop, threading.get_native_id(),
                                                self._stall_ns)
                self._loop_request = this_thread()
                if self._busy.polled:  # a loop polled for its waits: four looks a threshold
                    self._tick_s = min(self._tick_s, self._stall_ns / 4e9)
                # The loop is named now, from the stack that runs this code (its
                # root is the loop's), not when it is first found waiting: a
                # service busy from the start would lose the stalls before that.
                key = self._keys.key(sys._getframe(), self._pending)
                self._pending.append(LoopThread(self._pid, self._busy.tid, key))

    def start(self) -> None:
        timer = MainThreadTimer(self._period_ns, walk, self._busy_since)
        if timer.start():
            self._timer = timer
        self._started_ns = self._last_tick_ns = time.monotonic_ns()
        self._next_epoch_ns = self._started_ns + self._epoch_ns
        self._thread = threading.Thread(target=self._sample_forever,
                                        name="ebpf-stream-sampler", daemon=True)
        self._thread.start()

    async def run(self, emit: Emit) -> None:
        latency = ring_latency_s(self._config)
        interval = self._config.export_interval_s
        next_totals = time.monotonic() + interval / 2
        while True:
            await anyio.sleep(latency)
            await emit(self._message())
            if time.monotonic() >= next_totals:
                next_totals += interval
                await emit(encode_events(self._totals(), 0))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    async def drain(self, emit: Emit) -> None:
        await emit(self._message())
        stopped = Watermark(self._started_ns + self._offset,
                            time.monotonic_ns() + self._offset, stopped=True)
        await emit(encode_events([*self._totals(), stopped], 0))

    def close(self) -> None:
        self.stop()
        if self._timer is not None:
            self._timer.close()
        if self._busy is not None:
            self._busy.close()

    def kernel_drops(self) -> int:
        return 0

    def program_fds(self) -> list[int]:
        return []

    def map_fds(self) -> list[int]:
        return []

    # -- the sampling thread ----------------------------------------------------

    def _sample_forever(self) -> None:
        # Jittered, so that the ticks never beat against a periodic workload
        # (a timer in the host's loop would otherwise be seen at one phase
        # only); a generator of our own leaves the host's ``random`` alone.
        jitter = random.Random()
        try:
            self._calls.learn_gil()
            while not self._stopping.wait(self._tick_s * jitter.uniform(0.75, 1.25)):
                with self._meter.measure():
                    self._tick()
        except Exception:  # a bug of ours: the host runs on, unsampled
            log.exception("ebpf-stream: the sampling thread stopped")

    def _tick(self) -> None:
        busy = self._busy
        now = time.monotonic_ns()
        if busy is not None:
            busy.poll(now, self._calls)
        if now >= self._next_epoch_ns:
            self._next_epoch_ns += self._epoch_ns
            self._keys.next_epoch()
        events: list[Event] = []
        # Stalls that have ended go before this tick's samples, which belong to
        # later busy periods: the batcher gathers a period's stacks in order.
        while busy is not None and busy.stalls:
            since, duration, ended = busy.stalls.popleft()
            events.append(LoopStall(ended + self._offset, self._pid, busy.tid, self._comm,
                                    since, duration))
        samples = self._sample_threads(now, now - self._last_tick_ns, events)
        samples += self._timer_samples(events)
        self._last_tick_ns = now
        with self._lock:
            self._pending += events
            self._pending_samples += samples
            self._complete_ns = now
        self._stats.received += samples

    def _sample_threads(self, now: int, tick_ns: int, events: list[Event]) -> int:
        """Sample each thread on a CPU that has used a sampling period since it
        was last sampled, into ``events``; how many samples.

        All of it runs with the GIL held, so every thread stands where it let
        the GIL go.  A thread on a CPU (computing without the GIL) or waiting
        for the GIL (stopped by the sampler or another thread amid its Python)
        ran at that stack, and is sampled with the CPU it has used.  A thread
        blocked in a call is not: its CPU went elsewhere, and waits to be
        sampled when the thread is next found running.  Nor is a thread that
        waits for the GIL where it was last found blocked: woken from that
        call, it has run no Python since.  A method of its own so that no
        frame of the host's outlives it.
        """
        busy = self._busy
        calls = self._calls
        period = self._period_ns
        samples = 0
        # Threads found on a CPU: looked at again once the others are done,
        # for a thread that has just let the GIL go to block is on a CPU still.
        again: list[tuple[int, Walked, tuple[int, int], int]] = []
        frames = sys._current_frames()
        tids = native_ids()
        tids.pop(threading.get_ident(), None)  # this thread
        alive = set(tids.values())
        for ident, frame in frames.items():
            tid = tids.get(ident)
            used = self._cpu_used(tid) if tid is not None else None
            if tid is None or used is None:
                continue
            since = busy.since if busy is not None and busy.tid == tid else 0
            credit = self._credit[tid] = min(self._credit.get(tid, 0) + used,
                                             _MAX_CREDIT * period)
            at = (id(frame), frame.f_lasti)
            if not used:  # it has not run since the last tick: it is not running now
                self._blocked_at[tid] = at
            elif credit >= period and not (self._timer is not None
                                           and tid == self._timer.tid):
                # Due: sampled if found running, else its credit waits.
                call = calls.now(tid)
                if call is None:
                    continue
                if call[0] != RUNNING and not calls.wants_gil(call):  # blocked
                    self._blocked_at[tid] = at
                elif at == self._blocked_at.get(tid):  # woken, not yet back in Python
                    pass
                elif call[0] == RUNNING:
                    again.append((tid, walk(frame), at, since))
                else:
                    samples += self._sample(tid, walk(frame), now, since, events)
                continue
            if since and used < _ASLEEP * tick_ns:
                events.append(LoopBlocked(self._pid, tid, since, tick_ns,
                                          self._keys.key(frame, events), self._request(tid)))
        if len(self._cpu) > len(alive):  # threads have ended: forget them
            self._cpu = {t: c for t, c in self._cpu.items() if t in alive}
            self._credit = {t: c for t, c in self._credit.items() if t in alive}
            self._blocked_at = {t: a for t, a in self._blocked_at.items() if t in alive}
        del frames
        for tid, walked, at, since in again:
            call = calls.now(tid)
            if call is None:
                continue
            if call[0] == RUNNING or calls.wants_gil(call):
                samples += self._sample(tid, walked, now, since, events)
            else:
                self._blocked_at[tid] = at
        return samples

    def _sample(self, tid: int, walked: Walked, now: int, since: int,
                events: list[Event]) -> int:
        """Sample ``tid`` at ``walked`` once per sampling period of its credit."""
        n, self._credit[tid] = divmod(self._credit[tid], self._period_ns)
        key = self._keys.key_of(walked, events)
        events += [CpuSample(now + self._offset, self._pid, tid, -1, self._comm,
                             NO_STACK, NO_STACK, key, since, self._request(tid))] * n
        return n

    def _request(self, tid: int) -> bytes:
        """The request ``tid`` runs: known for the loop's thread (see ``ThreadRequest``)."""
        loop = self._loop_request
        return loop() if loop is not None and tid == loop.tid else b""

    def _timer_samples(self, events: list[Event]) -> int:
        """The main thread's samples the timer took since the last tick, into ``events``."""
        timer = self._timer
        if timer is None:
            return 0
        taken = 0
        while timer.samples:
            at, walked, since, request = timer.samples.popleft()
            key = self._keys.key_of(walked, events)
            events.append(CpuSample(at + self._offset, self._pid, timer.tid, -1, self._comm,
                                    NO_STACK, NO_STACK, key, since, request))
            taken += 1
        spent = timer.cpu_ns
        self._meter.ns += spent - self._timer_cpu_ns
        self._timer_cpu_ns = spent
        return taken

    def _busy_since(self) -> int:
        busy = self._busy
        return busy.since if busy is not None else 0

    def _cpu_used(self, tid: int) -> int | None:
        """CPU time ``tid`` used since the last tick; None at first sight or once gone."""
        now = cpu_ns(tid)
        if now is None:
            self._cpu.pop(tid, None)
            self._credit.pop(tid, None)
            return None
        before = self._cpu.get(tid)
        self._cpu[tid] = now
        return None if before is None else now - before

    # -- messages -----------------------------------------------------------------

    def _message(self) -> EventMessage:
        with self._lock:
            events, self._pending = self._pending, []
            samples, self._pending_samples = self._pending_samples, 0
            complete = self._complete_ns
        events.append(Watermark(self._started_ns + self._offset,
                                complete + self._offset if complete else 0))
        return encode_events(events, samples)

    def _totals(self) -> list[Event]:
        busy = self._busy
        if busy is None or not busy.count:
            return []
        return [LoopTotals(self._pid, busy.tid, self._comm, busy.count, busy.total_ns,
                           list(busy.buckets))]

