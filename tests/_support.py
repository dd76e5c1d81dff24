"""Helpers the tests share: building workloads and looking at what the kernel holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

WORKLOADS = Path(__file__).parent / "workloads"
UVLOOP = ("asyncio", {"use_uvloop": True})
NODE_MODULES = Path(__file__).resolve().parent.parent / ".cache" / "npm" / "node_modules"
"""Where ``./run test`` installs the npm packages that read our files in the tests."""
CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium, which ``./run test`` installs to run the flame graph's script."""
ROOT = Path(__file__).resolve().parent.parent
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
"""Runs a command as uid 65534 with no capabilities, as containers start services."""
NO_BPF_CAPS = ["setpriv", "--inh-caps=-bpf,-perfmon,-sys_admin",
               "--bounding-set=-bpf,-perfmon,-sys_admin"]
"""Runs a command as root without the capabilities BPF needs."""
SYSTEM_PYTHON = Path("/usr/bin/python3")
DROPS_PRIVILEGES = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                      reason="dropping privileges needs root and setpriv")
"""Debian's python3: uid 65534 may not read the test interpreter (pyenv under /root)."""


def unprivileged_python() -> list[str]:
    """How to run Debian's python3 as uid 65534, with this checkout and this
    environment's packages; skips where that cannot import the package."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not SYSTEM_PYTHON.exists():
        pytest.skip("dropping privileges needs root, setpriv and Debian's python3")
    command = [*NOBODY, "env", f"PYTHONPATH={ROOT}:{sysconfig.get_paths()['purelib']}",
               str(SYSTEM_PYTHON)]
    probe = subprocess.run([*command, "-c", "import sys, ebpf_stream; print(sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or probe.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"uid 65534 cannot import ebpf_stream with {SYSTEM_PYTHON}: "
                    f"{probe.stderr.strip().splitlines()[-1:] or probe.stdout.strip()}")
    return command


def go_command() -> str:
    """The ``go`` command, whose ``go tool pprof`` reads pprof files; skips without it."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed (./run test installs Debian's golang-go)")
    return go


def node_package(name: str) -> Path:
    """The directory of npm package ``name``, as ``./run test`` installs it, with node
    to run it; skips without them."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (./run test installs it)")
    package = NODE_MODULES / name
    if not (package / "package.json").is_file():
        pytest.skip(f"npm package {name} is not installed in {NODE_MODULES} "
                    "(./run test installs it)")
    return package


def chromium() -> Path:
    """Debian's Chromium; skips without it."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (./run test installs Debian's chromium)")
    return CHROMIUM


def build(name: str, directory: Path, *flags: str) -> Path:
    """Compile tests/workloads/NAME.c with a frame pointer in every function, and
    ``flags`` (``-Dhot_leaf=other_leaf`` builds a different file of the same name)."""
    binary = directory / name
    if not binary.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler")
        subprocess.run([cc, "-O0", "-g", "-fno-omit-frame-pointer", *flags, "-o", str(binary),
                        str(WORKLOADS / f"{name}.c")], check=True)
    return binary


def start_ready(argv: list[str]) -> subprocess.Popen[str]:
    """Start a workload and wait for its 'ready' line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (user + system).

    Sample counts are checked against this rather than wall time: a CPU
    sampler can only see a process while it is on a CPU.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loaded_programs() -> set[int]:
    """Ids of every BPF program loaded in the kernel, as bpftool lists them."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def unloaded(ids: set[int], timeout: float = 10) -> bool:
    """Whether the kernel frees programs ``ids`` within ``timeout`` seconds: it frees
    programs detached from syscall tracepoints after an RCU grace period, not at once."""
    deadline = time.monotonic() + timeout
    while ids & loaded_programs():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def program_ids(pid: int | str = "self") -> set[int]:
    """Ids of the BPF programs a process holds open."""
    ids = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        ids.update(int(line.split()[1]) for line in info.splitlines()
                   if line.startswith("prog_id:"))
    return ids


def sampling(pid: int | str) -> bool:
    """Whether a process's CPU sampling program has run: profilers count BPF run
    time, so its count shows once sampling has begun."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if info.get("prog_type", "").strip() == "7" and int(info.get("run_cnt", 0)) > 0:
            return True  # BPF_PROG_TYPE_PERF_EVENT
    return False


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
