"""Where ebpf-stream keeps what it derives from this machine: merged kernel
headers and compiled BPF objects.

A service may run with a read-only root filesystem, as another user, or
with no home directory, so the first usable place wins, and none at all is
a working answer (everything is then derived again at each start).  A place
is usable only if this user owns it and nobody else may write to it: what
is kept there is loaded into the kernel.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

SYSTEM_CACHE = Path("/var/cache/ebpf-stream")


def _candidates() -> list[Path]:
    explicit = os.environ.get("EBPF_STREAM_CACHE")
    if explicit:
        return [Path(explicit)]
    places = [SYSTEM_CACHE]
    xdg = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else "")
    if xdg:
        places.append(Path(xdg) / "ebpf-stream")
    places.append(Path(tempfile.gettempdir()) / f"ebpf-stream-{os.geteuid()}")
    return places


def trusted(path: Path, st: os.stat_result | None = None) -> bool:
    """Whether ``path`` belongs to this user (or root) and is writable by no one else."""
    try:
        st = st or path.lstat()
    except OSError:
        return False
    return (st.st_uid in (os.geteuid(), 0) and not stat.S_ISLNK(st.st_mode)
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _usable(path: Path) -> bool:
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError:
        return False
    return trusted(path) and os.access(path, os.W_OK | os.X_OK, effective_ids=True)


def cache_dir() -> Path | None:
    """The first usable cache directory, made if missing; None if there is none.

    ``EBPF_STREAM_CACHE`` names the only candidate when set.  Otherwise:
    ``/var/cache/ebpf-stream``, then ``$XDG_CACHE_HOME/ebpf-stream`` (or
    ``~/.cache/ebpf-stream``), then a per-user directory under the
    temporary directory.
    """
    return next((p for p in _candidates() if _usable(p)), None)
