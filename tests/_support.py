"""Helpers the tests share: building workloads and looking at what the kernel holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

WORKLOADS = Path(__file__).parent / "workloads"
UVLOOP = ("asyncio", {"use_uvloop": True})


def build(name: str, directory: Path) -> Path:
    """Compile tests/workloads/NAME.c with a frame pointer in every function."""
    binary = directory / name
    if not binary.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler")
        subprocess.run([cc, "-O0", "-g", "-fno-omit-frame-pointer", "-o", str(binary),
                        str(WORKLOADS / f"{name}.c")], check=True)
    return binary


def start_ready(argv: list[str]) -> subprocess.Popen[str]:
    """Start a workload and wait for its 'ready' line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def loaded_programs() -> set[tuple[int, str]]:
    """(id, name) of every BPF program loaded in the kernel."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {(p["id"], p.get("name", "")) for p in json.loads(out or "[]")}


def bpf_fds(pid: int | str = "self") -> list[str]:
    """A process's fds that point at BPF programs, maps or perf events."""
    kinds = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(("anon_inode:bpf", "anon_inode:[perf_event]")):
            kinds.append(target)
    return kinds
