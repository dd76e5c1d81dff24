"""Loading BPF programs: from the compile cache, or compiled; then attach and detach.

A program's object comes from the cache when an earlier start compiled it
(see ``_compile_cache``), loaded with plain ``bpf(2)`` calls.  Otherwise
it is compiled in a worker process run by the interpreter that has bcc
(see ``_compiler``): the worker hands back the program and map fds and a
description of the object, which the cache keeps.  The worker's exit
returns every byte of compiler memory to the system, and bcc never enters
the host's process.  Both paths run in a worker thread: the verifier and
the compiler take up to seconds, and the caller's event loop keeps ticking.
"""

from __future__ import annotations

import array
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio.to_thread

from .._base.errors import ProbeError
from .compile_cache import ObjectCache, cache_key
from .environment import Toolchain, ensure_tracefs, require_environment
from .object_image import ImageLoader, ObjectImage
from .syscalls import (
    BpfMap,
    attach_perf_event,
    attach_raw_tracepoint,
    attach_tracepoint,
    online_cpus,
)

log = logging.getLogger("ebpf_stream")

KERNEL_SOURCES = Path(__file__).parent.parent / "_kernel"  # a link to kernel/ in the source tree
_WORKER = Path(__file__).with_name("compile_worker.py")
_MAX_FDS = 64


def _first_error(stderr: str, source: Path) -> str:
    """The compiler's first error, pointing at our source file rather than bcc's copy."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    line = next((ln for ln in lines if "error:" in ln), lines[-1] if lines else "no output")
    return line.replace("/virtual/main.c", str(source))


def _with_local_includes(source: Path) -> str:
    """The program's text with our own ``#include "x.h"`` lines replaced by the headers.

    bcc rewrites map calls and generates tracepoint argument structs only in
    the main file, so shared kernel code must be part of it.  Headers may
    include headers.
    """
    return re.sub(r'^#include "([\w.]+)"$',
                  lambda m: _with_local_includes(source.parent / m[1]),
                  source.read_text(), flags=re.MULTILINE)


def _receive_fds(sock: socket.socket, source: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The worker's program and map fds, by name."""
    message, ancillary, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(_MAX_FDS * 4))
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
    return (dict(zip(reply["programs"], fds[:n_programs], strict=True)),
            dict(zip(reply["maps"], fds[n_programs:], strict=True)))


def _compile(source: Path, text: str, programs: dict[str, str], maps: list[str],
             cflags: list[str], toolchain: Toolchain) -> tuple[LoadedProgram, bytes]:
    """Compile and load in a worker process; receive the fds and the object's image.

    The image is empty when the worker could not describe the object: it
    then loads as always, and only the cache goes without it.
    """
    request = json.dumps({"source": text, "cflags": cflags, "programs": programs,
                          "maps": maps})
    env = dict(os.environ, BCC_KERNEL_SOURCE=str(toolchain.headers.path))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        # -I: the host's PYTHONPATH and user site, perhaps another Python's, stay out.
        result = subprocess.run(
            [str(toolchain.compiler.python), "-I", str(_WORKER), str(theirs.fileno())],
            input=request.encode(), capture_output=True, env=env,
            pass_fds=(theirs.fileno(),), check=False)
        if result.returncode != 0:
            raise ProbeError(f"{source.name} failed to compile or load: "
                             f"{_first_error(result.stderr.decode(errors='replace'), source)}")
        program_fds, map_fds = _receive_fds(ours, source)
    loaded = LoadedProgram(source.name, program_fds,
                           {name: BpfMap(fd, name) for name, fd in map_fds.items()})
    image = result.stdout if result.stdout.strip() not in (b"", b"null") else b""
    return loaded, image


def _from_image(source: Path, image: ObjectImage, programs: dict[str, str], maps: list[str],
                later: Collection[str], refused: Callable[[], None]) -> LoadedProgram:
    """Load an image: every program but those in ``later``, for now."""
    missing = [n for n in programs if n not in image.programs] + [
        n for n in maps if n not in image.maps]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    loader = ImageLoader(image)
    fds: dict[str, int] = {}
    try:
        for name in loader.program_names():
            if name not in later:
                fds[name] = loader.load(name)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        loader.close()
        raise
    taken = {name: BpfMap(loader.map_fd(name), name) for name in maps}
    if len(fds) == len(loader.program_names()):
        loader.close()
        return LoadedProgram(source.name, fds, taken)
    return LoadedProgram(source.name, fds, taken, pending=loader, refused=refused)


def _load(source: Path, programs: dict[str, str], maps: list[str], cflags: list[str],
          later: Collection[str] = ()) -> LoadedProgram:
    """Check the environment, then load from the cache or compile (and keep the result)."""
    toolchain = require_environment()
    text = _with_local_includes(source)
    cache = ObjectCache.for_this_machine()
    key = cache_key(text, cflags, programs, maps, toolchain.compiler, toolchain.headers)
    loaded = _cached(cache, key, source, programs, maps, later)
    if loaded is None:
        with cache.compiling(key):
            # Another process may have compiled it while this one waited.
            loaded = _cached(cache, key, source, programs, maps, later)
            if loaded is None:
                started = time.monotonic()
                loaded, image = _compile(source, text, programs, maps, cflags, toolchain)
                log.info("compiled %s in %.1f s", source.name, time.monotonic() - started)
                if image:
                    cache.put(key, image)
    loaded.key = key
    return loaded


def _cached(cache: ObjectCache, key: str, source: Path, programs: dict[str, str],
            maps: list[str], later: Collection[str]) -> LoadedProgram | None:
    """The cached object, loaded; None on a miss or when it does not load (then it
    is removed, to be compiled again)."""
    image = cache.get(key)
    if image is None:
        return None
    try:
        loaded = _from_image(source, image, programs, maps, later, lambda: cache.discard(key))
    except (OSError, ValueError) as exc:
        log.info("the cached object of %s did not load (%s); compiling it again",
                 source.name, exc)
        cache.discard(key)
        return None
    log.info("loaded %s from the compile cache", source.name)
    return loaded


class LoadedProgram:
    """A loaded BPF object: its programs, its maps and its attachments.

    ``close`` detaches every probe and closes every program, map and perf
    fd; it is idempotent and safe to call from any cleanup path.
    """

    def __init__(self, name: str, programs: dict[str, int], maps: dict[str, BpfMap], *,
                 pending: ImageLoader | None = None,
                 refused: Callable[[], None] | None = None) -> None:
        self.name = name
        self._programs = programs
        self._maps = maps
        self._events: list[int] = []
        self._pending = pending  # the image of programs not loaded yet
        self._refused = refused  # called when one of them fails to load
        self.key = ""  # the object's compile-cache key: what it was built from

    def load_rest(self) -> None:
        """Load the programs not loaded yet: an object from the cache loads the
        programs its caller needs first, and the rest when the caller says.

        Takes the verifier's time: call it from a worker thread.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            for name in pending.program_names():
                if name not in self._programs:
                    self._programs[name] = pending.load(name)
        except OSError as exc:
            if self._refused is not None:
                self._refused()  # the next start compiles it afresh
            raise ProbeError(f"{self.name}: the cached object did not load "
                             f"({exc.strerror or exc})") from None
        finally:
            pending.close()

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
        ``only``) to its tracepoint, and every ``raw_tracepoint__NAME`` and
        ``tp_btf__NAME`` program to its raw tracepoint."""
        tracefs = ensure_tracefs()
        for program in self.program_names():
            if only is not None and program not in only:
                continue
            fd = self._programs[program]  # loaded: see load_rest
            kind, _, target = program.partition("__")
            category, _, event = target.partition("__")
            try:
                if kind == "tracepoint":
                    self._events.extend(attach_tracepoint(fd, tracefs, category, event))
                elif kind == "raw_tracepoint":
                    self._events.append(attach_raw_tracepoint(fd, target))
                elif kind == "tp_btf":
                    self._events.append(attach_raw_tracepoint(fd, None))
            except OSError as exc:
                raise ProbeError(f"{self.name}: attaching to {kind.replace('_', ' ')} "
                                 f"{target.replace('__', ':')} failed ({exc.strerror})") from None

    def program_names(self) -> list[str]:
        """Every program of the object, loaded or not yet."""
        if self._pending is None:
            return list(self._programs)
        return self._pending.program_names()

    def attach_tracepoint(self, program: str, category: str, event: str,
                          cookie: int | None = None) -> None:
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
        if self._pending is not None:
            self._pending.close()
            self._pending = None
        self.detach()
        for fd in [*self.program_fds(), *self.map_fds()]:
            os.close(fd)
        self._programs, self._maps = {}, {}


async def load_program(source_name: str, programs: dict[str, str], maps: list[str],
                       cflags: list[str], later: Collection[str] = ()) -> LoadedProgram:
    """Check the environment, then load ``kernel/<source_name>``: from the cache when
    it holds the object, else compiled in a worker process.

    ``programs`` maps function names to bcc program types (``"PERF_EVENT"``...);
    ``tracepoint__`` functions are loaded too.  An object from the cache
    returns with the programs in ``later`` not loaded yet: the caller loads
    them with ``LoadedProgram.load_rest``, meanwhile using the others.  Shielded: a load cannot be
    interrupted, and a cancelled caller must still receive the loaded program
    so that it can close it.  Callers check for cancellation once they own it.
    """
    source = KERNEL_SOURCES / source_name
    if not source.exists():
        raise ProbeError(f"BPF source {source} is missing; reinstall ebpf-stream")
    with anyio.CancelScope(shield=True):
        loaded = await anyio.to_thread.run_sync(_load, source, programs, maps, cflags, later)
    return loaded
