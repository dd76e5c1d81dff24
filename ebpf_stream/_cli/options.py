"""The options the recording commands share, and the configuration they make."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import click

from .._base.config import EbpfConfig, Environment, PythonFrames, sample_rate_range
from .._base.errors import ConfigError

F = TypeVar("F", bound=Callable[..., object])


def config_from_options(env: str | None, rate: int | None, max_samples: int | None,
                        pids: Sequence[int]) -> EbpfConfig:
    """The config for a run: the preset of ``--env`` (or ``$ENV``), then the overrides."""
    environment = Environment.parse(env or os.environ.get("ENV") or "production")
    config = EbpfConfig.for_environment(environment)
    if rate is not None:
        config = config.with_sample_rate(rate)
        lo, hi = sample_rate_range(environment)
        if not lo <= rate <= hi:
            click.echo(f"note: {rate} Hz is outside the {lo}-{hi} Hz suggested for "
                       f"{environment.value}", err=True)
    if max_samples is not None:
        config = config.with_max_samples(max_samples)
    return config.with_pids(pids)


def with_features(config: EbpfConfig, *, cpu: bool, syscalls: bool, network: bool,
                  memory: bool, slow_syscall_ms: float | None,
                  syscall_latency: bool = True) -> EbpfConfig:
    """``config`` with the features the options switch on."""
    if slow_syscall_ms is not None:
        if not syscalls or not syscall_latency:
            raise ConfigError("--slow-syscall-ms: needs syscall tracing with latency "
                              "(--syscalls, without --syscall-counts-only)")
        config = config.with_slow_syscall_threshold(slow_syscall_ms)
    if not syscall_latency:
        if not syscalls:
            raise ConfigError("--syscall-counts-only: needs syscall tracing (--syscalls)")
        config = config.with_syscall_latency(False)
    # CPU last: each builder validates, and CPU may be the only feature on before.
    return (config.with_syscall_tracing(syscalls).with_network_tracing(network)
            .with_memory_tracing(memory).with_cpu_profiling(cpu))


def with_python(config: EbpfConfig, *, cpu: bool, python_frames: str | None,
                stall_threshold_ms: float | None) -> EbpfConfig:
    """``config`` with how Python stacks read and when an asyncio loop has stalled."""
    for option, value in (("--python-frames", python_frames),
                          ("--stall-threshold", stall_threshold_ms)):
        if value is not None and not cpu:
            raise ConfigError(f"{option}: works on CPU samples, which --no-cpu turns off")
    if python_frames is not None:
        config = config.with_python_frames(python_frames)
    if stall_threshold_ms is not None:
        if stall_threshold_ms and config.python_frames is PythonFrames.OFF:
            raise ConfigError("--stall-threshold: needs Python frames, which "
                              "--python-frames off turns off")
        config = config.with_stall_threshold(stall_threshold_ms)
    return config


def with_off_cpu(config: EbpfConfig, *, cpu: bool, off_cpu: bool,
                 threshold_ms: float | None, idle_loops: bool) -> EbpfConfig:
    """``config`` with off-CPU profiling as the options ask."""
    for option, given in (("--off-cpu-threshold", threshold_ms is not None),
                          ("--idle-loops", idle_loops)):
        if given and not off_cpu:
            raise ConfigError(f"{option}: works on waits off the CPU, which need --off-cpu")
    if off_cpu and not cpu:
        raise ConfigError("--off-cpu: records with the CPU samples, which --no-cpu turns off")
    if not off_cpu:
        return config
    return config.with_off_cpu(threshold_ms=threshold_ms, idle_loops=idle_loops)


def traces(config: EbpfConfig) -> bool:
    return config.syscall_tracing or config.network_tracing or config.memory_tracing


def target_options(f: F) -> F:
    """The options that choose what to record, shared by ``record`` and ``top``."""
    f = click.argument("command", nargs=-1, type=click.UNPROCESSED)(f)
    f = click.option("--env", type=str, help="Preset: production, staging, development or "
                     "debug. Default: $ENV, else production.")(f)
    f = click.option("-d", "--duration", type=float, help="Seconds to record. Default: until "
                     "Ctrl-C or until the targets exit.")(f)
    f = click.option("-p", "--pid", "pids", type=int, multiple=True,
                     help="Process to record, with its descendants (repeatable). "
                     "Default: every process.")(f)
    return f


def check_target(pids: Sequence[int], command: Sequence[str], duration: float | None) -> None:
    if duration is not None and duration <= 0:
        raise ConfigError(f"--duration: {duration:g} must be a positive number of seconds")
    if pids and command:
        raise ConfigError("give either --pid or a command, not both")

