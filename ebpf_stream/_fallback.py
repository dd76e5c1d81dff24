"""The fallback: sampling the host's own process from a thread when BPF is refused."""

from __future__ import annotations

import logging

from ._base.config import EbpfConfig
from ._base.errors import EbpfStreamError
from ._base.overhead import CpuMeter
from ._base.stats import Stats
from ._probes.base import Probe

log = logging.getLogger("ebpf_stream")


async def open_fallback(config: EbpfConfig, refusal: EbpfStreamError, stats: Stats,
                        meter: CpuMeter, *, watch_loop: bool) -> Probe:
    """The in-process sampler, started, after one warning naming the refusal.

    One line, with the refusal and its fix: the host keeps running, so this
    is all it shows.  ``watch_loop``: the run was entered on the host's
    event loop, whose stalls count.
    """
    from ._probes.fallback import FallbackProbe

    tracers = [name for name, on in (("syscall", config.syscall_tracing),
                                     ("network", config.network_tracing),
                                     ("memory", config.memory_tracing)) if on]
    off = f"; {', '.join(tracers)} tracing needs BPF and is off" if tracers else ""
    if config.off_cpu:
        off += "; off-CPU profiling needs BPF and is off"
    log.warning("ebpf-stream: profiling in fallback mode (in-process sampling, "
                "Python frames only%s): %s", off, refusal)
    probe = FallbackProbe(config, stats, meter, watch_loop=watch_loop)
    await probe.open()
    probe.start()
    return probe
