"""Syscall names from the shipped x86-64 table, checked against the kernel's own word.

``/proc/PID/syscall`` gives the number of the call a blocked task is in, an
independent source for the number behind a name; the kernel's enter events
list the calls it has; installed uapi headers give numbers and names too.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path

import pytest

from ebpf_stream._bpf.environment import ensure_tracefs
from ebpf_stream._bpf.syscall_names import syscall_name, unnamed_syscalls, warn_of_unnamed_syscalls
from ebpf_stream._bpf.syscall_table import X86_64

HEADERS = [Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
           *Path("/usr/src").glob("linux-headers-*/arch/x86/include/generated/uapi/asm/unistd_64.h")]


def blocked_call(proc: subprocess.Popen[bytes]) -> int:
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


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="no /proc/PID/syscall")
def test_numbers_of_blocked_calls_have_their_names() -> None:
    # cat blocks in read on an empty pipe; sleep in clock_nanosleep.
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert syscall_name(blocked_call(cat)) == "read"
        assert syscall_name(blocked_call(sleeper)) in ("clock_nanosleep", "nanosleep")
    finally:
        for proc in (cat, sleeper):
            proc.kill()
            proc.wait()


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_every_syscall_of_the_running_kernel_is_named() -> None:
    """Fails on a kernel newer than the table: regenerate ``_syscall_table.py``."""
    assert unnamed_syscalls(ensure_tracefs()) == []


@pytest.mark.parametrize("header", [h for h in HEADERS if h.exists()], ids=str)
def test_installed_headers_agree_with_the_table(header: Path) -> None:
    numbers = {int(m[2]): m[1] for m in
               re.finditer(r"^#define __NR_(\w+) (\d+)$", header.read_text(), flags=re.M)
               if m[1] != "syscalls"}  # the kernel's own headers also give the count
    assert numbers and {nr: X86_64.get(nr) for nr in numbers} == numbers


def test_kernel_function_names_are_abi_names_and_new_calls_are_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    events = tmp_path / "events" / "syscalls"
    for name in ("read", "newfstat", "newuname", "umount", "sendfile64", "brand_new",
                 "another_new"):
        (events / f"sys_enter_{name}").mkdir(parents=True)
    (events / "sys_exit_exit_only").mkdir()
    assert unnamed_syscalls(tmp_path) == ["another_new", "brand_new"]
    with caplog.at_level(logging.WARNING, "ebpf_stream"):
        warn_of_unnamed_syscalls(tmp_path)
    assert "2 syscalls newer than" in caplog.text and "another_new, brand_new" in caplog.text
    assert [syscall_name(n) for n in (0, 5, 63, 110)] == ["read", "fstat", "uname", "getppid"]
    assert syscall_name(100_000) == "syscall_100000"
