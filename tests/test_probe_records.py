"""The tracing families' records as numpy records, without BPF: ring frames and map entries."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from ebpf_stream._bpf.ringbuf import Records
from ebpf_stream._bpf.syscalls import BpfMap
from ebpf_stream._probes.records import PID, map_records, ring_records

RECORD = np.dtype([("pid", "<u4"), ("count", "<u4")])
TOTALS = np.dtype([("count", "<u8"), ("buckets", "<u8", (2,))])


class Table:
    """A map's entries as ``BpfMap.items`` gives them."""

    def __init__(self, entries: list[tuple[bytes, bytes]]) -> None:
        self.entries = entries

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.entries)


def table(entries: list[tuple[bytes, bytes]]) -> BpfMap:
    return Table(entries)  # type: ignore[return-value]


def test_ring_frames_are_viewed_past_their_headers_and_padding() -> None:
    stride = 24  # 8-byte header, 8-byte payload, 8 bytes of padding
    frames = b"".join(struct.pack("<II", 8, 0) + struct.pack("<II", pid, count) + b"\xff" * 8
                      for pid, count in [(10, 1), (11, 2)])
    records = ring_records(Records(frames, stride), RECORD)
    assert records.tolist() == [(10, 1), (11, 2)]


def test_a_maps_keys_and_values_are_records() -> None:
    keys, values = map_records(table([(struct.pack("<I", 7), struct.pack("<3Q", 1, 2, 3)),
                                      (struct.pack("<I", 8), struct.pack("<3Q", 4, 5, 6))]),
                               PID, TOTALS)
    assert keys["pid"].tolist() == [7, 8]
    assert values["count"].tolist() == [1, 4] and values["buckets"].tolist() == [[2, 3], [5, 6]]


def test_a_per_cpu_maps_values_are_summed_over_cpus() -> None:
    two_cpus = struct.pack("<3Q", 1, 2, 3) + struct.pack("<3Q", 10, 20, 30)
    keys, values = map_records(table([(struct.pack("<I", 7), two_cpus)]), PID, TOTALS)
    assert keys["pid"].tolist() == [7]
    assert values["count"].tolist() == [11] and values["buckets"].tolist() == [[22, 33]]


def test_an_empty_map_has_no_records() -> None:
    keys, values = map_records(table([]), PID, TOTALS)
    assert len(keys) == len(values) == 0 and values.dtype == TOTALS
