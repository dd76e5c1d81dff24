"""One live process per output file: an advisory lock beside each file.

The workers of one service (``uvicorn --workers``, gunicorn) run the same
lifespan with the same settings, so without a guard each would rewrite the
same file every interval with its own samples.  A POSIX record lock
(``lockf``) on ``.NAME.lock`` next to the file says which live process
writes it.  The kernel drops the lock when its process dies, so a restarted
worker can take the name over; a forked child never inherits it; and it
works across containers that share the volume.  The lock is beside the
file, not in the file, because the file exporters replace their file by
renaming a new one over it at every export.

POSIX locks belong to a process, and closing any of its descriptors of the
file drops them, so each process opens a lock file once and counts its
claims on it.  The lock file is never removed: removing it would let two
processes lock two different files under the same name.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import threading
from pathlib import Path

from .._base.errors import ConfigError


@dataclasses.dataclass(slots=True)
class _Held:
    pid: int
    fd: int
    claims: int


_held: dict[str, _Held] = {}  # by the lock file's real path
_guard = threading.Lock()


def lock_path(path: Path) -> Path:
    """The lock file that guards ``path``."""
    return path.with_name(f".{path.name}.lock")


class Claim:
    """This process's claim on writing ``path``; ``release()`` gives it up."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self._key: str | None = key

    def release(self) -> None:
        """Give the claim up; the lock goes when this process's last claim on it does."""
        key, self._key = self._key, None
        if key is None:
            return
        with _guard:
            held = _held.get(key)
            if held is None or held.pid != os.getpid():
                return  # made before a fork: the lock was the parent's, not ours
            held.claims -= 1
            if not held.claims:
                del _held[key]
                os.close(held.fd)


def claim(path: Path) -> Claim | None:
    """Claim ``path`` for this process; None while another live process has it.

    ``path``'s directory must exist and be writable (``writable_path``
    checks both); a lock file this user may not open is a ``ConfigError``.
    """
    lock = lock_path(path)
    key = os.path.realpath(lock)
    pid = os.getpid()
    with _guard:
        held = _held.get(key)
        if held is not None and held.pid == pid:
            held.claims += 1
            return Claim(path, key)
        # An entry of another pid was inherited through fork: its descriptor is
        # left open, since closing it would drop the lock this process takes now.
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: cannot open its lock file {lock}: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return None
            raise ConfigError(f"cannot write {path}: cannot lock {lock}: "
                              f"{exc.strerror or exc}") from None
        # For people and for log lines: who writes the file.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid}\n".encode(), 0)
        _held[key] = _Held(pid, fd, 1)
    return Claim(path, key)


def holder(path: Path) -> int | None:
    """The pid of the process that claimed ``path`` (as its lock file says), if known."""
    with _guard:
        held = _held.get(os.path.realpath(lock_path(path)))
        if held is not None and held.pid == os.getpid():
            return held.pid  # never open it: closing that descriptor would drop our lock
    try:
        text = lock_path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
