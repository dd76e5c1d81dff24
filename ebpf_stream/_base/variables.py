"""Settings given by name, from ``EBPF_STREAM_*`` variables or a configuration file.

An embedded service reads its profiling settings from the environment; the
node agent from a TOML file and the environment.  Both parse them here, once,
with the same rules, and an error names where the bad value came from: the
variable (``EBPF_STREAM_SAMPLE_RATE: 'abc' is not a whole number``) or the
file and key (``agent.toml: sample_rate: ...``), so whoever reads the
manifest can fix it.

A variable's value is text; a file's may be text too, or what TOML writes
natively (a number, a boolean), and each parser takes either.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .config import EbpfConfig, PythonFrames
from .errors import ConfigError
from .otel_env import env_value

PREFIX = "EBPF_STREAM_"
CONFIG_KEYS = ("preset", "sample_rate", "python_frames", "stall_threshold_ms",
               "export_interval", "max_samples", "syscalls", "network", "memory", "off_cpu",
               "off_cpu_threshold_ms", "off_cpu_idle_loops")
"""The keys ``config_from_settings`` reads, in the order it applies them."""

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_WHOLE = re.compile(r"\d+")
# Digits, optionally with a fraction; not float(), which takes "inf", "nan" and "1e3".
_DECIMAL = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")
_T = TypeVar("_T")

Value = str | int | float | bool
"""What a setting may hold: a variable's text, or a TOML scalar."""


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One value, with how errors name where it came from."""

    origin: str  # "EBPF_STREAM_SAMPLE_RATE", or "/etc/ebpf-stream/agent.toml: sample_rate"
    value: Value


def variable_name(key: str) -> str:
    """The variable that stands for ``key``: ``sample_rate`` is ``EBPF_STREAM_SAMPLE_RATE``."""
    return PREFIX + key.upper()


def variable(env: Mapping[str, str], name: str) -> Setting | None:
    """Variable ``name`` of ``env``, None when unset or blank."""
    value = env_value(env, name)
    return None if value is None else Setting(name, value)


def from_environment(env: Mapping[str, str], keys: Iterable[str]) -> dict[str, Setting]:
    """The settings of ``keys`` that ``env`` sets, by key."""
    found = {key: variable(env, variable_name(key)) for key in keys}
    return {key: setting for key, setting in found.items() if setting is not None}


def parsed(setting: Setting | None, parse: Callable[[Value], _T]) -> _T | None:
    """``parse(setting.value)``, None for no setting; a ``ValueError`` becomes a
    ``ConfigError`` naming the setting's origin and value."""
    if setting is None:
        return None
    try:
        return parse(setting.value)
    except ValueError as exc:
        raise ConfigError(f"{setting.origin}: {setting.value!r} {exc}") from None


def named(origin: str, build: Callable[[], _T]) -> _T:
    """``build()``, its ``ConfigError`` naming ``origin`` instead of the config field."""
    try:
        return build()
    except ConfigError as exc:
        _field, _, reason = str(exc).partition(": ")
        raise ConfigError(f"{origin}: {reason}") from None


# -- parsers: each raises ValueError with the reason, after the value ----------------------


def parse_bool(value: Value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower() if isinstance(value, str) else ""
    if text not in _TRUE + _FALSE:
        raise ValueError("is not a boolean (expected true or false)")
    return text in _TRUE


def parse_whole(value: Value) -> int:
    """A whole number; a native negative one is left to the config's range check."""
    if type(value) is int:
        return value
    if not isinstance(value, str) or _WHOLE.fullmatch(value) is None:
        raise ValueError("is not a whole number")
    return int(value)


def parse_decimal(value: Value) -> float:
    """A finite number; a native negative one is left to the config's range check."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if not isinstance(value, str) or _DECIMAL.fullmatch(value) is None:
        raise ValueError("is not a number (expected digits, like 2.5)")
    return float(value)


def parse_name(value: Value) -> str:
    """A word such as a preset or a mode, compared without case."""
    if not isinstance(value, str):
        raise ValueError("is not a name (expected text in quotes)")
    return value.lower()


def config_from_settings(settings: Mapping[str, Setting]) -> EbpfConfig:
    """The preset ``settings["preset"]`` names, refined by the other settings of
    ``CONFIG_KEYS`` present; absent ones keep the preset's values."""
    preset = parsed(settings.get("preset"), parse_name) or "production"
    config = named(_origin(settings, "preset"), lambda: EbpfConfig.for_environment(preset))
    refinements: tuple[tuple[str, Callable[[Value], Any], Callable[[EbpfConfig, Any], EbpfConfig]],
                       ...] = (
        ("sample_rate", parse_whole, EbpfConfig.with_sample_rate),
        ("export_interval", parse_decimal, EbpfConfig.with_export_interval),
        ("max_samples", parse_whole, EbpfConfig.with_max_samples),
        ("python_frames", parse_name, EbpfConfig.with_python_frames),
        ("off_cpu_threshold_ms", parse_decimal,
         lambda c, ms: c.with_off_cpu(c.off_cpu, threshold_ms=ms)))
    for key, parse, refine in refinements:
        value = parsed(settings.get(key), parse)
        if value is not None:
            config = named(_origin(settings, key), functools.partial(refine, config, value))
    stall = parsed(settings.get("stall_threshold_ms"), parse_decimal)
    if stall is not None:
        if stall and config.python_frames is PythonFrames.OFF:
            # The file's key or the variable, without the file: it is named once already.
            frames_by = _origin(settings, "python_frames").rpartition(": ")[2]
            raise ConfigError(f"{_origin(settings, 'stall_threshold_ms')}: stall detection needs "
                              f"Python frames, which {frames_by}=off turns off")
        config = named(_origin(settings, "stall_threshold_ms"),
                       lambda: config.with_stall_threshold(stall))
    # Each tracer switched on or off alone: a builder validates, and CPU profiling stays on.
    switches: tuple[tuple[str, Callable[[EbpfConfig, bool], EbpfConfig]], ...] = (
        ("syscalls", EbpfConfig.with_syscall_tracing),
        ("network", EbpfConfig.with_network_tracing),
        ("memory", EbpfConfig.with_memory_tracing),
        ("off_cpu", EbpfConfig.with_off_cpu),
        ("off_cpu_idle_loops", lambda c, on: c.with_off_cpu(c.off_cpu, idle_loops=on)))
    for key, build in switches:
        enabled = parsed(settings.get(key), parse_bool)
        if enabled is not None:
            config = build(config, enabled)
    return config

def _origin(settings: Mapping[str, Setting], key: str) -> str:
    setting = settings.get(key)
    return variable_name(key) if setting is None else setting.origin
