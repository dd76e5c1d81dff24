"""Compiled BPF objects kept between starts, keyed by everything that shapes them.

Compiling takes seconds of CPU and brings LLVM into memory; loading the
same object again takes the kernel's verifier alone.  The key covers every
input of a compile: the program's text and flags, the programs and maps
asked for, the running kernel (release and build), the headers compiled
against, the compiler (interpreter, bcc, libbcc) and the CPUs the kernel
may bring up.  A change in any of them is a new key, never a stale hit.

An entry is trusted no further than it must be: it must belong to this user
(or root) and be writable by nobody else, its checksum must match, and the
image must decode.  An entry that fails any check, or that the kernel
refuses, is removed and compiled again.  Several processes starting at once
(a pre-fork server's workers) compile a missing object once: the others
wait for it under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import secrets
from collections.abc import Iterator
from pathlib import Path

from .._base.cache_dir import cache_dir, trusted
from .compiler import Compiler
from .headers import Headers, identity
from .object_image import ObjectImage, decode_image
from .syscalls import possible_cpus

log = logging.getLogger("ebpf_stream")

FORMAT = 1  # bump when the image or the way it is loaded changes


def _kernel_build() -> str:
    try:
        return Path("/proc/sys/kernel/version").read_text().strip()
    except OSError:
        return "unknown"


def cache_key(text: str, cflags: list[str], programs: dict[str, str], maps: list[str],
              compiler: Compiler, headers: Headers) -> str:
    """The key of the object that compiling ``text`` with all of this produces."""
    inputs = [FORMAT, text, cflags, programs, maps, platform.release(), _kernel_build(),
              identity(headers), compiler.identity(), possible_cpus()]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


class ObjectCache:
    """Object images on disk, one file per key: a checksum line, then the image."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    @classmethod
    def for_this_machine(cls) -> ObjectCache:
        base = cache_dir()
        return cls(base / "objects" if base is not None else None)

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.json" if self.directory is not None else None

    def get(self, key: str) -> ObjectImage | None:
        """The image under ``key``, if there is one that passes every check."""
        path = self._path(key)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                if not trusted(path, os.fstat(f.fileno())):
                    log.warning("ignoring cached object %s: it is not this user's alone", path)
                    return None
                digest, _, data = f.read().partition(b"\n")
        except OSError:
            return None  # a miss
        try:
            if hashlib.sha256(data).hexdigest().encode() != digest:
                raise ValueError("its checksum does not match")
            return decode_image(data)
        except ValueError as exc:
            log.info("cached object %s is damaged (%s); compiling again", path.name, exc)
            self.discard(key)
            return None

    def put(self, key: str, image: bytes) -> None:
        """Keep ``image`` under ``key``; a cache that cannot be written is no error."""
        path = self._path(key)
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(image).hexdigest().encode() + b"\n" + image)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.info("cannot keep the compiled object in %s: %s", path.parent, exc)

    def discard(self, key: str) -> None:
        path = self._path(key)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    @contextlib.contextmanager
    def compiling(self, key: str) -> Iterator[None]:
        """Hold the key's lock while compiling, so concurrent starts compile once."""
        path = self._path(key)
        if path is None:
            yield
            return
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield  # no lock to be had: compile anyway
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
