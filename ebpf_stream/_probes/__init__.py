"""Probe families: one kernel program each, behind the ``Probe`` boundary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._base.config import EbpfConfig
from .._base.stats import Stats

if TYPE_CHECKING:  # each family loads when the config switches it on: the tracers need numpy
    from .base import Probe


def probes_for(config: EbpfConfig, stats: Stats, *, targets: Sequence[int] | None,
               follow_children: bool) -> list[Probe]:
    """One probe per feature the config switches on, CPU profiling first."""
    probes: list[Probe] = []
    if config.cpu_profiling:
        from .cpu import CpuProbe
        probes.append(CpuProbe(config, stats, targets=targets, follow_children=follow_children))
    if config.syscall_tracing:
        from .syscalls import SyscallProbe
        probes.append(SyscallProbe(config, stats, targets=targets,
                                   follow_children=follow_children))
    if config.network_tracing:
        from .network import NetworkProbe
        probes.append(NetworkProbe(config, stats, targets=targets,
                                   follow_children=follow_children))
    if config.memory_tracing:
        from .memory import MemoryProbe
        probes.append(MemoryProbe(config, stats, targets=targets,
                                  follow_children=follow_children))
    return probes
