"""Probe families: one kernel program each, behind the ``Probe`` boundary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._config import EbpfConfig
from .._stats import Stats

if TYPE_CHECKING:  # the families, and numpy with them, load when probes are made
    from .base import Probe


def probes_for(config: EbpfConfig, stats: Stats, *, targets: Sequence[int] | None,
               follow_children: bool) -> list[Probe]:
    """One probe per feature the config switches on, CPU profiling first."""
    from .cpu import CpuProbe
    from .memory import MemoryProbe
    from .network import NetworkProbe
    from .syscalls import SyscallProbe

    families: list[tuple[bool, type[Probe]]] = [
        (config.cpu_profiling, CpuProbe),
        (config.syscall_tracing, SyscallProbe),
        (config.network_tracing, NetworkProbe),
        (config.memory_tracing, MemoryProbe),
    ]
    return [family(config, stats, targets=targets, follow_children=follow_children)  # type: ignore[call-arg]
            for enabled, family in families if enabled]
