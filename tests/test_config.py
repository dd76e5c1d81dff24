from __future__ import annotations

import pytest

from ebpf_stream import (
    ConfigError,
    EbpfConfig,
    Environment,
    OverflowPolicy,
    recommended_sample_rate,
    validate_config,
)
from ebpf_stream._base.config import sample_rate_range


@pytest.mark.parametrize(("env", "lo", "hi"), [
    ("production", 19, 49), ("staging", 49, 99), ("development", 99, 99), ("debug", 99, 199),
])
def test_recommended_rate_is_in_the_environment_range(env: str, lo: int, hi: int) -> None:
    rate = recommended_sample_rate(env)
    assert lo <= rate <= hi
    assert sample_rate_range(env) == (lo, hi)


def test_production_rate_avoids_round_frequencies() -> None:
    rate = recommended_sample_rate("production")
    assert all(rate % d for d in (2, 5, 10)), rate


def test_environment_names_are_case_insensitive() -> None:
    assert recommended_sample_rate("PRODUCTION ") == recommended_sample_rate(Environment.PRODUCTION)


def test_unknown_environment_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="environment: 'prod' is not one of production, staging"):
        recommended_sample_rate("prod")


def test_config_is_immutable_and_builders_return_new_values() -> None:
    base = EbpfConfig()
    changed = base.with_sample_rate(49).with_max_samples(10).with_pids([3, 4])
    assert (base.sample_rate_hz, base.max_samples, base.pids) == (19, 20_000, ())
    assert (changed.sample_rate_hz, changed.max_samples, changed.pids) == (49, 10, (3, 4))
    with pytest.raises(AttributeError):
        base.sample_rate_hz = 5  # type: ignore[misc]


def test_feature_builders() -> None:
    c = (EbpfConfig().with_network_tracing(True).with_syscall_tracing(True)
         .with_memory_tracing(True).with_cpu_profiling(False))
    assert (c.cpu_profiling, c.network_tracing, c.syscall_tracing, c.memory_tracing) == (
        False, True, True, True)
    assert EbpfConfig().syscall_latency and not c.with_syscall_latency(False).syscall_latency


def test_off_cpu_is_opt_in_and_needs_the_cpu_probe() -> None:
    base = EbpfConfig()
    assert not base.off_cpu
    on = base.with_off_cpu(threshold_ms=5, idle_loops=True)
    assert (on.off_cpu, on.off_cpu_threshold_ms, on.off_cpu_idle_loops) == (True, 5, True)
    assert on.with_off_cpu(False).off_cpu_threshold_ms == 5
    with pytest.raises(ConfigError, match="off_cpu: off-CPU profiling needs cpu_profiling on"):
        on.with_network_tracing(True).with_cpu_profiling(False)


def test_presets_grow_budgets_from_production_to_debug() -> None:
    presets = [EbpfConfig.for_environment(e) for e in Environment]
    for field in ("ring_buffer_bytes", "stack_map_entries", "max_samples"):
        values = [getattr(p, field) for p in presets]
        assert values == sorted(values), field
    for p in presets:
        validate_config(p)
        assert p.sample_rate_hz == recommended_sample_rate(p.environment)


@pytest.mark.parametrize(("build", "message"), [
    (lambda c: c.with_sample_rate(0), r"sample_rate_hz: 0 is outside the allowed range 1\.\.1000"),
    (lambda c: c.with_sample_rate(5000), r"sample_rate_hz: 5000 is outside"),
    (lambda c: c.with_max_samples(-1), r"max_samples: -1 is outside the allowed range"),
    (lambda c: c.with_export_interval(0), r"export_interval_s: 0 is outside"),
    (lambda c: c.with_ring_buffer_bytes(5000), r"ring_buffer_bytes: 5000 must be a power of two"),
    (lambda c: c.with_pids([0]), r"pids: 0 is not a process id"),
    (lambda c: c.with_pids(["12"]), r"pids: '12' is not a process id"),
    (lambda c: c.with_overflow_policy("lossy"), r"overflow_policy: 'lossy' is not one of block"),
    (lambda c: c.with_cpu_profiling(False), r"enable at least one of"),
])
def test_bad_values_name_field_value_and_range(build: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(EbpfConfig())  # type: ignore[operator]


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_validate_config_checks_a_config_built_directly() -> None:
    with pytest.raises(ConfigError, match="sample_rate_hz: True"):
        validate_config(EbpfConfig(sample_rate_hz=True))
    validate_config(EbpfConfig(overflow_policy=OverflowPolicy.BLOCK))
