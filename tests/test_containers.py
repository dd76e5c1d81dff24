"""Processes in containers: their container and pod from the cgroup path, their pid inside.

The parsing is checked against the cgroup paths each runtime writes; the
whole path with a real process in a cgroup named as Docker and Kubernetes
name them, in pid and mount namespaces of its own, profiled from BPF.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ebpf_stream import EbpfConfig, Profiler
from ebpf_stream._binaries.containers import Container, parse_cgroups
from ebpf_stream._convert.attributes import process_attributes
from ebpf_stream.exporters import MemoryExporter

ID = "3f2a" + "0123456789abcdef" * 3 + "0123456789ab"
POD = "6d8a1c2e-4b7f-4e1a-9c3d-2f5e8b7a6c10"


@pytest.mark.parametrize(("cgroup", "expected"), [
    (f"12:cpu,cpuacct:/docker/{ID}", Container(ID, "")),
    (f"0::/system.slice/docker-{ID}.scope", Container(ID, "")),
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
     f"{POD.replace('-', '_')}.slice/cri-containerd-{ID}.scope", Container(ID, POD)),
    (f"4:memory:/kubepods/burstable/pod{POD}/{ID}", Container(ID, POD)),
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
     f"{POD.replace('-', '_')}.slice/crio-{ID}.scope", Container(ID, POD)),
    (f"0::/machine.slice/libpod-{ID}.scope/container", Container(ID, "")),
    (f"1:name=systemd:/libpod_parent/libpod-{ID}", Container(ID, "")),
    ("0::/user.slice/user-1000.slice/session-2.scope", None),
    (f"0::/system.slice/crio-conmon-{ID}.scope", None),  # the monitor, not the container
    ("", None),
], ids=["docker", "docker-systemd", "containerd-k8s-systemd", "containerd-k8s-cgroupfs",
        "crio", "podman", "podman-cgroupfs", "no-container", "conmon", "empty"])
def test_each_runtimes_cgroup_names_its_container(cgroup: str,
                                                  expected: Container | None) -> None:
    assert parse_cgroups(f"5:devices:/\n{cgroup}\n") == expected


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")


@pytest.mark.parametrize("layout", ["docker", "kubepods"])
@pytest.mark.skipif(not CPU_CGROUPS.is_dir(), reason="no cgroup v1 cpu hierarchy")
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_process_in_a_container_is_named_with_its_container_and_its_pid_there(
        layout: str) -> None:
    container, pod = secrets.token_hex(32), str(uuid.uuid4())
    parent = CPU_CGROUPS / ("docker" if layout == "docker" else f"kubepods/burstable/pod{pod}")
    cgroup = parent / container
    cgroup.mkdir(parents=True)
    spin = "import time\ndef spin():\n    while True: time.sleep(0) or sum(range(1000))\nspin()"
    child = subprocess.Popen(
        # --kill-child: the namespace's first process dies with unshare.
        ["unshare", "--pid", "--mount", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
         f'echo $$ > {cgroup}/cgroup.procs && exec {sys.executable} -c "$0"', spin])
    memory = MemoryExporter()
    pid = 0
    try:
        pid = _python_child(child.pid)

        async def main() -> None:
            async with Profiler(EbpfConfig(sample_rate_hz=99, pids=(pid,)), [memory]):
                await asyncio.sleep(1.5)

        asyncio.run(main())
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()
        for path in (cgroup, *cgroup.parents):
            if path == CPU_CGROUPS:
                break
            _remove(path)
    assert memory.profile is not None
    info = memory.profile.processes[pid]
    assert info.container_id == container
    assert info.pod_uid == (pod if layout == "kubepods" else "")
    assert info.namespace_pid == 1  # the first process of its pid namespace
    attributes = process_attributes(info)
    assert attributes["process.pid"] == pid and attributes["process.vpid"] == 1
    assert attributes["container.id"] == container
    assert attributes.get("k8s.pod.uid") == (pod if layout == "kubepods" else None)
    names = {f.name for s in memory.profile if s.pid == pid for f in s.frames}
    assert "spin" in names, names  # its Python frames were walked


def _python_child(unshare: int) -> int:
    """The host pid of the Python process ``unshare`` forked (pid 1 of its namespace)."""
    for _ in range(200):
        children = Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()
        if children:
            pid = int(children[0])
            if "python" in Path(f"/proc/{pid}/comm").read_text():
                return pid
        asyncio.run(asyncio.sleep(0.02))
    raise AssertionError("the namespaced process did not start")


def _remove(path: Path) -> None:
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # busy until its last process is reaped
            asyncio.run(asyncio.sleep(0.05))
