"""Ring buffer drain throughput: our batch reader against bcc's callback consumer.

One BPF program fills one 16 MiB ring with the CPU probe's own records
(``kernel/cpu_sample.h``, 88 bytes); each consumer then drains a full ring.  Both
consumers advance the same ``consumer_pos``, so they take turns on separate
fills, alternating within every round, and the figures are medians over the
rounds.  Filling stops below capacity and the kernel's drop counter must stay
at zero, so every consumer drains exactly the same number of records.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from ebpf_stream._bpf.loader import KERNEL_SOURCES
from ebpf_stream._bpf.ringbuf import RingBuffer
from ebpf_stream._probes.samples import SIZE as SAMPLE_SIZE

from ._support import bpf_unavailable, median, prepare_bcc

RECORDS_PER_TRIGGER = 128  # within the verifier's limit for this bounded loop
RING_PAGES = 4096
RING_BYTES = RING_PAGES * 4096
STRIDE = (8 + SAMPLE_SIZE + 7) & ~7  # header + payload, rounded to 8
TRIGGERS = RING_BYTES // STRIDE // RECORDS_PER_TRIGGER  # fill to just below capacity
RECORDS_PER_FILL = TRIGGERS * RECORDS_PER_TRIGGER
RECORD = KERNEL_SOURCES / "cpu_sample.h"

PROGRAM = r"""
BPF_RINGBUF_OUTPUT(events, RING_PAGES);
BPF_ARRAY(target, u64, 1);          /* the tgid whose getppid() emits, 0: none */
BPF_ARRAY(counters, u64, 2);        /* 0: records submitted, 1: reservations failed */

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u64 id = bpf_get_current_pid_tgid();
    int zero = 0, one = 1;
    u64 *tgid = target.lookup(&zero);
    if (!tgid || (id >> 32) != *tgid)
        return 0;
    u64 *submitted = counters.lookup(&zero), *failed = counters.lookup(&one);
    if (!submitted || !failed)
        return 0;
    for (int i = 0; i < PER_TRIGGER; i++) {
        struct sample *s = events.ringbuf_reserve(sizeof(*s));
        if (!s) {
            __sync_fetch_and_add(failed, 1);
            continue;
        }
        __builtin_memset(s, 0, sizeof(*s));
        s->timestamp_ns = bpf_ktime_get_ns();
        s->pid = id >> 32;
        s->tid = (u32)id;
        s->cpu = bpf_get_smp_processor_id();
        s->user_stack = 2 * i + 1;
        s->kernel_stack = NO_STACK;
        bpf_get_current_comm(&s->comm, sizeof(s->comm));
        events.ringbuf_submit(s, BPF_RB_NO_WAKEUP);
        __sync_fetch_and_add(submitted, 1);
    }
    return 0;
}
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Drain:
    """One drain of one full ring."""

    records: int
    wall_s: float
    cpu_ns: int

    @property
    def events_per_s(self) -> float:
        return self.records / self.wall_s

    @property
    def cpu_ns_per_event(self) -> float:
        return self.cpu_ns / self.records


class SameRingProducer:
    """The BPF producer and its ring, drained in turn by each consumer."""

    def __init__(self) -> None:
        prepare_bcc()
        from bcc import BPF

        self.bpf: Any = BPF(text=(RECORD.read_text() + PROGRAM).encode(), cflags=[
            f"-DRING_PAGES={RING_PAGES}", f"-DPER_TRIGGER={RECORDS_PER_TRIGGER}"])
        self.ring = RingBuffer(self.bpf[b"events"].map_fd, RING_BYTES, SAMPLE_SIZE)

    def _counter(self, i: int) -> int:
        return int(self.bpf[b"counters"][ctypes.c_int(i)].value)

    def _set_target(self, tgid: int) -> None:
        self.bpf[b"target"][ctypes.c_int(0)] = ctypes.c_uint64(tgid)

    def fill(self) -> None:
        """Emit RECORDS_PER_FILL records into the empty ring, and check none was lost."""
        if self.ring.bytes_pending:
            raise RuntimeError("the ring must be empty before a fill")
        before = self._counter(0)
        self._set_target(os.getpid())
        try:
            for _ in range(TRIGGERS):
                os.getppid()
        finally:
            self._set_target(0)
        submitted = self._counter(0) - before
        if self._counter(1) or submitted != RECORDS_PER_FILL:
            raise RuntimeError(f"fill lost records: {submitted} submitted, "
                               f"{self._counter(1)} reservations failed")
        if self.ring.bytes_pending != RECORDS_PER_FILL * STRIDE:
            raise RuntimeError(f"ring holds {self.ring.bytes_pending} bytes after a fill")

    def drain_ours(self) -> Drain:
        """Time ``read_batch()`` until the ring is empty."""
        records = 0
        cpu0, t0 = time.thread_time_ns(), time.perf_counter()
        while (batch := self.ring.read_batch()).size:
            records += batch.size
        wall, cpu = time.perf_counter() - t0, time.thread_time_ns() - cpu0
        return self._checked(Drain(records, wall, cpu))

    def drain_bcc(self, callback: Callable[[Any, int, int], int]) -> Drain:
        """Time one ``ring_buffer_consume()`` calling ``callback`` per record."""
        bpf = self.bpf
        # bcc keeps one consumer per BPF object: replace it to change callbacks.
        if bpf._ringbuf_manager:
            from bcc.libbcc import lib

            lib.bpf_free_ringbuf(bpf._ringbuf_manager)
            bpf._ringbuf_manager = None
        bpf["events"].open_ring_buffer(callback)
        cpu0, t0 = time.thread_time_ns(), time.perf_counter()
        bpf.ring_buffer_consume()
        wall, cpu = time.perf_counter() - t0, time.thread_time_ns() - cpu0
        return self._checked(Drain(RECORDS_PER_FILL, wall, cpu))

    def bcc_decoding_callback(self) -> Callable[[Any, int, int], int]:
        """A callback as bcc's tools write one: decode the event, read a field."""
        bpf = self.bpf

        def on_event(ctx: Any, data: int, size: int) -> int:
            event = bpf["events"].event(data)
            _ = event.pid
            return 0

        return on_event

    def _checked(self, drain: Drain) -> Drain:
        if drain.records != RECORDS_PER_FILL or self.ring.bytes_pending:
            raise RuntimeError(f"drained {drain.records} records of {RECORDS_PER_FILL}, "
                               f"{self.ring.bytes_pending} bytes left")
        return drain

    def close(self) -> None:
        self.ring.close()
        self.bpf.cleanup()


def _noop(ctx: Any, data: int, size: int) -> int:
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class ReaderFigures:
    """Medians over ``rounds`` fills per consumer, of ``records`` records each."""

    rounds: int
    records: int
    ours_events_per_s: float
    ours_cpu_ns_per_event: float
    bcc_events_per_s: float
    bcc_cpu_ns_per_event: float
    bcc_noop_events_per_s: float
    bcc_noop_cpu_ns_per_event: float

    @property
    def speedup_vs_bcc(self) -> float:
        return self.ours_events_per_s / self.bcc_events_per_s

    @property
    def speedup_vs_bcc_noop(self) -> float:
        return self.ours_events_per_s / self.bcc_noop_events_per_s


def measure_reader(rounds: int = 7) -> ReaderFigures:
    """Alternate full-ring drains by each consumer for ``rounds`` rounds."""
    producer = SameRingProducer()
    try:
        decode = producer.bcc_decoding_callback()
        ours: list[Drain] = []
        bcc: list[Drain] = []
        noop: list[Drain] = []
        # A warm-up round: first-touch page faults, bcc's event class, numpy paths.
        for drain in (producer.drain_ours, lambda: producer.drain_bcc(decode),
                      lambda: producer.drain_bcc(_noop)):
            producer.fill()
            drain()
        for _ in range(rounds):
            producer.fill()
            ours.append(producer.drain_ours())
            producer.fill()
            bcc.append(producer.drain_bcc(decode))
            producer.fill()
            noop.append(producer.drain_bcc(_noop))
    finally:
        producer.close()
    return ReaderFigures(
        rounds=rounds,
        records=RECORDS_PER_FILL,
        ours_events_per_s=median(d.events_per_s for d in ours),
        ours_cpu_ns_per_event=median(d.cpu_ns_per_event for d in ours),
        bcc_events_per_s=median(d.events_per_s for d in bcc),
        bcc_cpu_ns_per_event=median(d.cpu_ns_per_event for d in bcc),
        bcc_noop_events_per_s=median(d.events_per_s for d in noop),
        bcc_noop_cpu_ns_per_event=median(d.cpu_ns_per_event for d in noop),
    )


# -- asv ---------------------------------------------------------------------
# One measurement feeds every track_ figure, so they come from the same fills.

Cache = ReaderFigures | str


def setup_cache() -> Cache:
    return bpf_unavailable() or measure_reader()


setup_cache.timeout = 300  # type: ignore[attr-defined]


def setup(cache: Cache) -> None:
    if isinstance(cache, str):
        raise NotImplementedError(cache)


def track_reader_events_per_s(cache: ReaderFigures) -> float:
    return cache.ours_events_per_s


def track_bcc_callback_events_per_s(cache: ReaderFigures) -> float:
    return cache.bcc_events_per_s


def track_bcc_noop_callback_events_per_s(cache: ReaderFigures) -> float:
    return cache.bcc_noop_events_per_s


def track_reader_speedup_vs_bcc(cache: ReaderFigures) -> float:
    return cache.speedup_vs_bcc


def track_reader_cpu_ns_per_event(cache: ReaderFigures) -> float:
    return cache.ours_cpu_ns_per_event


for _fn, _unit in ((track_reader_events_per_s, "events/s"),
                   (track_bcc_callback_events_per_s, "events/s"),
                   (track_bcc_noop_callback_events_per_s, "events/s"),
                   (track_reader_speedup_vs_bcc, "x"),
                   (track_reader_cpu_ns_per_event, "ns")):
    _fn.unit = _unit  # type: ignore[attr-defined]
