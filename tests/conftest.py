"""Shared fixtures: the BPF environment, workloads compiled by the tests, and
views of what the kernel has loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

WORKLOADS = Path(__file__).parent / "workloads"


@pytest.fixture(scope="session")
def bpf_environment() -> None:
    """Root, bcc, tracefs and kernel headers, as the loader finds them."""
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    from ebpf_stream._loader import require_environment

    os.environ["BCC_KERNEL_SOURCE"] = str(require_environment().path)


@pytest.fixture(scope="session")
def workload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workloads")


def build(name: str, directory: Path) -> Path:
    """Compile tests/workloads/NAME.c with frame pointers in every function."""
    binary = directory / name
    if not binary.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler")
        subprocess.run([cc, "-O0", "-g", "-fno-omit-frame-pointer", "-o", str(binary),
                        str(WORKLOADS / f"{name}.c")], check=True)
    return binary


@pytest.fixture(scope="session")
def hot_native(workload_dir: Path) -> Path:
    return build("hot_native", workload_dir)


@pytest.fixture(scope="session")
def syscall_heavy(workload_dir: Path) -> Path:
    return build("syscall_heavy", workload_dir)


def start_ready(argv: list[str]) -> subprocess.Popen[str]:
    """Start a workload and wait for its 'ready' line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def running(hot_native: Path) -> Iterator[subprocess.Popen[str]]:
    proc = start_ready([str(hot_native)])
    yield proc
    proc.kill()
    proc.wait()


def loaded_programs() -> set[tuple[int, str]]:
    """(id, name) of every BPF program loaded in the kernel."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {(p["id"], p.get("name", "")) for p in json.loads(out or "[]")}


def bpf_fds(pid: int | str = "self") -> list[str]:
    """This process's fds that point at BPF programs, maps or perf events."""
    fd_dir = Path(f"/proc/{pid}/fd")
    kinds = []
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(("anon_inode:bpf", "anon_inode:[perf_event]")):
            kinds.append(target)
    return kinds
