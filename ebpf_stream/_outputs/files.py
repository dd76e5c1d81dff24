"""Exporters that keep one file up to date with everything collected so far.

Each export merges the batch into what the file shows (a cumulative profile,
or for speedscope every process's samples in time order) and rewrites the whole
file atomically (a temporary file in the same directory, then a rename), so
a reader never sees a half-written file and, if the process dies, the file
holds every interval completed before.  Merging, rendering and writing run in
a worker thread so the caller's event loop keeps collecting meanwhile.

A path that cannot be written is refused when the exporter is made: the
first export may come minutes after a service started, too late to learn
that its output directory is missing.

The flame-graph formats (folded, speedscope, SVG) take ``by_route``: each
stack then stands on its request's endpoint (``GET /items/{id}``, or
``[no route]``), so the graph reads per endpoint.  They hold one kind of
time, ``kind``: on-CPU samples (the default), waits off the CPU, or both
(``wall``), in microseconds for the last two (see ``Profile.of_kind``).
"""

from __future__ import annotations

import abc
import importlib
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import anyio

from .._base.errors import ConfigError, ExportError
from .._base.overhead import run_sync

if TYPE_CHECKING:
    from .._model.batch import Batch
    from .._model.profile import Profile
    from .speedscope import SpeedscopeTimeline

# The model and each renderer load when a file is first written, in a worker
# thread: a service making its exporters at startup loads none of them.


def cannot_write(path: Path, exc: OSError) -> ExportError:
    """The one-line error every file exporter gives when the OS refuses a write."""
    return ExportError(f"cannot write {path}: {exc.strerror or exc}")


def writable_path(path: str | os.PathLike[str]) -> Path:
    """``path``, once its directory exists and this process may create files in it.

    Raises ``ConfigError`` otherwise, naming the path and what is wrong with it.
    """
    path = Path(path)
    directory = path.parent
    try:
        if path.is_dir():
            raise ConfigError(f"cannot write {path}: it is a directory")
        if not directory.is_dir():
            problem = (f"{directory} is not a directory" if directory.exists()
                       else f"directory {directory} does not exist")
            raise ConfigError(f"cannot write {path}: {problem}")
    except OSError as exc:  # a directory on the way is not searchable
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    # Replacing the file takes a new file in the directory, whoever owns the old one.
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        raise ConfigError(f"cannot write {path}: directory {directory} is not writable "
                          f"by uid {os.geteuid()}")
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step; raise ExportError if the OS refuses."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 honours the umask, unlike a private temp file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                # Without this a crash of the machine could leave the renamed file empty.
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise cannot_write(path, exc) from exc


class FileExporter(abc.ABC):
    """Base of the file exporters: subclasses say what they keep of each batch and
    how that renders."""

    renderer: ClassVar[str]  # the module that renders the file, loaded by ``prepare``

    # The kind of time a flame-graph format holds (a ``ProfileKind`` value); the
    # others hold every kind.
    kind: str | None = None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = writable_path(path)
        # Serializes exports: a render must not read the state mid-merge.
        self._lock = anyio.Lock()

    @abc.abstractmethod
    def _add(self, profile: Profile) -> None:
        """Merge one batch's profile into what the file shows."""

    @abc.abstractmethod
    def _content(self) -> bytes:
        """The file's whole content for every profile added so far."""

    @abc.abstractmethod
    def _forget(self) -> None:
        """Drop every profile added: the file holds them, and a next run writes its own."""

    async def export(self, batch: Batch) -> None:
        async with self._lock:
            await run_sync(self._merge_and_write, batch.profile)

    async def aclose(self) -> None:
        async with self._lock:
            await run_sync(self._merge_and_write, None)
            self._forget()

    def prepare(self) -> None:
        for module in (".memory", self.renderer):  # the model comes with them
            importlib.import_module(module, __package__)

    def _merge_and_write(self, profile: Profile | None) -> None:
        if profile is not None:
            if self.kind is not None:
                from .._model.profile import ProfileKind

                profile = profile.of_kind(ProfileKind(self.kind))
            self._add(profile)
        write_atomically(self.path, self._content())


class CumulativeFileExporter(FileExporter):
    """A file rendered from the merge of every batch, without timestamps, so its
    memory is bounded by the number of distinct stacks."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._profile: Profile | None = None

    @abc.abstractmethod
    def render(self, profile: Profile) -> bytes:
        """The file's whole content for ``profile``."""

    def _add(self, profile: Profile) -> None:
        from .memory import accumulate

        self._profile = accumulate(self._profile, profile, keep_timestamps=False)

    def _forget(self) -> None:
        self._profile = None

    def _content(self) -> bytes:
        if self._profile is None:
            # Closed before any batch: still leave a valid, empty file behind.
            now = time.time_ns()
            from .._model.profile import Profile

            self._profile = Profile(period_ns=0, start_ns=now, end_ns=now)
        return self.render(self._profile)


class FoldedFileExporter(CumulativeFileExporter):
    """Writes folded stacks, one ``process;root;...;leaf count`` line per stack."""

    renderer = ".folded"

    def __init__(self, path: str | os.PathLike[str], *, by_route: bool = False,
                 kind: str = "on-cpu") -> None:
        super().__init__(path)
        self.by_route, self.kind = by_route, kind

    def render(self, profile: Profile) -> bytes:
        from .folded import render_folded

        return render_folded(profile, by_route=self.by_route).encode("utf-8")


class PprofFileExporter(CumulativeFileExporter):
    """Writes a gzip-compressed pprof profile."""

    renderer = ".pprof"

    def render(self, profile: Profile) -> bytes:
        # Imported here: the generated protobuf module loads only for a pprof output.
        from .pprof import render_pprof

        return render_pprof(profile)


class SpeedscopeFileExporter(FileExporter):
    """Writes a speedscope JSON file, one profile per process, samples in time order.

    It keeps one entry per change of stack in each process, so its memory and
    the file grow with the length of the recording.
    """

    renderer = ".speedscope"

    def __init__(self, path: str | os.PathLike[str], *, by_route: bool = False,
                 kind: str = "on-cpu") -> None:
        super().__init__(path)
        self.by_route, self.kind = by_route, kind
        self._timeline: SpeedscopeTimeline | None = None

    def _timeline_so_far(self) -> SpeedscopeTimeline:
        """The timeline of this run, begun with its first batch (or an empty one)."""
        if self._timeline is None:
            from .speedscope import SpeedscopeTimeline

            self._timeline = SpeedscopeTimeline(by_route=self.by_route)
        return self._timeline

    def _add(self, profile: Profile) -> None:
        self._timeline_so_far().add(profile)

    def _content(self) -> bytes:
        return self._timeline_so_far().render().encode("utf-8")

    def _forget(self) -> None:
        self._timeline = None


class FlamegraphSvgExporter(CumulativeFileExporter):
    """Writes a self-contained flame graph SVG."""

    renderer = ".flamegraph"

    def __init__(self, path: str | os.PathLike[str], title: str | None = None, *,
                 by_route: bool = False, kind: str = "on-cpu") -> None:
        super().__init__(path)
        self.title = title  # None: the renderer's own
        self.by_route, self.kind = by_route, kind

    def render(self, profile: Profile) -> bytes:
        from .flamegraph import DEFAULT_TITLE, render_flamegraph_svg

        title = DEFAULT_TITLE if self.title is None else self.title
        return render_flamegraph_svg(profile, title=title, by_route=self.by_route,
                                     unit="samples" if self.kind == "on-cpu" else "µs"
                                     ).encode("utf-8")
