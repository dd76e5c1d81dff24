"""ebpf-stream: continuous profiling with eBPF, streamed into OpenTelemetry.

The public API is re-exported here; everything in underscore modules is
private and may change.
"""

from typing import TYPE_CHECKING

from ._base.lazy import lazy_exports

if TYPE_CHECKING:
    from ._base.config import (
        EbpfConfig,
        Environment,
        OverflowPolicy,
        PythonFrames,
        recommended_sample_rate,
        validate_config,
    )
    from ._base.errors import (
        ConfigError,
        EbpfStreamError,
        EnvironmentCheckError,
        ExportError,
        ProbeError,
        TargetError,
    )
    from ._base.overhead import Overhead
    from ._base.stats import Stats
    from ._convert.converter import EventConverter
    from ._model.batch import Batch, SlowCall, Stall, StallStack
    from ._model.events import (
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
    from ._model.profile import Frame, FrameKind, Profile, RequestContext, StackSamples
    from ._outputs.base import Exporter
    from ._profiler import Profiler
    from ._sync import EbpfCpuProfiler

# Each module loads on first use of one of its names: a host that only
# imports the package pays for none of numpy, protobuf or grpc.
__getattr__ = lazy_exports(__name__, {
    "._model.batch": ("Batch", "SlowCall", "Stall", "StallStack"),
    "._base.config": ("EbpfConfig", "Environment", "OverflowPolicy", "PythonFrames",
                 "recommended_sample_rate", "validate_config"),
    "._base.errors": ("ConfigError", "EbpfStreamError", "EnvironmentCheckError", "ExportError",
                 "ProbeError", "TargetError"),
    "._model.events": ("CpuSample", "LoopStall", "LoopTotals", "MemoryTotals", "NetworkTotals",
                 "OomKill", "SlowSyscall", "SyscallTotals", "TcpConnection"),
    "._outputs.base": ("Exporter",),
    "._convert.converter": ("EventConverter",),
    "._base.overhead": ("Overhead",),
    "._model.profile": ("Frame", "FrameKind", "Profile", "RequestContext", "StackSamples"),
    "._profiler": ("Profiler",),
    "._sync": ("EbpfCpuProfiler",),
    "._base.stats": ("Stats",),
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
    "RequestContext",
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
