"""Whether this machine, as this process sees it, can load BPF programs.

Each check says what it found and, when it fails, the fix.  The checks
run as the calling process, with its capabilities, so ``ebpf-stream
doctor`` run the way a service runs shows what the service will meet.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import platform
import re
from pathlib import Path

from .._base.cache_dir import cache_dir
from .._base.errors import EnvironmentCheckError
from .compiler import Compiler, NoCompiler, describe, find_compiler
from .headers import Headers, find_headers

log = logging.getLogger("ebpf_stream")

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


def check_architecture() -> Check:
    """BPF mode's system call numbers (``_bpf``) and the ring reader's memory
    ordering (``_ringbuf``) are x86-64's; elsewhere it would fail obscurely."""
    machine = platform.machine() or "an unknown machine"
    ok = machine == "x86_64"
    return Check("architecture", ok, machine + ("" if ok else ": BPF mode runs on x86-64 only"),
                 "" if ok else "run on an x86-64 machine, or let the profiler fall back "
                 "(on_unavailable='fallback', the default)")


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


def check_bcc(run: bool = False) -> Check:
    """Which Python compiles and which bcc it imports; with ``run``, proven by importing it."""
    try:
        compiler = find_compiler()
        detail = describe(compiler) if run else (
            f"bcc {compiler.version} at {compiler.bcc}, compiled by {compiler.python}")
    except NoCompiler as exc:
        return Check("bcc", False, exc.problem, exc.fix)
    return Check("bcc", True, detail)


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


def check_cache() -> Check:
    """Where compiled objects are kept; none usable is no failure, only slower starts."""
    directory = cache_dir()
    if directory is None:
        return Check("compile cache", True, "none usable: every start compiles",
                     "set EBPF_STREAM_CACHE to a directory this user owns")
    objects = len(list((directory / "objects").glob("*.json")))
    return Check("compile cache", True, f"{directory} ({objects} compiled objects)")


def environment_checks() -> list[Check]:
    """Every check ``ebpf-stream doctor`` prints, in order, as this process sees them.

    A check that breaks on something unforeseen fails with what broke it, so
    the report is always whole.
    """
    checks: list[Check] = []
    for name, run in (("architecture", check_architecture),
                      ("capabilities", check_capabilities), ("kernel", check_kernel),
                      ("btf", check_btf), ("tracefs", check_tracefs),
                      ("bcc", lambda: check_bcc(run=True)), ("kernel headers", check_headers),
                      ("compile cache", check_cache)):
        try:
            outcome = run()
        except Exception as exc:
            outcome = Check(name, False, f"the check itself failed: {exc!r}",
                            "report this as a bug")
        checks.extend(outcome if isinstance(outcome, list) else [outcome])
    return checks


_told_about: set[Path] = set()


def _failure(check: Check) -> EnvironmentCheckError:
    return EnvironmentCheckError(f"{check.name}: {check.detail}; fix: {check.fix}")


@dataclasses.dataclass(frozen=True, slots=True)
class Toolchain:
    """What compiling needs: the compiler and the kernel headers."""

    compiler: Compiler
    headers: Headers


def require_environment() -> Toolchain:
    """Fail with the first actionable problem, or return what to compile with.

    The machine and the capabilities come first: without them nothing else
    can work, and saying so takes no compile.
    """
    for check in (check_architecture(), check_privileges(), check_kernel(), check_btf()):
        if not check.ok:
            raise _failure(check)
    compiler = find_compiler()
    try:
        ensure_tracefs()
    except PermissionError as exc:
        raise _failure(_unreadable_tracefs(exc)) from None
    try:
        headers = find_headers()
    except OSError as exc:  # the cache of merged headers cannot be written
        raise _failure(_unpreparable_headers(exc)) from None
    if not headers.exact and headers.path not in _told_about:
        # Said once, and not as a warning: on a custom kernel this is how
        # every start goes, and ``doctor`` shows it.
        _told_about.add(headers.path)
        log.info("kernel headers: %s", headers.description)
    return Toolchain(compiler, headers)
