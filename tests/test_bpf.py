"""The syscall wrappers against real kernel maps and perf events."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

import pytest

from ebpf_stream._bpf.syscalls import BpfMap, online_cpus, possible_cpus

pytestmark = pytest.mark.bpf

_HASH, _PERCPU_ARRAY = 1, 6


def create_map(map_type: int, key_size: int, value_size: int, entries: int) -> int:
    if os.geteuid() != 0:
        pytest.skip("creating BPF maps needs root")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = struct.pack("<IIIII", map_type, key_size, value_size, entries, 0).ljust(72, b"\0")
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(321, 0, buf, len(attr))  # BPF_MAP_CREATE
    assert fd >= 0, os.strerror(ctypes.get_errno())
    return int(fd)


@pytest.fixture
def hash_map() -> Iterator[BpfMap]:
    m = BpfMap(create_map(_HASH, 4, 8, 64), "test_hash")
    yield m
    os.close(m.fd)


def test_sizes_come_from_the_kernel(hash_map: BpfMap) -> None:
    assert (hash_map.key_size, hash_map.value_size, hash_map.max_entries) == (4, 8, 64)


def test_update_lookup_delete(hash_map: BpfMap) -> None:
    key = struct.pack("<I", 7)
    assert hash_map.lookup(key) is None
    hash_map.update(key, struct.pack("<Q", 42))
    assert hash_map.lookup(key) == struct.pack("<Q", 42)
    assert hash_map.delete(key)
    assert hash_map.lookup(key) is None
    assert not hash_map.delete(key)


def test_keys_and_clear(hash_map: BpfMap) -> None:
    for i in range(10):
        hash_map.update(struct.pack("<I", i), struct.pack("<Q", i))
    assert sorted(struct.unpack("<I", k)[0] for k in hash_map.walk_keys()) == list(range(10))
    hash_map.clear()
    assert list(hash_map.walk_keys()) == []


def test_update_of_a_full_map_names_it(hash_map: BpfMap) -> None:
    for i in range(64):
        hash_map.update(struct.pack("<I", i), b"\0" * 8)
    with pytest.raises(OSError, match="update of BPF map test_hash"):
        hash_map.update(struct.pack("<I", 1000), b"\0" * 8)


def test_per_cpu_counters_are_summed() -> None:
    m = BpfMap(create_map(_PERCPU_ARRAY, 4, 8, 4), "counters")
    try:
        assert m.value_size == 8 * possible_cpus()
        values = struct.pack(f"<{possible_cpus()}Q", *range(1, possible_cpus() + 1))
        m.update(struct.pack("<I", 2), values)
        assert m.lookup_u64_sum(2) == sum(range(1, possible_cpus() + 1))
        assert m.lookup_u64_sum(0) == 0
    finally:
        os.close(m.fd)


def test_cpu_lists() -> None:
    assert online_cpus() == list(range(os.cpu_count() or 1))
    assert possible_cpus() >= len(online_cpus())
