"""CPU profiling probe: perf_event CPU_CLOCK sampling on every CPU.

User space does as little as possible per sample: records are fixed-size
and decoded a batch at a time, and each stack is read from the kernel once
per stack-map generation, however many samples share it.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Sequence

import anyio.lowlevel
import numpy as np

from .._bpf import PERF_COUNT_SW_CPU_CLOCK, PERF_TYPE_SOFTWARE
from .._config import EbpfConfig
from .._events import CpuSample, Event, EventMessage, StackTrace, encode_events
from .._loader import load_program
from .._ringbuf import RingBuffer
from .._stats import Stats
from .base import Emit, RingProbe
from .tracing import CommNames, load_targets, wall_clock_offset_ns

# Mirrors `struct sample` in kernel/cpu_profile.bpf.c.
SAMPLE = np.dtype([
    ("timestamp_ns", "<u8"), ("pid", "<u4"), ("tid", "<u4"), ("cpu", "<u4"),
    ("user_stack_id", "<i4"), ("kernel_stack_id", "<i4"), ("generation", "<u4"),
    ("comm", "S16"),
])
_WAKEUP_EVERY = 64
_PAGE = 4096
_MAX_STACK_DEPTH = 127
_U32 = struct.Struct("<I")


class CpuProbe(RingProbe):
    """Samples at ``config.sample_rate_hz`` and emits ``CpuSample``/``StackTrace`` events.

    ``targets`` are the thread-group ids to sample; ``None`` samples every
    process.  With ``follow_children`` the targets' descendants are sampled
    too, from their fork on.
    """

    def __init__(
        self,
        config: EbpfConfig,
        stats: Stats,
        *,
        targets: Sequence[int] | None,
        follow_children: bool = False,
    ) -> None:
        self._config = config
        self._stats = stats
        self._targets = None if targets is None else tuple(targets)
        self._follow = follow_children and targets is not None
        super().__init__(config)
        self._wall_offset_ns = wall_clock_offset_ns()
        self._epoch = 0
        self._epoch_start = [0, 0]  # CLOCK_MONOTONIC start of the epochs of each generation
        self._sent: set[int] = set()  # stack keys already emitted
        self._keys_this_epoch = 0
        self._comm = CommNames()
        # Rotate well before the map gets crowded: a stack map is a hash table
        # whose bucket collisions lose stacks (at 1/16 full, at most 6% of new
        # stacks can collide).
        self._rotate_after_keys = max(16, config.stack_map_entries // 16)
        self._rotate_after_ns = int(config.export_interval_s * 1e9)

    ring_full_counter = 1  # RING_FULL in kernel/cpu_profile.bpf.c

    def cflags(self) -> list[str]:
        c = self._config
        return [
            f"-DSTACK_ENTRIES={c.stack_map_entries}",
            f"-DRINGBUF_PAGES={c.ring_buffer_bytes // _PAGE}",
            f"-DFILTER_PIDS={int(self._targets is not None)}",
            f"-DFOLLOW_CHILDREN={int(self._follow)}",
            f"-DINCLUDE_IDLE={int(c.include_idle)}",
            f"-DWAKEUP_EVERY={_WAKEUP_EVERY}",
        ]

    def _map_names(self) -> list[str]:
        names = ["samples", "stacks_0", "stacks_1", "generation", "counters", "known"]
        return [*names, "targets"] if self._targets is not None else names

    async def open(self) -> None:
        self._program = await load_program(
            "cpu_profile.bpf.c", {"on_cpu_sample": "PERF_EVENT"}, self._map_names(),
            self.cflags())
        try:
            await anyio.lowlevel.checkpoint()  # cancelled while compiling: close, then raise
            load_targets(self._program, self._targets or ())
            self._epoch_start[0] = time.monotonic_ns()
            self._ring = RingBuffer(self.map("samples").fd, self._config.ring_buffer_bytes,
                                    SAMPLE)
            if self._follow:
                self._program.attach_tracepoints()
            self._program.attach_perf_event("on_cpu_sample", PERF_TYPE_SOFTWARE,
                                            PERF_COUNT_SW_CPU_CLOCK, self._config.sample_period_ns)
        except BaseException:
            self.close()
            raise

    async def run(self, emit: Emit) -> None:
        await self.read_ring(emit)

    async def drain(self, emit: Emit) -> None:
        await self.drain_ring(emit)

    def encode(self, records: np.ndarray) -> EventMessage:
        n = len(records)
        self._stats.received += n
        ts = records["timestamp_ns"].astype(np.int64)
        user = self._stack_keys(records["user_stack_id"], records["generation"], ts)
        kernel = self._stack_keys(records["kernel_stack_id"], records["generation"], ts)

        events: list[Event] = []
        for key in np.unique(np.concatenate((user[user >= 0], kernel[kernel >= 0]))).tolist():
            if key not in self._sent:
                addresses = self._read_stack(key)
                if addresses is not None:
                    events.append(StackTrace(key, addresses))
                    self._sent.add(key)
                    self._keys_this_epoch += 1
        comms = [self._comm(c) for c in records["comm"].tolist()]
        events.extend(
            CpuSample(t, pid, tid, cpu, comm, u, k)
            for t, pid, tid, cpu, comm, u, k in zip(
                (ts + self._wall_offset_ns).tolist(), records["pid"].tolist(),
                records["tid"].tolist(), records["cpu"].tolist(), comms,
                user.tolist(), kernel.tolist(), strict=True)
        )
        self._maybe_rotate()
        return encode_events(events, n)

    def _stack_keys(self, ids: np.ndarray, generation: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Run-unique keys (epoch << 32 | id) for stack ids; errors stay negative.

        A record whose generation bit points at an epoch that began after the
        record was taken is from two generations back: its map has been
        cleared since, so its stack is reported lost (-ESTALE) rather than
        resolved to a stranger's stack.
        """
        current = self._epoch
        epoch = np.where(generation == (current & 1), current, current - 1).astype(np.int64)
        start = np.asarray(self._epoch_start, dtype=np.int64)[epoch & 1]
        stale = ts < start
        keys = np.where(ids >= 0, (epoch << 32) | ids.astype(np.int64), ids.astype(np.int64))
        return np.where(stale & (ids >= 0), -errno.ESTALE, keys)

    def _read_stack(self, key: int) -> list[int] | None:
        raw = self.map(f"stacks_{(key >> 32) & 1}").lookup(_U32.pack(key & 0xFFFFFFFF))
        if raw is None:
            return None
        ips = np.frombuffer(raw, dtype="<u8", count=_MAX_STACK_DEPTH)
        end = int(np.argmin(ips)) if not ips.all() else _MAX_STACK_DEPTH
        return ips[:end].tolist()  # type: ignore[no-any-return]

    def _maybe_rotate(self) -> None:
        """Switch the kernel to the other stack map once this one has aged or filled.

        The map being switched to is cleared first; it held the generation
        before last, whose samples have all been read by now.
        """
        age = time.monotonic_ns() - self._epoch_start[self._epoch & 1]
        if age < self._rotate_after_ns and self._keys_this_epoch < self._rotate_after_keys:
            return
        new = self._epoch + 1
        self.map(f"stacks_{new & 1}").clear()
        self._epoch_start[new & 1] = time.monotonic_ns()
        self.map("generation").update(_U32.pack(0), _U32.pack(new & 1))
        self._epoch = new
        self._keys_this_epoch = 0
        self._sent = {k for k in self._sent if k >> 32 >= new - 1}
