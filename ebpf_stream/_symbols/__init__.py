"""Symbolization: raw BPF stack addresses to :class:`Frame` objects.

Kernel addresses resolve against ``/proc/kallsyms`` (:mod:`.kallsyms`).
User addresses resolve against the ELF symbol tables of the files a process
maps, which ``_binaries`` reads (a stripped file also takes the symbols of
its debug file).  :mod:`.symbolizer` ties them together behind caches.
:mod:`.stacks` turns a sample's stack keys into frames through it, naming
Python frames too and splicing them into native ones (:mod:`.merge`).

It uses the standard library only: the profiler lives in its host's
process, and numpy alone would add over 11 MiB to the host's memory.
"""

from .kallsyms import KernelSymbols
from .symbolizer import Symbolizer

__all__ = ["KernelSymbols", "Symbolizer"]
