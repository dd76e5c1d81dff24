"""Processes in containers: their container and pod from the cgroup path, their pid
inside, and their files read as they see them.

The parsing is checked against the cgroup paths each runtime writes; the
whole path with real processes in cgroups named as Docker and Kubernetes
name them, in mount and pid namespaces of their own, profiled from BPF.
A container here is what a runtime makes of an image: Debian forky's root
(which ``./run test`` builds) as the process's ``/`` by ``pivot_root``, so
its maps name its files by paths that mean something else, or nothing, on
the host.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from _support import WORKLOADS, build

from ebpf_stream import EbpfConfig, FrameKind, Profile, Profiler, Stall
from ebpf_stream._binaries.containers import Container, parse_cgroups
from ebpf_stream._binaries.elf import ElfHeaders, Reader
from ebpf_stream._convert.attributes import process_attributes
from ebpf_stream.exporters import MemoryExporter

ID = "3f2a" + "0123456789abcdef" * 3 + "0123456789ab"
POD = "6d8a1c2e-4b7f-4e1a-9c3d-2f5e8b7a6c10"
FORKY_ROOT = Path(os.environ.get("EBPF_STREAM_FORKY_ROOT", "/var/cache/ebpf-stream/forky-root"))
PYTHON = "python3.14"  # forky's, statically linked: /usr/bin/python3.14 holds the interpreter
CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")
# Runs a command as root that cannot open /proc/PID/map_files (which needs either
# capability), as an agent granted only what BPF and ptrace need.
NO_MAP_FILES = ["setpriv", "--inh-caps=-sys_admin,-checkpoint_restore",
                "--bounding-set=-sys_admin,-checkpoint_restore"]


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


@dataclass
class Contained:
    """A workload in namespaces of its own, started and printed ``ready``."""

    process: subprocess.Popen[str]  # unshare, or the workload itself without a pid namespace
    pid: int  # the workload's, as the host numbers it


@contextmanager
def contained(argv: list[str], *, root: Path | None = None, cgroup: Path | None = None,
              pid_namespace: bool = True) -> Iterator[Contained]:
    """Run ``argv`` in a mount namespace of its own (and a pid namespace: it is pid 1
    there), in ``cgroup``, with ``root`` as its ``/``; kill it after.

    The root is entered as runtimes enter an image's, by ``pivot_root`` and
    unmounting the host's: its maps then name its files by the paths it sees.
    """
    script = f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))} && " if cgroup else ""
    old: Path | None = None  # where the host's / goes, to be unmounted
    if root is not None:
        old = root / "tmp" / f"ebpf-stream-old-root-{secrets.token_hex(4)}"
        old.mkdir()
        inside = f"/{old.relative_to(root)}"
        # The host's sh pivots; the container's sh mounts its /proc and drops the host's /.
        script += (f"mount --bind {shlex.quote(str(root))} {shlex.quote(str(root))} && "
                   f"cd {shlex.quote(str(root))} && pivot_root . {shlex.quote(inside[1:])} && "
                   "exec /usr/bin/sh -c "
                   + shlex.quote(f"mount -t proc proc /proc && umount -l {inside} && "
                                 f'rmdir {inside} && exec "$@"') + ' sh "$@"')
    else:
        script += 'exec "$@"'
    # --kill-child: the namespace's first process dies with unshare.
    namespaces = (["--pid", "--fork", "--kill-child", *([] if root else ["--mount-proc"])]
                  if pid_namespace else [])
    process = subprocess.Popen(["unshare", "--mount", *namespaces, "sh", "-c", script, "sh",
                                *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    pid = 0
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", "the workload did not start"
        # unshare forks the namespace's first process, which execs the workload.
        pid = (int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text())
               if pid_namespace else process.pid)
        yield Contained(process, pid)
    finally:
        if pid and pid != process.pid:
            with suppress(ProcessLookupError):  # unless it ended already
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
        if old is not None and old.exists():  # the namespace died before it dropped the host's /
            old.rmdir()


def profile(config: EbpfConfig, seconds: float,
            during: Callable[[], None] = lambda: None) -> tuple[Profile, MemoryExporter]:
    """Profile from BPF for ``seconds``, calling ``during`` once it runs."""
    memory = MemoryExporter()

    async def main() -> None:
        async with Profiler(config, [memory]) as profiler:
            assert profiler.mode == "bpf"
            during()
            await anyio.sleep(seconds)

    anyio.run(main)
    assert memory.profile is not None
    return memory.profile, memory


@pytest.fixture
def forky() -> Path:
    if not (FORKY_ROOT / "usr" / "bin" / PYTHON).exists():
        pytest.skip(f"no forky root with {PYTHON} at {FORKY_ROOT} (./run test builds it)")
    return FORKY_ROOT


@pytest.fixture
def workloads(forky: Path) -> Iterator[str]:
    """A directory of the Python workloads in the forky root, as the container names it."""
    name = f"/tmp/ebpf-stream-containers-{secrets.token_hex(4)}"
    directory = forky / name[1:]
    directory.mkdir()
    for workload in ("shares.py", "stalls.py"):
        shutil.copy(WORKLOADS / "python" / workload, directory / workload)
    yield name
    shutil.rmtree(directory)


def _cgroup_hierarchy() -> Path:
    """Where to make cgroups: the cgroup v2 hierarchy (alone, or beside v1's), else
    v1's cpu hierarchy."""
    for path in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (path / "cgroup.controllers").exists():
            return path
    if CPU_CGROUPS.is_dir():
        return CPU_CGROUPS
    pytest.skip("no cgroup hierarchy to make cgroups in")


@contextmanager
def new_cgroup(path: Path) -> Iterator[Path]:
    """Make cgroup ``path``, and after, remove it and the parents made for it."""
    made = [p for p in (path, *path.parents) if not p.exists()]  # leaf first
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        for directory in made:
            for _ in range(100):
                try:
                    directory.rmdir()
                    break
                except OSError:  # busy until its last process is reaped
                    time.sleep(0.05)


def _systemd_cgroup(layout: str, container: str, pod: str) -> Path:
    """A cgroup path as Docker and containerd (Kubernetes) name theirs under systemd,
    the usual driver on cgroup v2."""
    if layout == "docker":
        relative = f"system.slice/docker-{container}.scope"
    else:
        relative = (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                    f"{pod.replace('-', '_')}.slice/cri-containerd-{container}.scope")
    return _cgroup_hierarchy() / relative


@pytest.mark.parametrize("layout", ["docker", "kubepods"])
@pytest.mark.skipif(not CPU_CGROUPS.is_dir(), reason="no cgroup v1 cpu hierarchy")
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_process_in_a_container_is_named_with_its_container_and_its_pid_there(
        layout: str) -> None:
    container, pod = secrets.token_hex(32), str(uuid.uuid4())
    # The names runtimes give under cgroupfs, the driver of cgroup v1.
    parent = CPU_CGROUPS / ("docker" if layout == "docker" else f"kubepods/burstable/pod{pod}")
    spin = ("import time\ndef spin():\n    while True: time.sleep(0) or sum(range(1000))\n"
            "print('ready', flush=True)\nspin()")
    with new_cgroup(parent / container) as path, contained(
            [sys.executable, "-c", spin], cgroup=path) as workload:
        result, _ = profile(EbpfConfig(sample_rate_hz=99, pids=(workload.pid,)), 1.5)
    info = result.processes[workload.pid]
    assert info.container_id == container
    assert info.pod_uid == (pod if layout == "kubepods" else "")
    assert info.namespace_pid == 1  # the first process of its pid namespace
    attributes = process_attributes(info)
    assert attributes["process.pid"] == workload.pid and attributes["process.vpid"] == 1
    assert attributes["container.id"] == container
    assert attributes.get("k8s.pod.uid") == (pod if layout == "kubepods" else None)
    names = {f.name for s in result if s.pid == workload.pid for f in s.frames}
    assert "spin" in names, names  # its Python frames were walked


@pytest.mark.parametrize("layout", ["docker", "kubernetes"])
@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_python_service_in_its_own_root_is_profiled_as_it_sees_itself(
        forky: Path, workloads: str, layout: str) -> None:
    container, pod = secrets.token_hex(32), str(uuid.uuid4())
    script = f"{workloads}/shares.py"
    with new_cgroup(_systemd_cgroup(layout, container, pod)) as path, contained(
            [PYTHON, script, "60"], root=forky, cgroup=path) as workload:
        assert not Path(script).exists()  # only the container has its files
        result, _ = profile(EbpfConfig(sample_rate_hz=199, pids=(workload.pid,)), 2.0)
    pid = workload.pid
    assert result.processes[pid].name == PYTHON
    attributes = process_attributes(result.processes[pid])
    assert attributes == {
        "process.pid": pid,  # as the host numbers it
        "process.vpid": 1,  # as the container does: the first process of its namespace
        "process.executable.name": PYTHON,
        "process.command_line": f"{PYTHON} {script} 60",
        "container.id": container,
        **({"k8s.pod.uid": pod} if layout == "kubernetes" else {}),
    }
    frames = {(f.kind, f.module, f.name) for s in result if s.pid == pid for f in s.frames}
    # The interpreter was found and walked in the container's file: its functions,
    # in the file as the container names it.
    python = {name for kind, module, name in frames
              if kind is FrameKind.PYTHON and module == script}
    assert {"<module>", "run", "alpha", "beta", "gamma", "delta"} <= python, frames
    # Its native frames are named from the container's python3.14 (the host has no
    # file at that path, or another one).
    native = {name for kind, module, name in frames
              if kind is FrameKind.NATIVE and module == f"/usr/bin/{PYTHON}"}
    named = native & _exported(forky / "usr" / "bin" / PYTHON)
    assert named, native


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_an_asyncio_stall_in_a_container_is_found_with_its_coroutines(
        forky: Path, workloads: str) -> None:
    container = secrets.token_hex(32)
    with new_cgroup(_systemd_cgroup("docker", container, "")) as path, contained(
            [PYTHON, f"{workloads}/stalls.py", "--blocks", "3", "--mode", "sleep", "--go",
             "--delay", "0.5"], root=forky, cgroup=path) as workload:
        stdin = workload.process.stdin
        assert stdin is not None

        def go() -> None:
            assert stdin is not None
            stdin.write("go\n")
            stdin.flush()

        config = EbpfConfig(sample_rate_hz=99, pids=(workload.pid,)).with_stall_threshold(100)
        # Three blocks of 300 ms, 200 ms apart, after 0.5 s; the workload lingers 0.5 s.
        _, memory = profile(config, 2.8, go)
    stalls = [r for r in memory.records if isinstance(r, Stall)]
    assert len(stalls) == 3, stalls
    for stall in stalls:
        assert stall.pid == workload.pid
        assert stall.culprit is not None and stall.culprit.name == "culprit", stall
        assert stall.culprit.module == f"{workloads}/stalls.py"
        # The coroutine chain, as one task runs it: main awaits app, which awaits culprit.
        names = [f.name for f in stall.stacks[0].frames if f.kind is FrameKind.PYTHON]
        assert names[-3:] == ["main", "app", "culprit"], names


@pytest.fixture
def same_path(forky: Path) -> Iterator[tuple[str, Path, Path]]:
    """One path, two files: the host's hot_native, and in the forky root a stripped one
    whose functions are named otherwise, with its debug file where the container
    keeps debug files (by build id).  Yields (path, container's file, debug file)."""
    name = f"/tmp/ebpf-stream-containers-{secrets.token_hex(4)}"
    host, inside = Path(name), forky / name[1:]
    host.mkdir()
    inside.mkdir()
    debug: Path | None = None
    try:
        build("hot_native", host)
        full = build("hot_native", inside, "-Wl,--build-id=sha1", *(
            f"-D{function}=contained_{function}" for function in ("hot_leaf", "middle", "outer")))
        with open(full, "rb") as f:
            reader = Reader.of_file(f.fileno(), os.fstat(f.fileno()).st_size)
            build_id = ElfHeaders(reader).build_id
        assert build_id is not None
        debug = forky / "usr/lib/debug/.build-id" / build_id.hex()[:2] / (
            f"{build_id.hex()[2:]}.debug")
        debug.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["objcopy", "--only-keep-debug", str(full), str(debug)], check=True)
        subprocess.run(["strip", str(full)], check=True)
        yield name + "/hot_native", full, debug
    finally:
        shutil.rmtree(host)
        shutil.rmtree(inside)
        if debug is not None:
            debug.unlink(missing_ok=True)
            os.removedirs(debug.parent)  # up to the first directory forky itself has


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_binary_is_read_from_the_containers_file_not_the_hosts_at_its_path(
        forky: Path, same_path: tuple[str, Path, Path]) -> None:
    path, file, debug = same_path
    # A mount namespace alone: the pid is the host's, and the container's files its own.
    with contained([path, "30"], root=forky, pid_namespace=False) as workload:
        result, _ = profile(EbpfConfig(sample_rate_hz=199, pids=(workload.pid,)), 1.5)
        # Without map_files, the file is opened by its path in the process's root.
        fallback = _symbolized_without_map_files(workload.pid, path, debug)
    info = result.processes[workload.pid]
    assert info.namespace_pid == 0 and "process.vpid" not in process_attributes(info)
    assert not info.container_id  # no container's cgroup
    names = {f.name for s in result if s.pid == workload.pid for f in s.frames
             if f.module == path}
    # The container's stripped file, named by the debug file in the container's root;
    # the host's file at the same path would have named hot_leaf, middle and outer.
    assert {"contained_hot_leaf", "contained_middle", "contained_outer"} <= names, names
    assert not names & {"hot_leaf", "middle", "outer"}, names
    assert fallback == {"map_files": "PermissionError", "inode": file.stat().st_ino,
                        "name": "contained_hot_leaf"}


_WITHOUT_MAP_FILES = """
import json, os, sys
from ebpf_stream._binaries.process import Process, open_mapped_file
from ebpf_stream._symbols import Symbolizer
pid, path, address = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
mapping = next(m for m in Process(pid).mappings if m.module == path)
try:
    os.close(os.open(f"/proc/{pid}/map_files/{mapping.range}", os.O_RDONLY))
    refused = ""
except OSError as error:
    refused = type(error).__name__
fd = open_mapped_file(pid, mapping)
inode = os.fstat(fd).st_ino if fd is not None else 0
name = Symbolizer().user_frames(pid, [address])[0].name
print(json.dumps({"map_files": refused, "inode": inode, "name": name}))
"""


def _symbolized_without_map_files(pid: int, path: str, debug: Path) -> dict[str, object]:
    """What a symbolizer that cannot open map_files makes of ``path`` in ``pid``:
    map_files' error, the inode it opened, and the name of contained_hot_leaf."""
    vaddr = int(next(line.split()[0] for line in subprocess.run(
        ["nm", str(debug)], check=True, capture_output=True, text=True).stdout.splitlines()
        if line.endswith(" contained_hot_leaf")), 16)
    # A PIE: its first mapping, at file offset 0, is where vaddr 0 is loaded.
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        base = next(int(line.split("-")[0], 16) for line in f if line.rstrip().endswith(path))
    out = subprocess.run([*NO_MAP_FILES, sys.executable, "-c", _WITHOUT_MAP_FILES, str(pid),
                          path, str(base + vaddr + 4)], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    result: dict[str, object] = json.loads(out)
    return result


def _exported(binary: Path) -> set[str]:
    """The functions ``binary`` exports, as nm reads them."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(binary)], check=True,
                         capture_output=True, text=True).stdout
    return {fields[2] for fields in map(str.split, out.splitlines())
            if len(fields) == 3 and fields[1] in ("T", "t")}
