"""Shared fixtures: the BPF environment and workloads compiled by the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import build, start_ready, unprivileged_python
from services import Service

# The tests stop tools and workloads with SIGINT.  A suite started as a background
# job of a non-interactive shell has SIGINT ignored, which its children would
# inherit; a handler of ours is reset to the default in them instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def bpf_environment() -> None:
    """Root, bcc, tracefs and kernel headers, as the loader finds them."""
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    from ebpf_stream._bpf.environment import require_environment

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


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the unprivileged scripts may write to (pytest's are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ebpf-stream-unprivileged-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Every service a test starts, killed at the end if the test did not stop it."""
    started: list[Service] = []
    yield started
    for service in started:
        service.close()
