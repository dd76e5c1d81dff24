"""CPython 3.14 and 3.15, as Debian forky builds them, inside a forky root (real BPF).

``./run test`` builds the root once (debootstrap, cached under
``/var/cache/ebpf-stream``); each workload runs in it with ``chroot``, so
its interpreter, libraries and paths are the root's, as in a container.
Each is checked against its own truth: function shares against the CPU
time the workload measured around each function, coroutine stacks, and
each stall it caused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from _support import start_ready
from test_requests_kernel import check_requests

from ebpf_stream import EbpfConfig, FrameKind, Profile, Profiler, Stall
from ebpf_stream.exporters import MemoryExporter

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment"),
              pytest.mark.parametrize("version", ["3.14", "3.15"])]

ROOT = Path(os.environ.get("EBPF_STREAM_FORKY_ROOT", "/var/cache/ebpf-stream/forky-root"))
WORKLOADS = Path(__file__).parent / "workloads" / "python"
PACKAGE = Path(__file__).parents[1] / "ebpf_stream"
TOLERANCE = 0.03


@pytest.fixture
def root(version: str) -> Iterator[Path]:
    """The forky root, with this module's workloads in its /tmp."""
    if not (ROOT / "usr" / "bin" / f"python{version}").exists():
        pytest.skip(f"no forky root with python{version} at {ROOT} (./run test builds it)")
    inside = ROOT / "tmp" / "ebpf-stream-tests"
    inside.mkdir(exist_ok=True)
    for name in ("shares.py", "stalls.py"):
        shutil.copy(WORKLOADS / name, inside / name)
    yield ROOT


def in_root(root: Path, version: str, workload: str, *args: str) -> subprocess.Popen[str]:
    return start_ready(["chroot", str(root), f"python{version}",
                        f"/tmp/ebpf-stream-tests/{workload}", *args])


async def profile(config: EbpfConfig, seconds: float) -> Profile:
    memory = MemoryExporter()
    async with Profiler(config, [memory]) as profiler:
        assert profiler.mode == "bpf"
        await anyio.sleep(seconds)
    assert memory.profile is not None
    return memory.profile


def leaf_shares(profile: Profile, pid: int) -> dict[str, float]:
    leaves: Counter[str] = Counter()
    for s in profile:
        if s.pid == pid:
            python = [f.name for f in s.frames if f.kind is FrameKind.PYTHON]
            leaves[python[-1] if python else ""] += s.count
    total = sum(leaves.values())
    return {name: n / total for name, n in leaves.items()}


def check_shares(result: Profile, pid: int, truth: dict[str, float]) -> None:
    """shares.py's leaf shares within TOLERANCE of its own timing of each function."""
    total = truth["alpha"] + truth["beta"] + truth["delta"]
    shares = leaf_shares(result, pid)
    # beta's truth includes gamma's; its own share is the rest.
    expected = {"alpha": truth["alpha"] / total, "delta": truth["delta"] / total,
                "beta+gamma": truth["beta"] / total}
    got = {"alpha": shares.get("alpha", 0), "delta": shares.get("delta", 0),
           "beta+gamma": shares.get("beta", 0) + shares.get("gamma", 0)}
    for name, share in expected.items():
        assert abs(got[name] - share) <= TOLERANCE, (name, got, expected)


@pytest.mark.parametrize("frames", ["merged", "python"])
def test_function_shares_match_the_workloads_own_timing(
        root: Path, version: str, frames: str) -> None:
    workload = in_root(root, version, "shares.py", "60")
    try:
        config = EbpfConfig(sample_rate_hz=499, pids=(workload.pid,)).with_python_frames(
            frames)  # type: ignore[arg-type]
        result = anyio.run(profile, config, 4.0)
    finally:
        workload.send_signal(signal.SIGINT)
        out, _ = workload.communicate(timeout=30)
    truth = json.loads(out.strip().splitlines()[-1])
    names = {f.name for s in result for f in s.frames if f.kind is FrameKind.PYTHON}
    assert {"<module>", "alpha", "beta", "gamma", "delta"} <= names, names
    check_shares(result, workload.pid, truth)
    if frames == "python":
        assert all({f.kind for f in s.frames} == {FrameKind.PYTHON} for s in result
                   if s.pid == workload.pid and s.count), "native frames in python mode"


def test_coroutine_stacks_and_stalls(root: Path, version: str) -> None:
    check_stalls(["chroot", str(root), f"python{version}", "/tmp/ebpf-stream-tests/stalls.py"])


def check_stalls(command: list[str]) -> None:
    """``command`` (stalls.py under some interpreter) blocks its loop three times,
    and each stall is found with its culprit and the coroutine chain to it."""
    workload = subprocess.Popen(
        [*command, "--blocks", "3", "--mode", "sleep", "--go", "--delay", "0.5"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert workload.stdin is not None and workload.stdout is not None
    assert workload.stdout.readline().strip() == "ready"
    memory = MemoryExporter()

    async def main() -> None:
        config = EbpfConfig(sample_rate_hz=99, pids=(workload.pid,)).with_stall_threshold(100)
        async with Profiler(config, [memory]):
            assert workload.stdin is not None
            workload.stdin.write("go\n")
            workload.stdin.flush()
            await anyio.to_thread.run_sync(workload.wait, 30)

    try:
        anyio.run(main)
    finally:
        workload.kill()
        workload.wait()
    stalls = [r for r in memory.records if isinstance(r, Stall)]
    assert len(stalls) == 3, stalls
    for stall in stalls:
        assert stall.culprit is not None and stall.culprit.name == "culprit", stall
        # The coroutine chain, as one task runs it: main awaits app, which awaits culprit.
        names = [f.name for f in stall.stacks[0].frames if f.kind is FrameKind.PYTHON]
        assert names[-3:] == ["main", "app", "culprit"], names


def test_requests_are_read_from_each_sample(root: Path, version: str) -> None:
    """A service publishing its requests on this interpreter (the publisher and its
    workload copied into the root, as a container's image holds them)."""
    inside = root / "tmp" / "ebpf-stream-tests" / "service"
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(PACKAGE, inside / "ebpf_stream",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (inside / "tests" / "workloads" / "python").mkdir(parents=True)
    shutil.copy(WORKLOADS / "requests.py", inside / "tests" / "workloads" / "python")
    try:
        check_requests(["chroot", str(root), f"python{version}",
                        "/tmp/ebpf-stream-tests/service/tests/workloads/python/requests.py",
                        "asyncio", "20"])
    finally:
        shutil.rmtree(inside)
