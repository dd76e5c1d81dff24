"""Which interpreter compiles BPF programs, and with which bcc.

bcc is a system package: Debian's ``python3-bpfcc`` installs it for the
system's Python, not for the virtual environment or the interpreter a
service runs on, and its sources warn on Python 3.12 and later.  The host
therefore never imports bcc.  Compiling happens in a worker process run by
an interpreter that has bcc (the system's, first), whatever the host's
interpreter is; the worker imports only the standard library and bcc.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from .._base.errors import EnvironmentCheckError

SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEM_BCC = Path("/usr/lib/python3/dist-packages/bcc")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_FIX = "apt-get install python3-bpfcc (or set EBPF_STREAM_COMPILE_PYTHON to a Python with bcc)"


class NoCompiler(EnvironmentCheckError):
    """No interpreter with bcc: what is wrong, and the fix, also apart for ``doctor``."""

    def __init__(self, problem: str, fix: str = _FIX) -> None:
        super().__init__(f"bcc: {problem}; fix: {fix}")
        self.problem = problem
        self.fix = fix


@dataclasses.dataclass(frozen=True, slots=True)
class Compiler:
    """The interpreter that runs the compile worker, and the bcc it imports."""

    python: Path
    bcc: Path
    version: str

    def identity(self) -> str:
        """Everything about this compiler that changes what it produces."""
        return "\n".join([str(self.python), str(self.bcc), self.version, _libbcc()])


def _version(bcc: Path) -> str:
    try:
        text = (bcc / "version.py").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"""__version__\s*=\s*['"]([^'"]+)""", text)
    return m.group(1) if m else "unknown"


def _libbcc() -> str:
    """The shared library bcc's Python package loads, by real path, size and time."""
    for directory in _LIB_DIRS:
        path = Path(directory) / "libbcc.so.0"
        try:
            st = path.stat()
        except OSError:
            continue
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return "libbcc.so.0 not found"


@functools.cache
def _bcc_of(python: str) -> Path | None:
    """Where ``python`` imports bcc from, asking it (for an interpreter named by the
    user) once: every probe's load looks for the compiler."""
    code = ("import importlib.util as u; s = u.find_spec('bcc'); "
            "print(s.origin if s and s.origin else '')")
    try:
        out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out).parent if out else None


def find_compiler() -> Compiler:
    """The compiler to use: ``EBPF_STREAM_COMPILE_PYTHON`` if set, else the system's
    Python with Debian's bcc, else this interpreter if it has bcc.

    Raises ``NoCompiler`` naming the fix when there is none.
    """
    explicit = os.environ.get("EBPF_STREAM_COMPILE_PYTHON")
    if explicit:
        bcc = _bcc_of(explicit)
        if bcc is None:
            raise NoCompiler(f"EBPF_STREAM_COMPILE_PYTHON={explicit} cannot import bcc")
        return Compiler(Path(explicit), bcc, _version(bcc))
    if SYSTEM_PYTHON.exists() and (SYSTEM_BCC / "__init__.py").exists():
        return Compiler(SYSTEM_PYTHON, SYSTEM_BCC, _version(SYSTEM_BCC))
    spec = importlib.util.find_spec("bcc")  # located, never imported here
    if spec is not None and spec.origin is not None:
        bcc = Path(spec.origin).parent
        return Compiler(Path(sys.executable), bcc, _version(bcc))
    raise NoCompiler(f"not found for {SYSTEM_PYTHON} or {sys.executable}")


def describe(compiler: Compiler) -> str:
    """The compiler in one line, with the interpreter's version as it reports it.

    Runs the interpreter and imports bcc, so a broken install shows here:
    ``ebpf-stream doctor`` uses it, a start does not.
    """
    code = "import sys, bcc; print(sys.version.split()[0])"
    result = subprocess.run([str(compiler.python), "-I", "-c", code], capture_output=True,
                            text=True, timeout=60, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise NoCompiler(f"{compiler.python} cannot import bcc ({last})")
    return (f"bcc {compiler.version} at {compiler.bcc}, compiled by {compiler.python} "
            f"(Python {result.stdout.strip()})")
