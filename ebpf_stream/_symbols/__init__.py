"""Symbolization: raw BPF stack addresses to :class:`Frame` objects.

Kernel addresses resolve against ``/proc/kallsyms`` (:mod:`.kallsyms`).  User
addresses resolve against the ELF symbol tables of the files a process maps
(:mod:`.process`), read by a small ELF64 reader of our own (:mod:`.elf`),
merged per file (:mod:`.symbol_table`); a stripped file also takes the
symbols of its debug file (:mod:`.debug_files`).  :mod:`.symbolizer` ties
them together behind caches.

It uses the standard library only: the profiler lives in its host's
process, and numpy alone would add over 11 MiB to the host's memory.
"""

from .kallsyms import KernelSymbols
from .symbolizer import Symbolizer

__all__ = ["KernelSymbols", "Symbolizer"]
