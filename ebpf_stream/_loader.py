"""Loading BPF programs: environment checks, kernel headers, compile, attach, detach.

bcc compiles C at run time against kernel headers.  Hosts with a custom
kernel (no headers package) are common, so when the running kernel has no
headers we point bcc at the nearest installed Debian headers, merged from
their ``-common`` and per-architecture halves, and say so.  Compiling takes
about a second of CPU, so it runs in a worker thread: the caller's event loop
keeps ticking; it runs in a worker process, so the compiler's memory is
handed back to the system when the worker exits.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio.to_thread

from ._bpf import BpfMap, attach_perf_event, attach_raw_tracepoint, attach_tracepoint, online_cpus
from ._errors import EnvironmentCheckError, ProbeError

log = logging.getLogger("ebpf_stream")

KERNEL_SOURCES = Path(__file__).parent / "_kernel"  # a link to kernel/ in the source tree
MIN_KERNEL = (5, 8)  # BPF ring buffers
_TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
_CAP_PERFMON, _CAP_BPF, _CAP_SYS_ADMIN = 38, 39, 21


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one environment check, with the fix when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the machine's.

    The kernel checks BPF's capabilities against the machine's namespace, so
    a rootless container's root holds them in name only.
    """
    try:
        first = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return first[:3] != ["0", "0", "4294967295"]


# The capabilities loading BPF needs, and why; CAP_SYS_ADMIN stands in for either.
_NEEDED_CAPS = (("CAP_BPF", _CAP_BPF, "create BPF maps and load programs"),
                ("CAP_PERFMON", _CAP_PERFMON, "load tracing programs and open perf events"))
_CAPS_FIX = ("run as root with CAP_BPF and CAP_PERFMON (docker run --cap-add BPF "
             "--cap-add PERFMON, or the pod's securityContext.capabilities.add)")


def _user() -> str:
    uid = os.geteuid()
    return "uid 0 (root)" if uid == 0 else f"uid {uid}"


def held_capabilities() -> list[str]:
    """The names of the capabilities BPF needs that this process holds (effective)."""
    caps = _effective_caps()
    return [name for name, bit in (("CAP_BPF", _CAP_BPF), ("CAP_PERFMON", _CAP_PERFMON),
                                   ("CAP_SYS_ADMIN", _CAP_SYS_ADMIN)) if caps >> bit & 1]


_USERNS_FIX = ("run in the machine's user namespace (not a rootless container), "
               "as root with CAP_BPF and CAP_PERFMON")


def check_capabilities() -> list[Check]:
    """One check per capability BPF needs, as this process holds them.

    The effective set decides, not the uid: a container's root, or one
    started by ``setpriv`` or ``capsh``, often lacks them.
    """
    caps = _effective_caps()
    admin = caps >> _CAP_SYS_ADMIN & 1
    namespaced = _in_user_namespace()
    checks = []
    for name, bit, purpose in _NEEDED_CAPS:
        if namespaced:
            checks.append(Check(name, False, f"{_user()} in a user namespace, where "
                                f"capabilities do not count for BPF: needed to {purpose}",
                                _USERNS_FIX))
        elif caps >> bit & 1:
            checks.append(Check(name, True, f"held by {_user()}"))
        elif admin:
            checks.append(Check(name, True, f"covered by CAP_SYS_ADMIN, held by {_user()}"))
        else:
            checks.append(Check(name, False, f"{_user()} lacks it: needed to {purpose}",
                                _CAPS_FIX))
    return checks


def check_privileges() -> Check:
    """The capability checks in one line: what a start reports first."""
    failed = [c.name for c in check_capabilities() if not c.ok]
    if not failed:
        return Check("privileges", True, f"{_user()} with CAP_BPF and CAP_PERFMON")
    if _in_user_namespace():
        return Check("privileges", False, f"{_user()} runs in a user namespace, where "
                     "capabilities do not count for loading BPF", _USERNS_FIX)
    return Check("privileges", False, "loading BPF needs CAP_BPF and CAP_PERFMON (or "
                 f"CAP_SYS_ADMIN), and {_user()} lacks {' and '.join(failed)}", _CAPS_FIX)


def check_kernel() -> Check:
    ver = _kernel_version()
    ok = ver >= MIN_KERNEL
    return Check("kernel", ok, f"Linux {platform.release()}",
                 "" if ok else f"upgrade to Linux {'.'.join(map(str, MIN_KERNEL))} or later")


def check_btf() -> Check:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return Check("btf", ok, "/sys/kernel/btf/vmlinux" + (" present" if ok else " missing"),
                 "" if ok else "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")


def tracefs_path() -> Path | None:
    return next((p for p in _TRACEFS if (p / "events").is_dir()), None)


def _unreadable_tracefs(exc: PermissionError) -> Check:
    # Mounted, and readable by root alone (mode 700).
    return Check("tracefs", False, f"{exc.filename} is not readable by {_user()}", "run as root")


def check_tracefs() -> Check:
    try:
        p = tracefs_path()
    except PermissionError as exc:
        return _unreadable_tracefs(exc)
    if p:
        return Check("tracefs", True, f"mounted at {p}")
    return Check("tracefs", False, "not mounted", "mount -t tracefs nodev /sys/kernel/tracing")


def ensure_tracefs() -> Path:
    """Return tracefs' mount point, mounting it when missing and we are allowed to."""
    p = tracefs_path()
    if p:
        return p
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", b"/sys/kernel/tracing", b"tracefs", 0, None) == 0:
        log.info("mounted tracefs on /sys/kernel/tracing")
        return Path("/sys/kernel/tracing")
    err = os.strerror(ctypes.get_errno())
    raise EnvironmentCheckError(
        f"tracefs is not mounted and mounting it failed ({err}): "
        "run 'mount -t tracefs nodev /sys/kernel/tracing' as root"
    )


def check_bcc() -> Check:
    # Located, not imported: only the compile worker ever imports bcc.
    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return Check("bcc", False, "not importable",
                     "apt-get install python3-bpfcc, then ./run setup to link it into .venv")
    return Check("bcc", True, f"bcc at {Path(spec.origin).parent}")


# -- kernel headers ----------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Headers:
    """Where bcc should look for kernel headers, and whether that is an exact match."""

    path: Path
    exact: bool
    description: str


def _release_version(name: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?(?:-(\d+))?", name)
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def _installed_header_pairs(src: Path) -> Iterator[tuple[Path, Path]]:
    """Yield (arch, common) pairs of Debian header directories under ``src``."""
    if not src.is_dir():
        return
    for arch in sorted(src.glob("linux-headers-*")):
        if arch.name.endswith("-common") or not (arch / "include").is_dir():
            continue
        stem = re.sub(r"-[a-z0-9_]+$", "", arch.name)  # drop the flavour (-amd64)
        common = src / f"{stem}-common"
        if common.is_dir():
            yield arch, common


def _merge_tree(dst: Path, sources: list[Path]) -> None:
    """Overlay ``sources`` into ``dst`` as symlinks; later sources win on files.

    Only directories present in several sources become real directories, so
    the merged tree costs a few hundred inodes, not a copy of the headers.
    """
    dst.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[Path]] = {}
    for s in sources:
        for child in s.iterdir():
            entries.setdefault(child.name, []).append(child)
    for name, paths in entries.items():
        dirs = [p for p in paths if p.is_dir()]
        if len(dirs) > 1:
            _merge_tree(dst / name, dirs)
        else:
            (dst / name).symlink_to(paths[-1])


def _cache_dir() -> Path:
    base = os.environ.get("EBPF_STREAM_CACHE") or "/var/cache/ebpf-stream"
    return Path(base)


def _is_merged(tree: Path) -> bool:
    return (tree / "include/linux/kconfig.h").exists()


def find_headers(release: str | None = None, src: Path = Path("/usr/src")) -> Headers:
    """Find kernel headers for ``release`` (default: the running kernel)."""
    release = release or platform.release()
    build = Path("/lib/modules") / release / "build"
    if (build / "include/linux/kconfig.h").exists() or (
        (build / "include").is_dir() and (build.parent / "source/include/linux/kconfig.h").exists()
    ):
        return Headers(build, True, f"{build} (matches the running kernel)")
    pairs = list(_installed_header_pairs(src))
    if not pairs:
        raise EnvironmentCheckError(
            f"no kernel headers found for Linux {release}: install linux-headers-amd64 "
            "(or the headers of your kernel) with apt-get, or run ./run setup"
        )
    want = _release_version(release)
    # Nearest: the newest headers not newer than the kernel, else the oldest newer ones.
    older = [p for p in pairs if _release_version(p[0].name) <= want]
    arch, common = max(older, key=lambda p: _release_version(p[0].name)) if older else min(
        pairs, key=lambda p: _release_version(p[0].name))
    merged = _cache_dir() / "kernel-headers" / arch.name
    if not _is_merged(merged):
        merged.parent.mkdir(parents=True, exist_ok=True)
        # Probes open concurrently: each thread builds its own tree, the first rename wins.
        tmp = Path(tempfile.mkdtemp(prefix=f".{merged.name}.", dir=merged.parent))
        _merge_tree(tmp, [common, arch])
        if merged.exists() and not _is_merged(merged):
            shutil.rmtree(merged, ignore_errors=True)  # left from headers since removed
        try:
            tmp.rename(merged)
        except OSError:  # another thread or process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return Headers(merged, False,
                   f"no headers for Linux {release}; using {arch.name} with {common.name}")


def _unpreparable_headers(exc: OSError) -> Check:
    return Check("kernel headers", False, f"cannot prepare headers: {exc}",
                 "set EBPF_STREAM_CACHE to a writable directory")


def check_headers() -> Check:
    try:
        h = find_headers()
    except EnvironmentCheckError as exc:
        return Check("kernel headers", False, str(exc), "apt-get install linux-headers-amd64")
    except OSError as exc:
        return _unpreparable_headers(exc)
    return Check("kernel headers", True, h.description)


def environment_checks() -> list[Check]:
    """Every check ``ebpf-stream doctor`` prints, in order, as this process sees them.

    A check that breaks on something unforeseen fails with what broke it, so
    the report is always whole.
    """
    checks: list[Check] = []
    for name, run in (("capabilities", check_capabilities), ("kernel", check_kernel),
                      ("btf", check_btf), ("tracefs", check_tracefs), ("bcc", check_bcc),
                      ("kernel headers", check_headers)):
        try:
            outcome = run()
        except Exception as exc:
            outcome = Check(name, False, f"the check itself failed: {exc!r}",
                            "report this as a bug")
        checks.extend(outcome if isinstance(outcome, list) else [outcome])
    return checks


_warned_about: set[Path] = set()


def _failure(check: Check) -> EnvironmentCheckError:
    return EnvironmentCheckError(f"{check.name}: {check.detail}; fix: {check.fix}")


def require_environment() -> Headers:
    """Fail with the first actionable problem, or return the headers to compile with.

    Capabilities come first: without them nothing else can work, and
    saying so takes no compile.
    """
    for check in (check_privileges(), check_kernel(), check_btf(), check_bcc()):
        if not check.ok:
            raise _failure(check)
    try:
        ensure_tracefs()
    except PermissionError as exc:
        raise _failure(_unreadable_tracefs(exc)) from None
    try:
        headers = find_headers()
    except OSError as exc:  # the cache of merged headers cannot be written
        raise _failure(_unpreparable_headers(exc)) from None
    if not headers.exact and headers.path not in _warned_about:
        _warned_about.add(headers.path)  # once per run, not once per probe
        log.warning("kernel headers: %s", headers.description)
    return headers


# -- compile, attach, detach -------------------------------------------------

_MAX_FDS = 64


def _first_error(stderr: str, source: Path) -> str:
    """The compiler's first error, pointing at our source file rather than bcc's copy."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    line = next((ln for ln in lines if "error:" in ln), lines[-1] if lines else "no output")
    return line.replace("/virtual/main.c", str(source))


def _with_local_includes(source: Path) -> str:
    """The program's text with our own ``#include "x.h"`` lines replaced by the headers.

    bcc rewrites map calls and generates tracepoint argument structs only in
    the main file, so shared kernel code must be part of it.
    """
    return re.sub(r'^#include "([\w.]+)"$', lambda m: (source.parent / m[1]).read_text(),
                  source.read_text(), flags=re.MULTILINE)


def _compile(source: Path, programs: dict[str, str], maps: list[str],
             cflags: list[str], headers: Headers) -> LoadedProgram:
    """Compile and load in a worker process; receive the program and map fds.

    The worker's exit returns every byte of compiler memory to the system,
    which is more than freeing bcc's caches and trimming the heap could.
    """
    request = json.dumps({"source": _with_local_includes(source), "cflags": cflags,
                          "programs": programs, "maps": maps})
    env = dict(os.environ, BCC_KERNEL_SOURCE=str(headers.path))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        result = subprocess.run(
            [sys.executable, "-m", "ebpf_stream._compile_worker", str(theirs.fileno())],
            input=request, capture_output=True, text=True, env=env,
            pass_fds=(theirs.fileno(),), check=False)
        if result.returncode != 0:
            raise ProbeError(f"{source.name} failed to compile or load: "
                             f"{_first_error(result.stderr, source)}")
        message, ancillary, _, _ = ours.recvmsg(1 << 16, socket.CMSG_SPACE(_MAX_FDS * 4))
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    reply = json.loads(message)
    names = [*reply["programs"], *reply["maps"]]
    if len(fds) != len(names):
        for fd in fds:
            os.close(fd)
        raise ProbeError(f"{source.name}: the compile worker returned {len(fds)} fds "
                         f"for {len(names)} objects")
    n_programs = len(reply["programs"])
    program_fds = dict(zip(reply["programs"], fds[:n_programs], strict=True))
    map_fds = dict(zip(reply["maps"], fds[n_programs:], strict=True))
    return LoadedProgram(source.name, program_fds,
                         {name: BpfMap(fd, name) for name, fd in map_fds.items()})


class LoadedProgram:
    """A loaded BPF object: its programs, its maps and its attachments.

    ``close`` detaches every probe and closes every program, map and perf
    fd; it is idempotent and safe to call from any cleanup path.
    """

    def __init__(self, name: str, programs: dict[str, int], maps: dict[str, BpfMap]) -> None:
        self.name = name
        self._programs = programs
        self._maps = maps
        self._events: list[int] = []

    def map(self, name: str) -> BpfMap:
        return self._maps[name]

    def program_fd(self, name: str) -> int:
        return self._programs[name]

    def attach_perf_event(self, program: str, type_: int, config: int,
                          sample_period: int) -> None:
        """Run ``program`` on a perf event on every online CPU."""
        try:
            for cpu in online_cpus():
                self._events.extend(
                    attach_perf_event(self._programs[program], type_, config, sample_period, cpu))
        except OSError as exc:
            raise ProbeError(f"{self.name}: attaching {program} failed ({exc.strerror})") from None

    def attach_tracepoints(self, only: Collection[str] | None = None) -> None:
        """Attach every ``tracepoint__CATEGORY__EVENT`` program (or those named in
        ``only``) to its tracepoint and every ``raw_tracepoint__NAME`` program to
        its raw tracepoint."""
        tracefs = ensure_tracefs()
        for program, fd in self._programs.items():
            if only is not None and program not in only:
                continue
            kind, _, target = program.partition("__")
            category, _, event = target.partition("__")
            try:
                if kind == "tracepoint":
                    self._events.extend(attach_tracepoint(fd, tracefs, category, event))
                elif kind == "raw_tracepoint":
                    self._events.append(attach_raw_tracepoint(fd, target))
            except OSError as exc:
                raise ProbeError(f"{self.name}: attaching to {kind.replace('_', ' ')} "
                                 f"{target.replace('__', ':')} failed ({exc.strerror})") from None

    def program_names(self) -> list[str]:
        return list(self._programs)

    def attach_tracepoint(self, program: str, category: str, event: str, cookie: int) -> None:
        """Attach ``program`` to one more tracepoint, with a cookie that says which."""
        try:
            self._events.extend(attach_tracepoint(
                self._programs[program], ensure_tracefs(), category, event, cookie))
        except OSError as exc:
            raise ProbeError(f"{self.name}: attaching {program} to tracepoint "
                             f"{category}:{event} failed ({exc.strerror})") from None

    def detach(self) -> None:
        """Stop every attached probe; programs and maps stay readable.

        The fds are closed side by side: each tracepoint's detach waits for
        an RCU grace period, and the waits then overlap.
        """
        events, self._events = self._events, []
        if len(events) > 1:
            with ThreadPoolExecutor(min(len(events), 16)) as pool:
                list(pool.map(os.close, events))
        elif events:
            os.close(events[0])

    def program_fds(self) -> list[int]:
        return list(self._programs.values())

    def map_fds(self) -> list[int]:
        return [m.fd for m in self._maps.values()]

    def close(self) -> None:
        self.detach()
        for fd in [*self.program_fds(), *self.map_fds()]:
            os.close(fd)
        self._programs, self._maps = {}, {}


async def load_program(source_name: str, programs: dict[str, str], maps: list[str],
                       cflags: list[str]) -> LoadedProgram:
    """Check the environment, then compile ``kernel/<source_name>`` in a worker process.

    ``programs`` maps function names to bcc program types (``"PERF_EVENT"``...);
    ``tracepoint__`` functions are loaded too.  Shielded: a compile cannot be
    interrupted, and a cancelled caller must still receive the loaded program
    so that it can close it.  Callers check for cancellation once they own it.
    """
    source = KERNEL_SOURCES / source_name
    if not source.exists():
        raise ProbeError(f"BPF source {source} is missing; reinstall ebpf-stream")
    with anyio.CancelScope(shield=True):
        headers = await anyio.to_thread.run_sync(require_environment)
        loaded = await anyio.to_thread.run_sync(_compile, source, programs, maps, cflags, headers)
    return loaded
