"""Shared fixtures: the BPF environment and workloads compiled by the tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import build, start_ready, unprivileged_python


@pytest.fixture(scope="session")
def bpf_environment() -> None:
    """Root, bcc, tracefs and kernel headers, as the loader finds them."""
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    from ebpf_stream._environment import require_environment

    os.environ["BCC_KERNEL_SOURCE"] = str(require_environment().headers.path)


@pytest.fixture(scope="session")
def workload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workloads")


@pytest.fixture(scope="session")
def hot_native(workload_dir: Path) -> Path:
    return build("hot_native", workload_dir)


@pytest.fixture(scope="session")
def many_stacks(workload_dir: Path) -> Path:
    return build("many_stacks", workload_dir)


@pytest.fixture(scope="session")
def syscall_heavy(workload_dir: Path) -> Path:
    return build("syscall_heavy", workload_dir)


@pytest.fixture
def running(hot_native: Path) -> Iterator[subprocess.Popen[str]]:
    proc = start_ready([str(hot_native)])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def as_nobody() -> list[str]:
    """The command prefix that runs a Python script as uid 65534 with no capabilities."""
    return unprivileged_python()
