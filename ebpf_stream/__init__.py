"""ebpf-stream: continuous profiling with eBPF, streamed into OpenTelemetry.

The public API is re-exported here; everything in underscore modules is
private and may change.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from ._batch import Batch, SlowCall, Stall, StallStack
    from ._config import (
        EbpfConfig,
        Environment,
        OverflowPolicy,
        PythonFrames,
        recommended_sample_rate,
        validate_config,
    )
    from ._errors import (
        ConfigError,
        EbpfStreamError,
        EnvironmentCheckError,
        ExportError,
        ProbeError,
        TargetError,
    )
    from ._events import (
        CpuSample,
        LoopStall,
        LoopTotals,
        MemoryTotals,
        NetworkTotals,
        OomKill,
        SlowSyscall,
        SyscallTotals,
        TcpConnection,
    )
    from ._exporters.base import Exporter
    from ._otlp.converter import EventConverter
    from ._overhead import Overhead
    from ._profile import Frame, FrameKind, Profile, StackSamples
    from ._profiler import EbpfCpuProfiler, Profiler
    from ._stats import Stats

# Each module loads on first use of one of its names: a host that only
# imports the package pays for none of numpy, protobuf or grpc.
__getattr__ = lazy_exports(__name__, {
    "._batch": ("Batch", "SlowCall", "Stall", "StallStack"),
    "._config": ("EbpfConfig", "Environment", "OverflowPolicy", "PythonFrames",
                 "recommended_sample_rate", "validate_config"),
    "._errors": ("ConfigError", "EbpfStreamError", "EnvironmentCheckError", "ExportError",
                 "ProbeError", "TargetError"),
    "._events": ("CpuSample", "LoopStall", "LoopTotals", "MemoryTotals", "NetworkTotals",
                 "OomKill", "SlowSyscall", "SyscallTotals", "TcpConnection"),
    "._exporters.base": ("Exporter",),
    "._otlp.converter": ("EventConverter",),
    "._overhead": ("Overhead",),
    "._profile": ("Frame", "FrameKind", "Profile", "StackSamples"),
    "._profiler": ("EbpfCpuProfiler", "Profiler"),
    "._stats": ("Stats",),
})

__all__ = [
    "Batch",
    "ConfigError",
    "CpuSample",
    "EbpfConfig",
    "EbpfCpuProfiler",
    "EbpfStreamError",
    "Environment",
    "EnvironmentCheckError",
    "EventConverter",
    "ExportError",
    "Exporter",
    "Frame",
    "FrameKind",
    "LoopStall",
    "LoopTotals",
    "MemoryTotals",
    "NetworkTotals",
    "OomKill",
    "OverflowPolicy",
    "Overhead",
    "ProbeError",
    "Profile",
    "Profiler",
    "PythonFrames",
    "SlowCall",
    "SlowSyscall",
    "StackSamples",
    "Stall",
    "StallStack",
    "Stats",
    "SyscallTotals",
    "TargetError",
    "TcpConnection",
    "recommended_sample_rate",
    "validate_config",
]
