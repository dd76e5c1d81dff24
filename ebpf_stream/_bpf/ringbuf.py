"""Batch consumer for BPF ring buffer maps (BPF_MAP_TYPE_RINGBUF).

Records are read straight from the mmap'ed ring, a whole run of fixed-size
records at a time: their headers are checked as one strided view and the run
is copied out in one move, instead of one Python callback per event.  The
copy keeps the ring's framing, so a consumer decodes it with one
``struct.iter_unpack`` (or one numpy view) and the reader needs neither.

Ring layout, as the kernel maps it:

* page 0 (read-write): ``consumer_pos`` (u64 at offset 0);
* page 1 (read-only): ``producer_pos`` (u64 at offset 0), followed by the
  data area mapped twice back to back, so any span of at most ``data_size``
  bytes starting inside the first copy is contiguous, even across the wrap.

Each record is an 8-byte header, ``len`` (bit 31 BUSY: reserved but not yet
committed, bit 30 DISCARD, low 30 bits the payload length) and ``pg_off``,
then the payload; a record occupies ``roundup8(8 + len)`` bytes.
"""

from __future__ import annotations

import functools
import mmap
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

_HDR_SIZE = 8
_BUSY = 1 << 31
_DISCARD = 1 << 30
_LEN_MASK = _DISCARD - 1
_BPF_MAP_TYPE_RINGBUF = 27
# After a record that breaks the fixed-size run, headers are scanned in chunks
# starting this small and doubling while clean: a ring that interleaves discarded
# records then costs O(records) instead of one full-span scan per discard.
_MIN_CHUNK = 64
# A run's headers are compared with an expected pattern at most this many at once.
_MAX_CHUNK = 4096


def _roundup8(n: int) -> int:
    return (n + 7) & ~7


def _check_map(map_fd: int, data_size: int) -> None:
    """Refuse a map that is not a ring buffer of ``data_size`` bytes.

    A wrong size would not fail the mmap; it would silently mis-mask positions.
    """
    info: dict[str, str] = {}
    with open(f"/proc/self/fdinfo/{map_fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key] = value.strip()
    if info.get("map_type") != str(_BPF_MAP_TYPE_RINGBUF):
        raise ValueError(f"fd {map_fd} is not a BPF ring buffer map")
    if info.get("max_entries") != str(data_size):
        raise ValueError(
            f"ring buffer fd {map_fd} holds {info.get('max_entries')} bytes, not {data_size}"
        )


class Records:
    """Records copied out of a ring, framed as the ring held them.

    ``frames`` holds ``len(self)`` frames of ``stride`` bytes: an 8-byte
    header, the payload, then padding to a multiple of 8.
    """

    __slots__ = ("frames", "stride")

    def __init__(self, frames: bytes, stride: int) -> None:
        self.frames = frames
        self.stride = stride

    def __len__(self) -> int:
        return len(self.frames) // self.stride

    def unpack(self, payload: struct.Struct) -> Iterator[tuple[Any, ...]]:
        """Each record's payload unpacked by ``payload``, a little-endian ("<") format."""
        return _framed(payload.format, self.stride).iter_unpack(self.frames)


@functools.lru_cache(maxsize=32)
def _framed(payload: str, stride: int) -> struct.Struct:
    """The format of a whole frame: the header skipped, the payload, the padding skipped."""
    if not payload.startswith("<"):
        raise ValueError(f"a payload format must be little-endian and unaligned: {payload!r}")
    padding = stride - _HDR_SIZE - struct.calcsize(payload)
    if padding < 0:
        raise ValueError(f"payload {payload!r} does not fit frames of {stride} bytes")
    return struct.Struct(f"<{_HDR_SIZE}x{payload[1:]}{padding}x")


class RingBuffer:
    """Consumer side of one BPF ring buffer map.

    Every record must carry one payload of ``record_size`` bytes (the BPF
    side's ``sizeof``, trailing padding included). Records of any other length
    are skipped and counted in ``malformed``; discarded records are skipped and
    counted in ``discarded``. ``caught_up`` says whether the last ``read_batch``
    read every record reserved before it looked. Not thread-safe: one consumer
    per ring.
    """

    discarded: int
    malformed: int
    caught_up: bool
    _fd: int | None
    _mmaps: tuple[mmap.mmap, ...]
    _cons_pos: memoryview
    _prod_pos: memoryview
    _data: memoryview
    _hdrs: memoryview

    def __init__(self, map_fd: int, data_size: int, record_size: int) -> None:
        _check_map(map_fd, data_size)
        page = mmap.PAGESIZE
        consumer = mmap.mmap(
            map_fd, page, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        try:
            producer = mmap.mmap(
                map_fd,
                page + 2 * data_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ,
                offset=page,
            )
        except BaseException:
            consumer.close()
            raise
        self._fd = map_fd
        # Each mmap holds a dup of map_fd until closed.
        self._mmaps = (consumer, producer)
        self._attach(consumer, producer, data_size, record_size)

    @classmethod
    def from_buffers(
        cls,
        consumer: WriteableBuffer,
        producer: ReadableBuffer,
        data_size: int,
        record_size: int,
    ) -> RingBuffer:
        """Read a ring laid out in plain buffers, for tests.

        ``consumer`` holds ``consumer_pos``; ``producer`` is one page holding
        ``producer_pos`` then the data area twice, and whoever writes it must
        keep both copies identical, as the kernel's double mapping does.
        """
        ring = cls.__new__(cls)
        ring._fd = None
        ring._mmaps = ()
        ring._attach(consumer, producer, data_size, record_size)
        return ring

    def _attach(
        self,
        consumer: WriteableBuffer,
        producer: ReadableBuffer,
        data_size: int,
        record_size: int,
    ) -> None:
        if data_size < _HDR_SIZE or data_size & (data_size - 1):
            raise ValueError(f"ring data size must be a power of two, got {data_size}")
        if not 0 < record_size <= _LEN_MASK:
            raise ValueError(f"a record must have a payload, got {record_size} bytes")
        cons = memoryview(consumer).cast("B")
        prod = memoryview(producer).cast("B")
        page = mmap.PAGESIZE
        if cons.readonly or len(cons) < 8:
            raise ValueError("consumer buffer must be writable and hold consumer_pos")
        if len(prod) < page + 2 * data_size:
            raise ValueError("producer buffer must hold one page and the data area twice")
        # Aligned 8-byte loads and stores through these views are single moves,
        # hence atomic on x86-64; TSO orders them as the protocol needs (see
        # read_batch).
        self._cons_pos = cons[:8].cast("Q")
        self._prod_pos = prod[:8].cast("Q")
        self._data = prod[page : page + 2 * data_size]
        self._hdrs = self._data.cast("I")
        self._size = data_size
        self._mask = data_size - 1
        self._expected = record_size
        self._stride = _roundup8(_HDR_SIZE + record_size)
        # The headers of a run of committed records, as they read through a
        # strided view of ``_hdrs``.
        self._clean_run = struct.pack("<I", record_size) * _MAX_CHUNK
        self.discarded = 0
        self.malformed = 0
        self.caught_up = False

    @property
    def fd(self) -> int:
        """The map fd: it polls readable while records are pending."""
        if self._fd is None:
            raise ValueError("a ring built from buffers has no fd to wait on")
        return self._fd

    @property
    def bytes_pending(self) -> int:
        """Bytes between consumer_pos and producer_pos, committed or not."""
        return int(self._prod_pos[0] - self._cons_pos[0])

    @property
    def stride(self) -> int:
        """Bytes a record takes in the ring, and in :class:`Records`, framing included."""
        return self._stride

    def read_batch(self, max_records: int = 65536) -> Records:
        """Copy out up to ``max_records`` committed records and release their space.

        Stops early at a record still BUSY; it is read by a later call once
        committed. The records (possibly none) do not alias the ring.
        """
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        cons = start = self._cons_pos[0]
        # Acquire: x86-64 never reorders a load with later loads, so the headers
        # and payloads read below are at least as new as this producer_pos.
        prod = self._prod_pos[0]
        avail = min(prod - cons, self._size)
        self.caught_up = avail <= 0
        if avail <= 0:
            return Records(b"", self._stride)
        end = cons + avail
        runs: list[bytes] = []
        left = min(max_records, avail // self._stride)
        step = self._stride >> 2
        chunk = _MIN_CHUNK
        while cons < end:
            pos = cons & self._mask
            hdr = self._hdrs[pos >> 2]
            if hdr == self._expected:
                if not left:
                    break
                # Fast path: a run of fixed-size records, contiguous across the
                # wrap thanks to the double mapping. Headers are checked before
                # payloads are copied, which is what makes a committed header
                # guarantee a complete payload.
                n = min(chunk, _MAX_CHUNK, left, (end - cons) // self._stride)
                first = pos >> 2
                headers = self._hdrs[first : first + n * step : step]
                # One read of the headers: the kernel may commit a record
                # meanwhile, and a second read would then disagree with the first.
                seen = headers.tobytes()
                headers.release()
                k = n
                if seen != self._clean_run[: 4 * n]:
                    k = next(i for i, h in enumerate(memoryview(seen).cast("I"))
                             if h != self._expected)
                runs.append(self._data[pos : pos + k * self._stride].tobytes())
                left -= k
                cons += k * self._stride
                chunk *= 2
            elif hdr & _BUSY:
                break
            else:
                # Discarded, or a length we cannot decode: skip it. Its space is
                # released like any other record's.
                if hdr & _DISCARD:
                    self.discarded += 1
                else:
                    self.malformed += 1
                cons += _roundup8(_HDR_SIZE + (hdr & _LEN_MASK))
                chunk = _MIN_CHUNK
        if cons != start:
            # Release: x86-64 never reorders a store with earlier loads, so the
            # kernel cannot reuse this space before the copies above are done.
            self._cons_pos[0] = cons
        self.caught_up = cons == prod
        return Records(runs[0] if len(runs) == 1 else b"".join(runs), self._stride)

    def close(self) -> None:
        """Unmap the ring (closing the mmaps' dups of the map fd); idempotent.

        Raises BufferError if a view of the ring is still held, which read_batch
        never hands out.
        """
        for view in (self._hdrs, self._data, self._prod_pos, self._cons_pos):
            view.release()
        for m in self._mmaps:
            m.close()
        self._mmaps = ()


async def drain_forever(
    ring: RingBuffer,
    on_batch: Callable[[Records, int | None], Awaitable[None]],
    *,
    max_latency: float,
) -> None:
    """Hand every batch of ``ring`` to ``on_batch``, until cancelled.

    ``on_batch(records, complete_ns)`` gets each non-empty batch, and an empty
    one whenever a wait ends with the ring empty.  ``complete_ns`` is the
    CLOCK_MONOTONIC time just before the read when that read caught up (so
    every record reserved before it has now been handed over), else None.

    Waits on the map fd with the event loop rather than polling: the kernel
    reports a ring buffer map readable while producer_pos != consumer_pos, a
    level that each new registration re-checks, so records that land while a
    batch is being read are never missed. The mmaps hold dups of the fd and do
    not affect its readiness. Records submitted with BPF_RB_NO_WAKEUP raise no
    wakeup at all, so each wait is bounded by ``max_latency`` seconds.

    While a BUSY record heads the ring the fd stays readable yet yields no
    records, so this loop spins until the producer commits it (microseconds for
    non-sleepable programs). Cancel it before closing the ring.
    """
    while True:
        with anyio.move_on_after(max_latency):
            await anyio.wait_readable(ring.fd)
        while True:
            began = time.monotonic_ns()
            batch = ring.read_batch()
            if len(batch) or ring.caught_up:
                await on_batch(batch, began if ring.caught_up else None)
            if not len(batch):
                break
            # A producer outrunning us must not starve the event loop.
            await anyio.lowlevel.checkpoint()
