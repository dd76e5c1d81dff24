"""Syscall names learned from the running kernel, checked against the kernel's own word.

``/proc/PID/syscall`` gives the number of the call a blocked task is in, an
independent source for the number behind a name.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from ebpf_stream._loader import ensure_tracefs
from ebpf_stream._syscall_names import SyscallNames, enter_events, write_cache


def instances() -> list[str]:
    """This process's ftrace instances."""
    return [p.name for p in (ensure_tracefs() / "instances").glob(f"*-{os.getpid()}-*")]

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]


def blocked_call(proc: subprocess.Popen[str]) -> int:
    """The number of the syscall ``proc`` is blocked in."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        fields = Path(f"/proc/{proc.pid}/syscall").read_text().split()
        if fields[0] not in ("running", "-1") and proc.poll() is None:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0]
            if state == "S":
                return int(fields[0])
        time.sleep(0.01)
    raise AssertionError("the process never blocked")


@pytest.mark.anyio
async def test_learned_numbers_match_the_kernel_and_are_cached(tmp_path: Path) -> None:
    cache = tmp_path / "names.json"
    names = SyscallNames(cache)
    await names.open()
    try:
        events = set(enter_events(ensure_tracefs()).values())
        assert names.learning == len(events)  # nothing cached: every enter event
        # cat blocks in read on an empty pipe; sleep in clock_nanosleep.
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True)
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            read_nr, sleep_nr = blocked_call(cat), blocked_call(sleeper)  # type: ignore[arg-type]
        finally:
            cat.kill()
            sleeper.kill()
            cat.wait()
            sleeper.wait()
        names.learn()
        assert names.name(read_nr) == "read"
        assert names.name(sleep_nr) in ("clock_nanosleep", "nanosleep")
        assert set(names.names.values()) <= events
        assert names.learning == len(events) - len(set(names.names.values()))
        assert names.name(100_000) == "syscall_100000"
    finally:
        names.close()
    assert not instances()

    again = SyscallNames(cache)
    await again.open()
    try:
        assert again.names == names.names  # from the cache, before any call
        assert again.learning == len(events) - len(set(names.names.values()))
    finally:
        again.close()


@pytest.mark.anyio
async def test_a_cache_naming_every_event_loads_no_learner(tmp_path: Path) -> None:
    cache = tmp_path / "names.json"
    events = enter_events(ensure_tracefs())
    write_cache(cache, {1000 + i: name for i, name in enumerate(events.values())})
    names = SyscallNames(cache)
    await names.open()
    try:
        assert names.learning == 0 and not instances()
        assert len(names.names) == len(events)
    finally:
        names.close()


@pytest.mark.anyio
async def test_learning_detaches_learned_events_within_a_poll(tmp_path: Path) -> None:
    names = SyscallNames(tmp_path / "names.json")
    await names.open()
    try:
        before = names.learning
        async with anyio.create_task_group() as tg:
            tg.start_soon(names.learn_forever)
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()
        # This process's own calls (the event loop's epoll_wait, at least) were learned.
        assert len(names.names) > 0 and names.learning < before
    finally:
        names.close()
