"""Tests of the ring buffer consumer: crafted rings, then real BPF rings."""

from __future__ import annotations

import functools
import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from ebpf_stream._bpf.ringbuf import Records, RingBuffer, drain_forever
from ebpf_stream._bpf.syscalls import BpfMap

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")

PAGE = mmap.PAGESIZE
BUSY = 1 << 31
DISCARD = 1 << 30
# Same layout as the BPF program's struct event below: 32 bytes, stride 40.
EVENT = np.dtype([("seq", "<u8"), ("pid_tgid", "<u8"), ("ktime", "<u8"), ("spare", "<u8")])


def roundup8(n: int) -> int:
    return (n + 7) & ~7


def decoded(batch: Records, record: np.dtype[Any] = EVENT) -> np.ndarray[Any, Any]:
    """The payloads of ``batch`` as ``record`` items, the way the tracing probes view them."""
    framed = np.dtype({"names": ["payload"], "formats": [record], "offsets": [8],
                       "itemsize": batch.stride})
    return np.frombuffer(batch.frames, framed)["payload"]


class Decoding:
    """A ring whose batches come decoded as ``record`` arrays; the rest is the ring's."""

    def __init__(self, ring: RingBuffer, record: np.dtype[Any]) -> None:
        self.ring = ring
        self.record = record

    def read_batch(self, max_records: int = 65536) -> np.ndarray[Any, Any]:
        return decoded(self.ring.read_batch(max_records), self.record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ring, name)


class CraftedRing:
    """A ring in plain buffers with the kernel's layout, written like a producer.

    Every byte goes to both copies of the data area, standing in for the
    kernel's double mapping.
    """

    def __init__(self, data_size: int, start: int = 0) -> None:
        self.size = data_size
        self.consumer = bytearray(PAGE)
        self.producer = bytearray(PAGE + 2 * data_size)
        self._data = np.frombuffer(self.producer, np.uint8, offset=PAGE)
        self.prod = start
        self.consumer_pos = start
        self.publish()

    @property
    def consumer_pos(self) -> int:
        return int.from_bytes(self.consumer[:8], "little")

    @consumer_pos.setter
    def consumer_pos(self, value: int) -> None:
        self.consumer[:8] = value.to_bytes(8, "little")

    def put(self, pos: int, data: bytes) -> None:
        idx = (np.arange(len(data)) + pos) & (self.size - 1)
        src = np.frombuffer(data, np.uint8)
        self._data[idx] = src
        self._data[idx + self.size] = src

    def reserve(self, length: int) -> int:
        pos = self.prod
        self.put(pos, (length | BUSY).to_bytes(4, "little") + bytes(4))
        self.prod += roundup8(8 + length)
        self.publish()
        return pos

    def commit(self, pos: int, payload: bytes, *, discard: bool = False) -> None:
        self.put(pos + 8, payload)
        self.put(pos, (len(payload) | (DISCARD if discard else 0)).to_bytes(4, "little"))

    def push(self, payload: bytes, *, discard: bool = False) -> None:
        self.commit(self.reserve(len(payload)), payload, discard=discard)

    def publish(self) -> None:
        self.producer[:8] = self.prod.to_bytes(8, "little")

    def reader(self, record: np.dtype[Any] = EVENT) -> Decoding:
        return Decoding(RingBuffer.from_buffers(self.consumer, self.producer, self.size,
                                                record.itemsize), record)


def event(seq: int) -> bytes:
    return np.array([(seq, seq * 3, seq * 5, seq * 7)], EVENT).tobytes()


def assert_events(batch: np.ndarray[Any, Any], seqs: list[int] | range) -> None:
    assert batch.dtype == EVENT
    assert batch["seq"].tolist() == list(seqs)
    assert (batch["pid_tgid"] == batch["seq"] * 3).all()
    assert (batch["spare"] == batch["seq"] * 7).all()


# --- crafted rings ----------------------------------------------------------


def test_committed_records_are_read_and_consumer_pos_written_back() -> None:
    ring = CraftedRing(4096)
    for seq in range(10):
        ring.push(event(seq))
    reader = ring.reader()
    assert reader.bytes_pending == 10 * 40

    assert_events(reader.read_batch(), range(10))
    assert ring.consumer_pos == 10 * 40
    assert reader.bytes_pending == 0
    assert reader.read_batch().size == 0
    assert ring.consumer_pos == 10 * 40


def test_batch_is_a_copy() -> None:
    ring = CraftedRing(4096)
    ring.push(event(1))
    reader = ring.reader().ring
    batch = reader.read_batch()
    ring.put(8, bytes(32))
    assert isinstance(batch.frames, bytes)
    assert decoded(batch)["seq"].tolist() == [1]


def test_max_records_limits_a_batch_and_the_rest_follows() -> None:
    ring = CraftedRing(4096)
    for seq in range(25):
        ring.push(event(seq))
    reader = ring.reader()
    assert_events(reader.read_batch(10), range(10))
    assert ring.consumer_pos == 10 * 40
    assert not reader.caught_up, "records reserved before the read are left"
    assert_events(reader.read_batch(10), range(10, 20))
    assert_events(reader.read_batch(10), range(20, 25))
    assert reader.caught_up


def test_busy_record_stops_the_batch_until_committed() -> None:
    ring = CraftedRing(4096)
    for seq in range(3):
        ring.push(event(seq))
    busy = ring.reserve(EVENT.itemsize)
    for seq in range(4, 6):
        ring.push(event(seq))
    reader = ring.reader()

    assert_events(reader.read_batch(), range(3))
    assert ring.consumer_pos == busy
    assert reader.bytes_pending == 3 * 40
    assert not reader.caught_up, "a reserved record is still to come"
    assert reader.read_batch().size == 0
    assert ring.consumer_pos == busy
    assert not reader.caught_up

    ring.commit(busy, event(3))
    assert_events(reader.read_batch(), range(3, 6))
    assert ring.consumer_pos == ring.prod
    assert reader.caught_up
    assert reader.read_batch().size == 0 and reader.caught_up


def test_busy_record_at_the_head_reads_nothing() -> None:
    ring = CraftedRing(4096)
    busy = ring.reserve(EVENT.itemsize)
    ring.push(event(1))
    reader = ring.reader()
    assert reader.read_batch().size == 0
    assert ring.consumer_pos == 0
    ring.commit(busy, event(0))
    assert_events(reader.read_batch(), range(2))


def test_discarded_records_are_skipped_and_counted() -> None:
    ring = CraftedRing(4096)
    ring.push(bytes(0), discard=True)
    ring.push(event(0))
    ring.push(event(99), discard=True)
    ring.push(event(1))
    ring.push(bytes(100), discard=True)
    ring.push(bytes(13), discard=True)
    reader = ring.reader()

    assert_events(reader.read_batch(), range(2))
    assert reader.discarded == 4
    assert reader.malformed == 0
    assert ring.consumer_pos == ring.prod


def test_only_discarded_records_pending_are_released() -> None:
    ring = CraftedRing(4096)
    ring.push(bytes(0), discard=True)
    reader = ring.reader()
    assert reader.read_batch().size == 0
    assert reader.discarded == 1
    assert ring.consumer_pos == 8


def test_malformed_lengths_are_skipped_and_counted() -> None:
    ring = CraftedRing(4096)
    ring.push(event(0))
    ring.push(bytes(16))
    ring.push(event(1))
    ring.push(bytes(33))
    ring.push(bytes(0))
    ring.push(event(2))
    reader = ring.reader()

    assert_events(reader.read_batch(), range(3))
    assert reader.malformed == 3
    assert reader.discarded == 0
    assert ring.consumer_pos == ring.prod


def test_records_straddling_the_end_of_the_data_area() -> None:
    ring = CraftedRing(4096, start=4096 * 5 - 60)
    for seq in range(6):
        ring.push(event(seq))
    ring.push(bytes(20), discard=True)
    ring.push(event(6))
    reader = ring.reader()

    assert_events(reader.read_batch(), range(7))
    assert ring.consumer_pos == ring.prod
    assert reader.discarded == 1


def test_full_ring_across_the_wrap() -> None:
    record = np.dtype([("seq", "<u8"), ("x", "<u8"), ("y", "<u8")])  # stride 32
    ring = CraftedRing(4096, start=3 * 4096 + 1000)
    for seq in range(4096 // 32):
        ring.push(np.array([(seq, 1, 2)], record).tobytes())
    assert ring.prod - ring.consumer_pos == ring.size
    reader = ring.reader(record)
    assert reader.bytes_pending == 4096

    batch = reader.read_batch()
    assert batch["seq"].tolist() == list(range(128))
    assert ring.consumer_pos == ring.prod
    assert reader.bytes_pending == 0


def test_ring_reused_over_many_laps() -> None:
    ring = CraftedRing(4096)
    reader = ring.reader()
    seq = 0
    for lap in range(40):
        first = seq
        for _ in range(lap % 7 + 50):
            ring.push(event(seq))
            seq += 1
        assert_events(reader.read_batch(), range(first, seq))
    assert ring.consumer_pos == ring.prod == seq * 40


def test_random_mix_matches_a_record_by_record_walk() -> None:
    """Runs of good records broken by discards, bad lengths and a BUSY record."""
    rng = np.random.default_rng(7)
    ring = CraftedRing(1 << 16, start=(1 << 16) - 4000)
    expected: list[int] = []
    discarded = malformed = seq = 0
    while ring.prod - ring.consumer_pos < (1 << 16) - 2000:
        kind = rng.choice(3, p=[0.8, 0.1, 0.1]) if seq > 200 else 0
        run = int(rng.integers(1, 20))
        for _ in range(run if kind == 0 else 1):
            if kind == 0:
                ring.push(event(seq))
                expected.append(seq)
                seq += 1
            elif kind == 1:
                ring.push(bytes(int(rng.integers(0, 80))), discard=True)
                discarded += 1
            else:
                ring.push(bytes(int(rng.choice([0, 8, 31, 40, 64]))))
                malformed += 1
    busy = ring.reserve(EVENT.itemsize)
    ring.push(event(10**6))
    reader = ring.reader()

    got: list[int] = []
    while (batch := reader.read_batch(int(rng.integers(1, 500)))).size:
        got += batch["seq"].tolist()
    assert got == expected
    assert (reader.discarded, reader.malformed) == (discarded, malformed)
    assert ring.consumer_pos == busy

    ring.commit(busy, event(seq))
    assert reader.read_batch()["seq"].tolist() == [seq, 10**6]


def test_record_without_header_alignment_padding() -> None:
    record = np.dtype([("a", "<u4"), ("b", "u1")])  # 5 bytes: stride 16
    ring = CraftedRing(4096, start=4096 - 16)
    for i in range(5):
        ring.push(np.array([(i, i + 1)], record).tobytes())
    batch = ring.reader(record).read_batch()
    assert batch["a"].tolist() == list(range(5))
    assert batch["b"].tolist() == list(range(1, 6))
    assert ring.consumer_pos == 4096 - 16 + 5 * 16


def test_close_is_idempotent_and_releases_the_buffers() -> None:
    ring = CraftedRing(4096)
    reader = ring.reader()
    reader.close()
    reader.close()
    ring.consumer.extend(b"x")  # would raise BufferError while still exported
    with pytest.raises(ValueError):
        reader.read_batch()


def test_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="power of two"):
        RingBuffer.from_buffers(bytearray(PAGE), bytearray(PAGE + 2 * 3000), 3000, 32)
    with pytest.raises(ValueError, match="data area twice"):
        RingBuffer.from_buffers(bytearray(PAGE), bytearray(PAGE + 4096), 4096, 32)
    with pytest.raises(ValueError, match="writable"):
        RingBuffer.from_buffers(bytes(PAGE), bytearray(PAGE + 8192), 4096, 32)
    with pytest.raises(ValueError, match="payload"):
        RingBuffer.from_buffers(bytearray(PAGE), bytearray(PAGE + 8192), 4096, 0)
    with pytest.raises(ValueError, match="no fd"):
        _ = CraftedRing(4096).reader().fd


# --- real rings -------------------------------------------------------------

MAX_PER_CALL = 128
PROGRAM = r"""
struct event { u64 seq; u64 pid_tgid; u64 ktime; u64 spare; };

BPF_RINGBUF_OUTPUT(events, 64);   /* 256 KiB */
BPF_RINGBUF_OUTPUT(small, 1);     /* 4 KiB: 102 events */
BPF_RINGBUF_OUTPUT(huge, 4096);   /* 16 MiB */
/* 0: tgid to trace, 1: events per call, 2: submit flags, 3: ring (0 events,
   1 small, 2 huge), 4: discard odd sequence numbers */
BPF_ARRAY(config, u64, 5);
/* 0: next sequence number, 1: failed reservations */
BPF_ARRAY(counters, u64, 2);

static __always_inline u64 cfg(int i) {
    u64 *v = config.lookup(&i);
    return v ? *v : 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != cfg(0))
        return 0;
    u64 count = cfg(1), flags = cfg(2), which = cfg(3), discard_odd = cfg(4);
    int seq_key = 0, drop_key = 1;
    u64 *next = counters.lookup(&seq_key), *drops = counters.lookup(&drop_key);
    if (!next || !drops)
        return 0;
    for (int i = 0; i < MAX_PER_CALL; i++) {
        if (i >= count)
            break;
        /* Plain increments: only the test's single thread gets here. */
        u64 seq = (*next)++;
        struct event *e;
        if (which == 1)
            e = small.ringbuf_reserve(sizeof(*e));
        else if (which == 2)
            e = huge.ringbuf_reserve(sizeof(*e));
        else
            e = events.ringbuf_reserve(sizeof(*e));
        if (!e) {
            (*drops)++;
            continue;
        }
        e->seq = seq;
        e->pid_tgid = id;
        e->ktime = bpf_ktime_get_ns();
        e->spare = 0;
        if (discard_odd && (seq & 1))
            events.ringbuf_discard(e, flags);
        else
            events.ringbuf_submit(e, flags);
    }
    return 0;
}
"""


class Probe:
    """The test program, loaded as the profiler loads its own, with one ring
    consumer per map."""

    def __init__(self, directory: Path) -> None:
        from ebpf_stream._bpf.loader import _load

        source = directory / "rings.bpf.c"
        source.write_text(PROGRAM)
        self.program = _load(source, {}, ["events", "small", "huge", "config", "counters"],
                             [f"-DMAX_PER_CALL={MAX_PER_CALL}"])
        self.program.attach_tracepoints()
        self.readers: list[Decoding] = []

    def configure(
        self, *, per_call: int, flags: int = 0, ring: int = 0, discard_odd: bool = False
    ) -> None:
        values = [os.getpid(), per_call, flags, ring, int(discard_odd)]
        for i, value in enumerate(values):
            self.table("config").update(U32.pack(i), U64.pack(value))

    def reset(self) -> None:
        """Stop emitting, empty every ring and zero the counters."""
        self.configure(per_call=0)
        for reader in self.readers:
            while reader.read_batch().size:
                pass
            reader.close()
        self.readers.clear()
        for i in range(2):
            self.table("counters").update(U32.pack(i), U64.pack(0))

    def table(self, name: str) -> BpfMap:
        return self.program.map(name)

    def reader(self, name: str) -> Decoding:
        table = self.table(name)
        reader = Decoding(RingBuffer(table.fd, table.max_entries, EVENT.itemsize), EVENT)
        self.readers.append(reader)
        return reader

    def counter(self, i: int) -> int:
        return self.table("counters").lookup_u64_sum(i)


@pytest.fixture(scope="module")
def bpf_probe(bpf_environment: None, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Probe]:
    probe = Probe(tmp_path_factory.mktemp("rings"))
    yield probe
    probe.reset()
    probe.program.close()


@pytest.fixture
def probe(bpf_probe: Probe) -> Iterator[Probe]:
    bpf_probe.reset()
    yield bpf_probe
    bpf_probe.reset()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.bpf
def test_real_ring_delivers_every_event_once_in_order(probe: Probe) -> None:
    ring = probe.reader("events")
    probe.configure(per_call=64)
    seqs: list[int] = []
    for call in range(100):
        os.getppid()
        if call % 10 == 9:
            batch = ring.read_batch()
            assert (batch["pid_tgid"] >> 32 == os.getpid()).all()
            assert (np.diff(batch["ktime"].astype(np.int64)) >= 0).all()
            seqs += batch["seq"].tolist()
    assert seqs == list(range(6400))
    assert probe.counter(1) == 0
    assert ring.bytes_pending == 0


@pytest.mark.bpf
def test_real_ring_overflow_loses_exactly_what_the_kernel_counts(probe: Probe) -> None:
    ring = probe.reader("small")
    probe.configure(per_call=64, ring=1)
    for _ in range(20):
        os.getppid()
    assert ring.bytes_pending == 102 * 40  # full: 4096 // 40 events
    first = ring.read_batch()
    assert first["seq"].tolist() == list(range(102))

    # Now read between bursts: every burst overflows again, differently.
    seqs = first["seq"].tolist()
    for call in range(60):
        os.getppid()
        if call % 3 == 2:
            seqs += ring.read_batch()["seq"].tolist()
    seqs += ring.read_batch()["seq"].tolist()

    emitted, drops = probe.counter(0), probe.counter(1)
    assert emitted == 80 * 64
    assert seqs == sorted(set(seqs))
    assert len(set(range(emitted)) - set(seqs)) == drops > 0
    assert ring.discarded == ring.malformed == 0


@pytest.mark.bpf
def test_real_ring_discarded_records_are_skipped(probe: Probe) -> None:
    ring = probe.reader("events")
    probe.configure(per_call=100, discard_odd=True)
    for _ in range(10):
        os.getppid()
    assert ring.read_batch()["seq"].tolist() == list(range(0, 1000, 2))
    assert ring.discarded == 500
    assert ring.bytes_pending == 0


@pytest.mark.bpf
def test_close_releases_the_mmaps_and_their_fds(bpf_probe: Probe) -> None:
    table = bpf_probe.table("events")
    before = fd_count()
    ring = RingBuffer(table.fd, table.max_entries, EVENT.itemsize)
    assert ring.fd == table.fd
    assert fd_count() == before + 2  # each mmap keeps a dup
    ring.close()
    ring.close()
    assert fd_count() == before


@pytest.mark.bpf
def test_wrong_size_or_map_type_is_refused(bpf_probe: Probe) -> None:
    table = bpf_probe.table("events")
    with pytest.raises(ValueError, match="holds 262144 bytes"):
        RingBuffer(table.fd, 4096, EVENT.itemsize)
    with pytest.raises(ValueError, match="not a BPF ring buffer"):
        RingBuffer(bpf_probe.table("config").fd, 4096, EVENT.itemsize)


@pytest.mark.bpf
@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
@pytest.mark.parametrize(("flags", "woken"), [(0, True), (1, False)], ids=["wakeup", "no-wakeup"])
def test_drain_forever_delivers_within_max_latency(
    probe: Probe, flags: int, woken: bool, use_uvloop: bool
) -> None:
    """Default submits wake the reader; BPF_RB_NO_WAKEUP ones wait for max_latency."""
    max_latency = 0.5
    ring = probe.reader("events")
    probe.configure(per_call=10, flags=flags)
    batches: list[np.ndarray[Any, Any]] = []

    async def main() -> float:
        arrived = anyio.Event()

        async def on_batch(batch: Records, complete_ns: int | None) -> None:
            if len(batch):
                batches.append(decoded(batch))
                arrived.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(drain_forever, max_latency=max_latency), ring.ring,
                          on_batch)
            await anyio.sleep(0.05)  # the reader is parked on the fd now
            start = time.monotonic()
            os.getppid()
            with anyio.fail_after(5):
                await arrived.wait()
            latency = time.monotonic() - start
            tg.cancel_scope.cancel()
        return latency

    latency = anyio.run(main, backend_options={"use_uvloop": use_uvloop})
    assert np.concatenate(batches)["seq"].tolist() == list(range(10))
    if woken:
        assert latency < max_latency / 2
    else:
        # Only the bounded wait can have found them: 0.45 s after the submit.
        assert max_latency / 2 < latency < max_latency + 0.5


@pytest.mark.bpf
def test_throughput_of_a_full_16mib_ring(probe: Probe, capsys: pytest.CaptureFixture[str]) -> None:
    ring = probe.reader("huge")
    probe.configure(per_call=MAX_PER_CALL, ring=2)
    capacity = (16 << 20) // 40
    while ring.bytes_pending < capacity * 40:
        os.getppid()
    assert ring.bytes_pending == capacity * 40  # full: the rest was dropped

    start = time.perf_counter()
    total = 0
    while (batch := ring.read_batch()).size:
        total += batch.size
    elapsed = time.perf_counter() - start

    assert total == capacity
    assert batch.size == 0 and ring.bytes_pending == 0
    with capsys.disabled():
        print(
            f"\nring buffer read: {total} events of 32 bytes in {elapsed * 1e3:.1f} ms, "
            f"{total / elapsed / 1e6:.1f} M events/s"
        )
