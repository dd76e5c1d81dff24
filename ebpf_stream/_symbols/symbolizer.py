"""The symbolizer: raw stack addresses of kernel and user stacks to frames.

Everything expensive is cached, and every cache is bounded: ELF images by
build id (libc is parsed once for all processes), process maps per pid, and
finished frames per (ELF, address).  A Symbolizer is not thread-safe: one
collector thread owns it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .._base.lru import Lru
from .._binaries.debug_files import Origin
from .._binaries.elf import ElfHeaders, Reader
from .._binaries.process import UNKNOWN, Mapping, Process, open_mapped_file, roots
from .._binaries.symbol_table import ElfImage, ImageKey
from .._model.profile import Frame, FrameKind, ProcessInfo
from .kallsyms import KernelSymbols

__all__ = ["Symbolizer"]

_VDSO = "[vdso]"
# The symbol tables of cached ELF images, in bytes (an image may count twice: by
# file and by build id); mappings in use keep theirs alive regardless.  A
# compiler's table alone is several megabytes: a node that runs builds would
# otherwise keep every one it has seen.
_MAX_IMAGE_BYTES = 32 << 20
# Frames are cheap to name again (a bisection and a slice) and about 350 bytes each
# to keep, with their keys: 16,384 of them take 5.5 MB, where 65,536 took 22.
_MAX_FRAMES = 16384


class Symbolizer:
    """Turns kernel and user stacks into frames, caching across samples and processes."""

    def __init__(self, *, max_processes: int = 4096,
                 max_cached_frames: int = _MAX_FRAMES) -> None:
        self._kernel = KernelSymbols()
        self._processes: Lru[int, Process] = Lru(max_processes)
        self._frames: Lru[tuple[ImageKey | None, str, int, bool], Frame] = Lru(
            max_cached_frames)
        self._images: Lru[ImageKey, ElfImage] = Lru(_MAX_IMAGE_BYTES,
                                                    lambda image: image.symbols.nbytes)
        self.elf_parses = 0  # ELF symbol tables parsed, for stats: the rest were cache hits
        self._gone: set[int] = set()  # cached processes found exited at the last look

    def load_kernel_symbols(self) -> None:
        """Parse kallsyms ahead of the first kernel stack.

        It takes thousands of reads, each of which waits for the GIL when the
        process has a busy Python thread: callers run it in a worker thread.
        """
        self._kernel.load()

    def kernel_frames(self, addresses: Sequence[int]) -> tuple[Frame, ...]:
        """Frames for a kernel stack, leaf first, in the order given (kallsyms is
        parsed by the first call if ``load_kernel_symbols`` was not)."""
        return self._kernel.resolve(addresses)

    def user_frames(self, pid: int, addresses: Sequence[int]) -> tuple[Frame, ...]:
        """Frames for a user stack of ``pid``, leaf first, in the order given.

        A process that has exited still resolves through the maps cached
        while it was alive, until :meth:`forget`.
        """
        if not addresses:
            return ()
        process = self._process(pid)
        frames = []
        leaf = True
        for address in addresses:
            frames.append(self._user_frame(pid, process, address, leaf))
            leaf = False
        return tuple(frames)

    def process_info(self, pid: int) -> ProcessInfo | None:
        """Name, executable and command line as first read, or None if never seen alive."""
        process = self._process(pid)
        return process.info if process else None

    def forget(self, pid: int) -> None:
        """Drop what is cached for an exited process (its ELF images stay shared)."""
        self._processes.pop(pid)

    def forget_exited(self) -> None:
        """Drop the processes found exited at this look and at the one before.

        Not at the first: the samples a process took just before it exited
        may be read after, and still need its maps.  Without this, a machine
        that runs processes all day would fill the cache with the maps of the
        dead, up to its bound, thousands of processes.
        """
        gone = {pid for pid in self._processes if not os.path.exists(f"/proc/{pid}")}
        for pid in gone & self._gone:
            self._processes.pop(pid)
        self._gone = gone - self._gone

    def _process(self, pid: int) -> Process | None:
        process = self._processes.get(pid)
        if process is None:
            try:
                process = Process(pid)
            except OSError:  # gone, or a kernel thread's pid raced
                return None
            self._processes.put(pid, process)
        return process

    def _user_frame(self, pid: int, process: Process | None, address: int,
                    leaf: bool) -> Frame:
        # Every frame but the leaf holds a return address, which may already
        # lie past the end of the calling function: looked up one byte back.
        lookup = address if leaf else address - 1
        mapping = process.find(lookup) if process else None
        if mapping is None and process and process.refresh(pid):
            mapping = process.find(lookup)
        if mapping is None:
            return Frame(f"{UNKNOWN}+0x{address:x}", UNKNOWN, FrameKind.NATIVE, address)
        if not mapping.loaded:
            self._load(pid, mapping)
        image = mapping.image
        vaddr = address - mapping.bias
        key = (image.key if image else None, mapping.module, vaddr, leaf)
        frame = self._frames.get(key)
        if frame is None:
            name = image.symbols.name(vaddr if leaf else vaddr - 1) if image else None
            frame = Frame(name or f"{mapping.basename}+0x{vaddr:x}", mapping.module,
                          FrameKind.NATIVE, vaddr)
            self._frames.put(key, frame)
        return frame

    def _load(self, pid: int, mapping: Mapping) -> None:
        mapping.loaded = True
        try:
            image = (self._vdso_image(pid, mapping) if mapping.module == _VDSO
                     else self._file_image(pid, mapping))
        except (OSError, ValueError):  # unreadable or not ELF64: module+offset names
            return
        if image is not None:
            mapping.attach(image)

    def _file_image(self, pid: int, mapping: Mapping) -> ElfImage | None:
        fd = open_mapped_file(pid, mapping)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            # Checked before the build id so that a file already seen costs one fstat.
            file_key = ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            image = self._images.get(file_key)
            if image is None:
                image = self._image(Reader.of_file(fd, st.st_size), file_key,
                                    Origin(roots(pid), mapping.module))
                self._images.put(file_key, image)
            return image
        finally:
            os.close(fd)

    def _vdso_image(self, pid: int, mapping: Mapping) -> ElfImage:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            data = os.pread(mem.fileno(), mapping.end - mapping.start, mapping.start)
        return self._image(Reader.of_bytes(data), ("vdso", hash(data)),
                           Origin(roots(pid), None))

    def _image(self, reader: Reader, fallback_key: ImageKey, origin: Origin) -> ElfImage:
        """The image of an ELF file, parsed only if its build id is new."""
        headers = ElfHeaders(reader)
        key = ("build-id", headers.build_id) if headers.build_id else fallback_key
        image = self._images.get(key)
        # A stripped copy without debug file may have been seen first; the full one replaces it.
        if image is None or (headers.has_symtab and not image.has_symtab):
            image = ElfImage(key, reader, headers, origin)
            self.elf_parses += 1
            self._images.put(key, image)
        return image
