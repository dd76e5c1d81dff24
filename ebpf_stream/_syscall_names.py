"""Syscall names from the running kernel, learned rather than tabled.

Syscall numbers differ between architectures (and ABIs), and the kernel's
own table is a data symbol that ``/proc/kallsyms`` does not list.  What the
kernel does publish is one tracefs event per syscall,
``syscalls:sys_enter_<name>``, whose record carries the event's id
(``common_type``) and the number of the call (``__syscall_nr``).  So the
enter events whose number is not known yet are enabled in a private ftrace
instance; user space reads the instance's binary pages, names each number
and disables its event at once, so an event costs the machine one record
per call only until its first call is read.

A BPF program on each event (perf tracepoints, identified by a BPF cookie)
would learn the same without a ring buffer, but tearing down a syscall perf
event costs an RCU-tasks grace period (40-90 ms here), serialized: 15-30 s
for the few hundred events never called.  Disabling an ftrace event costs
microseconds, and removing the instance one grace period.

What is learned is kept per kernel build (release and version) under
``$EBPF_STREAM_CACHE`` (default ``/var/cache/ebpf-stream``), so later runs
start knowing every syscall seen before and enable only the rest.

The events must be enabled before the program that counts calls is
attached: a call counted is then a call whose entry was recorded, and
reading the records right after the totals names every number in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import struct
from pathlib import Path

import anyio

from ._errors import ProbeError
from ._loader import _cache_dir, ensure_tracefs

log = logging.getLogger("ebpf_stream")

LEARN_INTERVAL_S = 0.05  # how long a learned event stays enabled, at most
BUFFER_KB = 256  # per CPU: the first records of each event, not a flood, must fit
_ENTER = "sys_enter_"
_PAGE = 4096
_INSTANCE_PREFIX = "ebpf-stream-syscalls-"
_HEADER = struct.Struct("<I")
_RECORD = struct.Struct("<H6xi")  # common_type, then __syscall_nr at offset 8
_PADDING, _TIME_EXTEND, _TIME_STAMP = 29, 30, 31
_COMMIT_FLAGS = 3 << 30  # "missed events" flags in a page's commit field


def kernel_build() -> str:
    """The running kernel's release and build version: what numbers depend on."""
    return f"{platform.release()} {platform.version()}"


def cache_file(build: str | None = None) -> Path:
    digest = hashlib.sha256((build or kernel_build()).encode()).hexdigest()[:16]
    return _cache_dir() / "syscall-names" / f"{platform.release()}-{digest}.json"


def enter_events(tracefs: Path) -> dict[int, str]:
    """Every syscall enter event of the running kernel: tracefs id -> syscall name."""
    events: dict[int, str] = {}
    for event in (tracefs / "events" / "syscalls").glob(f"{_ENTER}*"):
        with contextlib.suppress(OSError, ValueError):  # an event going away (module unload)
            events[int((event / "id").read_text())] = event.name.removeprefix(_ENTER)
    return events


def _read_table(path: Path) -> dict[int, str]:
    try:
        return {int(nr): str(name) for nr, name in json.loads(path.read_text())["names"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def read_cache(path: Path, valid: set[str]) -> dict[int, str]:
    """The cached table, keeping only names the kernel still has an event for."""
    return {nr: name for nr, name in _read_table(path).items() if name in valid}


def write_cache(path: Path, names: dict[int, str]) -> None:
    """Merge ``names`` into the cache file, atomically; a failure costs only relearning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = _read_table(path) | names  # another run may have learned others
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"kernel": kernel_build(), "names": {
            str(nr): name for nr, name in sorted(merged.items())}}))
        tmp.rename(path)
    except OSError as exc:
        log.debug("syscall names not cached in %s: %s", path, exc)


def page_layout(tracefs: Path) -> tuple[int, int]:
    """Where a ring-buffer page's commit field is (size in bytes) and where its data starts."""
    text = (tracefs / "events" / "header_page").read_text()
    commit = re.search(r"local_t commit;\s*offset:\d+;\s*size:(\d+);", text)
    data = re.search(r"char data;\s*offset:(\d+);", text)
    if not commit or not data:
        raise ValueError("unexpected events/header_page")
    return int(commit[1]), int(data[1])


def page_records(page: bytes, commit_size: int, data_offset: int) -> list[tuple[int, int]]:
    """(event id, syscall nr) of every data record in one ring-buffer page."""
    commit = int.from_bytes(page[8:8 + commit_size], "little") & ~_COMMIT_FLAGS
    end = min(data_offset + commit, len(page))
    records = []
    at = data_offset
    while at + 4 <= end:
        (header,) = _HEADER.unpack_from(page, at)
        kind, delta = header & 0x1F, header >> 5
        if kind in (_TIME_EXTEND, _TIME_STAMP):
            at += 8
            continue
        if kind == _PADDING:
            if delta == 0:  # the rest of the page
                break
            at += 4 + _HEADER.unpack_from(page, at + 4)[0]
            continue
        if kind == 0:  # a long record: its length follows the header
            length = _HEADER.unpack_from(page, at + 4)[0] - 4
            data = at + 8
        else:
            length = kind * 4
            data = at + 4
        if length >= _RECORD.size:
            records.append(_RECORD.unpack_from(page, data))
        at = data + length
    return records


class SyscallNames:
    """Number -> name for the running kernel, learning the numbers not yet known.

    ``open`` enables every unknown enter event in a private ftrace instance;
    ``learn`` (called right after reading totals, and every
    ``LEARN_INTERVAL_S`` by ``learn_forever``) names what was recorded and
    disables those events; ``name`` answers.  ``close`` removes the instance.
    """

    def __init__(self, cache: Path | None = None) -> None:
        self._cache = cache or cache_file()
        self.names: dict[int, str] = {}
        self._unknown: dict[int, str] = {}  # tracefs id -> name, of the events still enabled
        self._instance: Path | None = None
        self._pipes: list[int] = []
        self._layout = (8, 16)

    def name(self, nr: int) -> str:
        """The syscall's name, or ``syscall_<nr>`` for a number with no event
        (one the kernel does not implement, say)."""
        return self.names.get(nr) or f"syscall_{nr}"

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open)

    def _open(self) -> None:
        tracefs = ensure_tracefs()
        events = enter_events(tracefs)
        self.names = read_cache(self._cache, set(events.values()))
        known = set(self.names.values())
        self._unknown = {i: name for i, name in events.items() if name not in known}
        if not self._unknown:
            return
        self._layout = page_layout(tracefs)
        remove_stale_instances(tracefs)
        self._instance = tracefs / "instances" / f"{_INSTANCE_PREFIX}{os.getpid()}-{id(self):x}"
        try:
            self._instance.mkdir()
            (self._instance / "buffer_size_kb").write_text(str(BUFFER_KB))
            # Keep the first records, which a flood of one hot call would overwrite.
            (self._instance / "options" / "overwrite").write_text("0")
            for cpu in sorted((self._instance / "per_cpu").iterdir()):
                self._pipes.append(os.open(cpu / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK))
            for name in self._unknown.values():
                self._enable(name, True)
        except OSError as exc:
            self.close()
            raise ProbeError(f"cannot trace syscall enter events in {tracefs}: "
                             f"{exc.strerror}") from None

    def _enable(self, name: str, on: bool) -> None:
        assert self._instance is not None
        path = self._instance / "events" / "syscalls" / f"{_ENTER}{name}" / "enable"
        path.write_text("1" if on else "0")

    @property
    def learning(self) -> int:
        """How many events are still enabled, waiting for their first call."""
        return len(self._unknown) if self._instance is not None else 0

    def _read_records(self) -> list[tuple[int, int]]:
        """The records waiting in the instance, at most a buffer's worth per CPU:
        a flood (a hot event not disabled yet) must not keep us reading."""
        records: list[tuple[int, int]] = []
        for fd in self._pipes:
            for _ in range(BUFFER_KB * 1024 // _PAGE):
                try:
                    page = os.read(fd, _PAGE)
                except BlockingIOError:
                    break
                if not page:
                    break
                records.extend(page_records(page, *self._layout))
        return records

    def learn(self) -> None:
        """Name the numbers recorded so far, and disable their events."""
        if self._instance is None:
            return
        new: dict[int, str] = {}
        for event_id, nr in self._read_records():
            name = self._unknown.pop(event_id, None)
            if name is not None:
                new[nr] = name
                self._enable(name, False)
        if new:
            self.names.update(new)
            write_cache(self._cache, self.names)
        if not self._unknown:
            self.close()

    async def learn_forever(self) -> None:
        while self._instance is not None:
            await anyio.sleep(LEARN_INTERVAL_S)
            self.learn()

    def stop(self) -> None:
        """Learn what was recorded, then stop recording."""
        self.learn()
        self.close()

    def close(self) -> None:
        """Remove the instance (which disables its events).  Idempotent."""
        pipes, self._pipes = self._pipes, []
        for fd in pipes:
            os.close(fd)
        if self._instance is not None:
            instance, self._instance = self._instance, None
            with contextlib.suppress(FileNotFoundError):
                instance.rmdir()


def remove_stale_instances(tracefs: Path) -> None:
    """Remove the instances of runs that died without removing theirs."""
    for instance in (tracefs / "instances").glob(f"{_INSTANCE_PREFIX}*"):
        pid = instance.name.removeprefix(_INSTANCE_PREFIX).partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                instance.rmdir()
