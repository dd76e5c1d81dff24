"""The few BPF and perf syscalls the engine needs once programs are loaded.

Compiling needs bcc, and bcc brings LLVM: over ten megabytes of relocated
library data and a compiler heap.  The engine therefore compiles in a
short-lived worker process and receives the program and map fds; from then
on these thin wrappers over ``bpf(2)``, ``perf_event_open(2)`` and ``ioctl(2)``
are all it uses, and bcc is never imported into the profiled process.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

_SYS_BPF = 321  # x86-64
_SYS_PERF_EVENT_OPEN = 298
_BPF_ENABLE_STATS, _BPF_STATS_RUN_TIME = 32, 0
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_UPDATE_ELEM, _BPF_MAP_DELETE_ELEM, _BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
_BPF_MAP_CREATE, _BPF_PROG_LOAD, _BPF_OBJ_GET_INFO_BY_FD, _BPF_BTF_LOAD = 0, 5, 15, 18
_BPF_RAW_TRACEPOINT_OPEN, _BPF_LINK_CREATE = 17, 28
_BPF_PERF_EVENT = 41  # link attach type
_PERCPU_MAP_TYPES = {5, 6, 10}  # percpu hash, percpu array, lru percpu hash
# Maps whose entries come and go: hash, percpu hash, LRU hash, LRU percpu hash, hash of maps.
_HASH_MAP_TYPES = {1, 5, 9, 10, 13}
_MAP_INFO_SIZE = 80  # struct bpf_map_info up to its map_extra; the kernel fills what it has

PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_COUNT_SW_PAGE_FAULTS_MIN = 5
PERF_COUNT_SW_PAGE_FAULTS_MAJ = 6
_PERF_FLAG_FD_CLOEXEC = 8
_PERF_EVENT_IOC_ENABLE = 0x2400
_PERF_EVENT_IOC_SET_BPF = 0x40042408
_PERF_ATTR_SIZE = 112
_ATTR_DISABLED = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


def _cpus(path: str) -> list[int]:
    cpus: list[int] = []
    for part in Path(path).read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def online_cpus() -> list[int]:
    return _cpus("/sys/devices/system/cpu/online")


def possible_cpus() -> int:
    return len(_cpus("/sys/devices/system/cpu/possible"))


def fdinfo(fd: int) -> dict[str, str]:
    """The kernel's description of a BPF fd (type, sizes, memlock, run time...)."""
    info: dict[str, str] = {}
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def enable_run_time_stats() -> int | None:
    """Make the kernel account each BPF program's run time; returns the fd
    that keeps it on (closing it turns the accounting off again)."""
    attr = ctypes.c_uint32(_BPF_STATS_RUN_TIME)
    fd = int(_libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr)))
    return fd if fd >= 0 else None


class BpfMap:
    """One BPF map, addressed by raw key and value bytes.

    Sizes come from the kernel (fdinfo), so they always match the map.
    Per-CPU maps return one value per possible CPU, concatenated.
    """

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        info = fdinfo(fd)
        self.map_type = int(info.get("map_type", 0))
        self.key_size = int(info.get("key_size", 0))
        self.max_entries = int(info.get("max_entries", 0))
        value_size = int(info.get("value_size", 0))
        if self.map_type in _PERCPU_MAP_TYPES:
            value_size = (value_size + 7) // 8 * 8 * possible_cpus()
        self.value_size = value_size

    def _call(self, cmd: int, key: bytes | None, value: ctypes.Array[ctypes.c_char] | None,
              flags: int = 0) -> int:
        key_buf = ctypes.create_string_buffer(key, self.key_size) if key is not None else None
        attr = _ElemAttr(self.fd, 0, ctypes.addressof(key_buf) if key_buf else 0,
                         ctypes.addressof(value) if value is not None else 0, flags)
        ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        return 0 if ret == 0 else ctypes.get_errno()

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        err = self._call(_BPF_MAP_LOOKUP_ELEM, key, value)
        if err == 0:
            return value.raw
        if err == 2:  # ENOENT
            return None
        raise OSError(err, f"lookup in BPF map {self.name}: {os.strerror(err)}")

    def update(self, key: bytes, value: bytes) -> None:
        buf = ctypes.create_string_buffer(value, self.value_size)
        err = self._call(_BPF_MAP_UPDATE_ELEM, key, buf)
        if err:
            raise OSError(err, f"update of BPF map {self.name}: {os.strerror(err)}")

    def delete(self, key: bytes) -> bool:
        return self._call(_BPF_MAP_DELETE_ELEM, key, None) == 0

    def walk_keys(self) -> Iterator[bytes]:
        key: bytes | None = None
        while True:
            following = ctypes.create_string_buffer(self.key_size)
            if self._call(_BPF_MAP_GET_NEXT_KEY, key, following):
                return
            key = following.raw
            yield key

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value); an entry deleted while walking is skipped."""
        for key in list(self.walk_keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def clear(self) -> None:
        # Collect first: deleting while walking restarts the walk on some map types.
        for key in list(self.walk_keys()):
            self.delete(key)

    def lookup_u64_sum(self, index: int) -> int:
        """The sum over CPUs of a per-CPU u64 counter (0 if absent)."""
        raw = self.lookup(struct.pack("<I", index))
        return sum(v for (v,) in struct.iter_unpack("<Q", raw)) if raw else 0


def map_info(fd: int) -> tuple[str, int, int]:
    """(name, type, max_entries) of a BPF map, as ``BPF_OBJ_GET_INFO_BY_FD`` tells them."""
    info = ctypes.create_string_buffer(_MAP_INFO_SIZE)
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    _bpf_call(_BPF_OBJ_GET_INFO_BY_FD, attr, "reading map info")
    map_type, _id, _key, _value, max_entries = struct.unpack_from("<5I", info.raw)
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return name, map_type, max_entries


def hash_map_usage(fds: Iterable[int]) -> dict[str, tuple[int, int]]:
    """``{name: (entries, max_entries)}`` of the hash-type maps among ``fds``.

    How full the maps whose entries come and go are: one that reaches its
    maximum refuses (or, LRU, evicts) what comes next.  Counting walks the
    keys, one syscall each, so it is for a health report, not a hot path; the
    count stops at the maximum, which a walk that restarts (an entry deleted
    under it) could pass.  A name that repeats (each probe has its own maps)
    gets ``.2``, ``.3``... in the order of ``fds``.
    """
    usage: dict[str, tuple[int, int]] = {}
    for fd in fds:
        name, map_type, max_entries = map_info(fd)
        if map_type not in _HASH_MAP_TYPES:
            continue
        entries = sum(1 for _ in itertools.islice(BpfMap(fd, name).walk_keys(), max_entries))
        key, n = name, 1
        while key in usage:
            n += 1
            key = f"{name}.{n}"
        usage[key] = (entries, max_entries)
    return usage


def _perf_event_open(type_: int, config: int, sample_period: int, pid: int, cpu: int) -> int:
    attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, type_, _PERF_ATTR_SIZE, config, sample_period)
    struct.pack_into("<Q", attr, 40, _ATTR_DISABLED)  # flags
    fd = int(_libc.syscall(_SYS_PERF_EVENT_OPEN, attr, pid, cpu, -1, _PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open: {os.strerror(err)}")
    return fd


def _bpf_call(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    fd = int(_libc.syscall(_SYS_BPF, cmd, attr, len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return fd


def _link_with_cookie(program_fd: int, perf_fd: int, cookie: int) -> int:
    """Attach through a BPF link, the only way to give a perf event program a cookie."""
    attr = ctypes.create_string_buffer(64)
    struct.pack_into("<IIII", attr, 0, program_fd, perf_fd, _BPF_PERF_EVENT, 0)
    struct.pack_into("<Q", attr, 16, cookie)
    link = _bpf_call(_BPF_LINK_CREATE, attr, "BPF link")
    fcntl.ioctl(perf_fd, _PERF_EVENT_IOC_ENABLE, 0)
    return link


def attach_perf_event(program_fd: int, type_: int, config: int, sample_period: int,
                      cpu: int, cookie: int | None = None, thread: int = -1) -> list[int]:
    """Run ``program_fd`` on a perf event on ``cpu`` (-1 with a ``thread``: that
    thread wherever it runs); returns the fds that keep it attached.

    With a ``cookie`` the program reads it back with ``bpf_get_attach_cookie``.
    """
    fd = _perf_event_open(type_, config, sample_period, thread, cpu)
    try:
        if cookie is not None:
            return [_link_with_cookie(program_fd, fd, cookie), fd]
        fcntl.ioctl(fd, _PERF_EVENT_IOC_SET_BPF, program_fd)
        fcntl.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return [fd]


def tracepoint_id(tracefs: Path, category: str, event: str) -> int:
    return int((tracefs / "events" / category / event / "id").read_text())


def attach_tracepoint(program_fd: int, tracefs: Path, category: str, event: str,
                      cookie: int | None = None) -> list[int]:
    """Run ``program_fd`` on a tracepoint.  One event fd covers every CPU:
    the program hangs off the tracepoint itself."""
    return attach_perf_event(program_fd, PERF_TYPE_TRACEPOINT,
                             tracepoint_id(tracefs, category, event), 1, 0, cookie)


def attach_raw_tracepoint(program_fd: int, name: str | None) -> int:
    """Run a raw tracepoint program on ``name``; returns the fd that keeps it attached.

    Raw tracepoints hand the program the tracepoint's arguments as they are,
    without building a perf record first: the cheapest hook on hot paths
    such as every syscall's entry and exit.  A BTF tracepoint program (None
    for ``name``) was told its tracepoint as it loaded.
    """
    name_buf = ctypes.create_string_buffer(name.encode()) if name is not None else None
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<QI", attr, 0, ctypes.addressof(name_buf) if name_buf else 0, program_fd)
    return _bpf_call(_BPF_RAW_TRACEPOINT_OPEN, attr, f"raw tracepoint {name or program_fd}")


# -- loading an object without bcc -------------------------------------------

def _name(name: str) -> bytes:
    return name.encode()[:15]  # BPF_OBJ_NAME_LEN, with its terminating zero


def load_btf(data: bytes) -> int:
    """Load type information (BTF) into the kernel; returns its fd."""
    buf = ctypes.create_string_buffer(data, len(data))
    attr = ctypes.create_string_buffer(32)
    struct.pack_into("<QQI", attr, 0, ctypes.addressof(buf), 0, len(data))
    return _bpf_call(_BPF_BTF_LOAD, attr, "loading BTF")


def create_map(name: str, map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, btf_fd: int = 0, btf_key_type: int = 0,
               btf_value_type: int = 0, btf_vmlinux_value_type: int = 0,
               extra: int = 0) -> int:
    """Create a map as ``BPF_MAP_CREATE`` describes it; returns its fd."""
    attr = ctypes.create_string_buffer(72)
    struct.pack_into("<IIIII", attr, 0, map_type, key_size, value_size, max_entries, flags)
    struct.pack_into("16s", attr, 28, _name(name))
    struct.pack_into("<IIIIQ", attr, 48, btf_fd, btf_key_type, btf_value_type,
                     btf_vmlinux_value_type, extra)
    return _bpf_call(_BPF_MAP_CREATE, attr, f"creating BPF map {name}")


def load_program(name: str, prog_type: int, insns: bytes, license: str,
                 kern_version: int, *, attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """Load and verify a program; returns its fd.  A refusal raises ``OSError``
    with the verifier's last line."""
    code = ctypes.create_string_buffer(insns, len(insns))
    licence = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(1 << 16)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, prog_type, len(insns) // 8, ctypes.addressof(code),
                     ctypes.addressof(licence))
    struct.pack_into("<II", attr, 40, kern_version, 0)
    struct.pack_into("16s", attr, 48, _name(name))
    struct.pack_into("<I", attr, 68, attach_type)  # expected_attach_type
    struct.pack_into("<I", attr, 108, attach_btf_id)
    fd = int(_libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, len(attr)))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err in (errno.EACCES, errno.EINVAL):  # ask the verifier why, loading once more
        struct.pack_into("<IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
        fd = int(_libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, len(attr)))
        if fd >= 0:
            return fd
        lines = log.value.decode(errors="replace").strip().splitlines()
        if lines:
            raise OSError(err, f"loading {name}: {os.strerror(err)}: {lines[-1]}")
    raise OSError(err, f"loading {name}: {os.strerror(err)}")


def program_tag(fd: int) -> bytes:
    """The kernel's tag of a loaded program: a hash of its instructions, map fds aside."""
    info = ctypes.create_string_buffer(16)
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    _bpf_call(_BPF_OBJ_GET_INFO_BY_FD, attr, "reading program info")
    return info.raw[8:16]
