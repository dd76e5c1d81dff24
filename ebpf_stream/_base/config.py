"""Configuration: an immutable ``EbpfConfig``, per-environment presets and validation.

Configs are values: every builder returns a new config, so one preset can be
shared and specialised without surprises.  Validation names the field, the
bad value and the allowed range, because a config error is usually found by
someone reading a deployment manifest, not the code.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterable
from typing import Self, TypeVar

import msgspec

from .errors import ConfigError


class Environment(enum.StrEnum):
    PRODUCTION = "production"
    STAGING = "staging"
    DEVELOPMENT = "development"
    DEBUG = "debug"

    @classmethod
    def parse(cls, value: str | Environment) -> Environment:
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            allowed = ", ".join(e.value for e in cls)
            raise ConfigError(
                f"environment: {value!r} is not one of {allowed}"
            ) from None


class OverflowPolicy(enum.StrEnum):
    """What a full channel does with a new item when its consumer is slow."""

    BLOCK = "block"
    DROP_NEWEST = "drop-newest"
    DROP_OLDEST = "drop-oldest"


class PythonFrames(enum.StrEnum):
    """How Python processes' stacks read.

    ``merged`` splices each Python frame into the native stack where its
    interpreter loop runs; ``python`` keeps the Python frames alone (native
    frames only where no Python frame was running); ``off`` walks no Python
    frames at all.
    """

    MERGED = "merged"
    PYTHON = "python"
    OFF = "off"


# Allowed sampling rates per environment.  The recommended rate is a prime (or
# just off a round number) so that samples do not beat with timers firing at
# round frequencies, which would over- or under-count periodic work.
_RATE_RANGES: dict[Environment, tuple[int, int]] = {
    Environment.PRODUCTION: (19, 49),
    Environment.STAGING: (49, 99),
    Environment.DEVELOPMENT: (99, 99),
    Environment.DEBUG: (99, 199),
}
_RECOMMENDED_RATE: dict[Environment, int] = {
    Environment.PRODUCTION: 19,
    Environment.STAGING: 49,
    Environment.DEVELOPMENT: 99,
    Environment.DEBUG: 199,
}

_KIB = 1024
_MIB = 1024 * _KIB
_PAGE = 4096


def recommended_sample_rate(env: str | Environment) -> int:
    """The sampling rate, in Hz, to use in ``env``.

    Production gets 19 Hz: cheap enough to leave on, and a prime, so samples
    do not line up with periodic work.
    """
    return _RECOMMENDED_RATE[Environment.parse(env)]


def sample_rate_range(env: str | Environment) -> tuple[int, int]:
    """The (lowest, highest) rate in Hz the presets consider sensible for ``env``."""
    return _RATE_RANGES[Environment.parse(env)]


class EbpfConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a profiling run needs to know, as one immutable value.

    Start from ``EbpfConfig()`` (the production preset) or
    ``EbpfConfig.for_environment(env)`` and refine it with the ``with_*``
    builders.  A frozen struct rather than a dataclass: creating and copying
    one costs a tenth as much.  ``pids`` empty means "the default target": the host process
    for ``Profiler``, the whole system for the CLI.
    """

    environment: Environment = Environment.PRODUCTION
    sample_rate_hz: int = 19
    cpu_profiling: bool = True
    network_tracing: bool = False
    syscall_tracing: bool = False
    syscall_latency: bool = True
    memory_tracing: bool = False
    max_samples: int = 20_000
    pids: tuple[int, ...] = ()
    ring_buffer_bytes: int = 256 * _KIB
    stack_map_entries: int = 2048
    export_interval_s: float = 10.0
    channel_capacity: int = 64
    overflow_policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST
    include_idle: bool = False
    slow_syscall_ms: float = 10.0
    python_frames: PythonFrames = PythonFrames.MERGED
    loop_stall_ms: float = 100.0
    off_cpu: bool = False
    off_cpu_threshold_ms: float = 1.0
    off_cpu_idle_loops: bool = False

    @property
    def sample_period_ns(self) -> int:
        """Nanoseconds of CPU between samples: what each sample stands for."""
        return round(1e9 / self.sample_rate_hz)

    @classmethod
    def for_environment(cls, env: str | Environment) -> Self:
        """The preset for ``env``: rate, buffers and budgets sized for it.

        Production keeps the ring, stack maps and batches small to stay under
        its 50 MB budget; debug trades memory for detail and fast feedback.
        """
        e = Environment.parse(env)
        presets: dict[Environment, dict[str, object]] = {
            Environment.PRODUCTION: {},
            Environment.STAGING: dict(
                ring_buffer_bytes=512 * _KIB, stack_map_entries=4096,
                max_samples=50_000,
            ),
            Environment.DEVELOPMENT: dict(
                ring_buffer_bytes=1 * _MIB, stack_map_entries=8192, max_samples=100_000,
                export_interval_s=5.0,
            ),
            Environment.DEBUG: dict(
                ring_buffer_bytes=4 * _MIB, stack_map_entries=16384, max_samples=500_000,
                export_interval_s=1.0, overflow_policy=OverflowPolicy.BLOCK,
            ),
        }
        fields: dict[str, object] = {"environment": e, "sample_rate_hz": _RECOMMENDED_RATE[e]}
        fields.update(presets[e])
        return cls(**fields)  # type: ignore[arg-type]

    def _with(self, **changes: object) -> Self:
        new = msgspec.structs.replace(self, **changes)
        validate_config(new)
        return new

    def with_sample_rate(self, hz: int) -> Self:
        return self._with(sample_rate_hz=hz)

    def with_cpu_profiling(self, enabled: bool) -> Self:
        return self._with(cpu_profiling=enabled)

    def with_network_tracing(self, enabled: bool) -> Self:
        return self._with(network_tracing=enabled)

    def with_syscall_tracing(self, enabled: bool) -> Self:
        return self._with(syscall_tracing=enabled)

    def with_syscall_latency(self, enabled: bool) -> Self:
        """Measure each syscall's duration (histograms, slow-call records), or only count.

        Durations need a hook at entry and two clock reads per call, about
        60 ns on every syscall of every task; counts and errors alone need
        only the exit hook, which brings tracing close to the least any exact
        syscall counter costs.
        """
        return self._with(syscall_latency=enabled)

    def with_memory_tracing(self, enabled: bool) -> Self:
        return self._with(memory_tracing=enabled)

    def with_max_samples(self, n: int) -> Self:
        return self._with(max_samples=n)

    def with_pids(self, pids: Iterable[int]) -> Self:
        return self._with(pids=tuple(pids))

    def with_ring_buffer_bytes(self, size: int) -> Self:
        return self._with(ring_buffer_bytes=size)

    def with_export_interval(self, seconds: float) -> Self:
        return self._with(export_interval_s=seconds)

    def with_overflow_policy(self, policy: str | OverflowPolicy) -> Self:
        return self._with(overflow_policy=_choice("overflow_policy", OverflowPolicy, policy))

    def with_include_idle(self, enabled: bool) -> Self:
        return self._with(include_idle=enabled)

    def with_slow_syscall_threshold(self, ms: float) -> Self:
        """Stream each syscall that takes at least ``ms`` milliseconds, with its stack."""
        return self._with(slow_syscall_ms=ms)

    def with_python_frames(self, mode: str | PythonFrames) -> Self:
        """Merge Python frames into native stacks, show them alone, or walk none."""
        return self._with(python_frames=_choice("python_frames", PythonFrames, mode))

    def with_stall_threshold(self, ms: float) -> Self:
        """Report an asyncio loop that runs callbacks ``ms`` milliseconds without
        waiting; 0 turns stall detection off.

        Detection needs Python frames and CPU profiling, and costs a hook on
        every context switch of the machine while it is on.
        """
        return self._with(loop_stall_ms=ms)

    def with_off_cpu(self, enabled: bool = True, *, threshold_ms: float | None = None,
                     idle_loops: bool | None = None) -> Self:
        """Record where the targets' threads wait, weighted in nanoseconds of waiting.

        A wait of at least ``threshold_ms`` is recorded with its length; a
        shorter one with probability length / threshold and the threshold's
        weight, so each stack's weight is its waiting time on average while a
        thread costs at most one record per threshold, however often it
        switches.  A Python process's event loop waiting in epoll is idle,
        not blocked: ``idle_loops`` records it too.  Needs CPU profiling.
        """
        changes: dict[str, object] = {"off_cpu": enabled}
        if threshold_ms is not None:
            changes["off_cpu_threshold_ms"] = threshold_ms
        if idle_loops is not None:
            changes["off_cpu_idle_loops"] = idle_loops
        return self._with(**changes)


_Choice = TypeVar("_Choice", bound=enum.StrEnum)


def _choice(field: str, kind: type[_Choice], value: str) -> _Choice:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise ConfigError(f"{field}: {value!r} is not one of {allowed}") from None


# (field, lowest, highest): inclusive numeric bounds checked by validate_config.
_BOUNDS: tuple[tuple[str, float, float], ...] = (
    ("sample_rate_hz", 1, 1000),
    ("max_samples", 1, 10_000_000),
    ("ring_buffer_bytes", _PAGE, 1024 * _MIB),
    ("stack_map_entries", 64, 1 << 20),
    ("export_interval_s", 0.1, 3600.0),
    ("channel_capacity", 1, 65536),
    ("slow_syscall_ms", 0.001, 3_600_000.0),
    ("loop_stall_ms", 0.0, 3_600_000.0),
    ("off_cpu_threshold_ms", 0.001, 60_000.0),
)


_bounded_values = operator.attrgetter(*(name for name, _, _ in _BOUNDS))
_NUMBERS = (int, float)  # exact types: a bool is not a rate
_MAX_PID = (1 << 22) - 1


def validate_config(config: EbpfConfig) -> None:
    """Raise ``ConfigError`` naming the first field that is out of range.

    Written for speed (it runs on every builder call): exact type checks
    and one attribute fetch for all the bounded fields.
    """
    for (name, lo, hi), value in zip(_BOUNDS, _bounded_values(config), strict=True):
        if type(value) not in _NUMBERS or not lo <= value <= hi:
            raise ConfigError(f"{name}: {value!r} is outside the allowed range {lo:g}..{hi:g}")
    size = config.ring_buffer_bytes
    if size & (size - 1):
        raise ConfigError(
            f"ring_buffer_bytes: {size} must be a power of two between 4096 and {1024 * _MIB}"
        )
    for pid in config.pids:
        if type(pid) is not int or not 0 < pid <= _MAX_PID:
            raise ConfigError(f"pids: {pid!r} is not a process id (1..{_MAX_PID})")
    if type(config.environment) is not Environment:
        raise ConfigError(f"environment: {config.environment!r} is not an Environment")
    if type(config.python_frames) is not PythonFrames:
        raise ConfigError(f"python_frames: {config.python_frames!r} is not a PythonFrames")
    if type(config.overflow_policy) is not OverflowPolicy:
        raise ConfigError(f"overflow_policy: {config.overflow_policy!r} is not an OverflowPolicy")
    if config.off_cpu and not config.cpu_profiling:
        raise ConfigError("off_cpu: off-CPU profiling needs cpu_profiling on")
    if not (config.cpu_profiling or config.network_tracing
            or config.syscall_tracing or config.memory_tracing):
        raise ConfigError(
            "cpu_profiling: every feature is off; enable at least one of cpu_profiling, "
            "network_tracing, syscall_tracing, memory_tracing"
        )
