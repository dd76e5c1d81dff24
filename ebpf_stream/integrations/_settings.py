"""What a service's profiling is, from its arguments and its environment.

Operators turn profiling on, point it somewhere and tune it with
``EBPF_STREAM_*`` variables (and the standard ``OTEL_*`` ones for OTLP),
without a code change; the code may settle any of it instead, and an
argument given in code wins over the variables it stands for.  Everything
is read and checked once, when the service starts, so a typo in a manifest
stops the service there with one line naming the variable, rather than
being ignored or surfacing minutes later.

With nothing saying where profiles go, the service is not profiled: a
library that is merely installed must cost nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TypedDict

from .._base.config import EbpfConfig
from .._base.errors import ConfigError
from .._base.otlp_settings import endpoint_in_environment, env_value
from .._base.variables import (
    Value,
    config_from_settings,
    from_environment,
    parse_bool,
    parsed,
    variable,
    variable_name,
)
from .._outputs.base import Exporter
from .._profiler import OnUnavailable

VARIABLES = {
    "EBPF_STREAM_ENABLED": "true or false; unset: profile when something names a destination",
    "EBPF_STREAM_OUTPUT": "comma-separated files, each format from its suffix; {pid} is the pid",
    "EBPF_STREAM_PRESET": "production (default), staging, development or debug",
    "EBPF_STREAM_SAMPLE_RATE": "samples per second per CPU (Hz)",
    "EBPF_STREAM_STALL_THRESHOLD_MS": "asyncio loop stall threshold in ms; 0 turns it off",
    "EBPF_STREAM_PYTHON_FRAMES": "merged (default), python or off",
    "EBPF_STREAM_EXPORT_INTERVAL": "seconds between exports",
    "EBPF_STREAM_OFF_CPU": "true to record where threads wait, off the CPU",
    "EBPF_STREAM_OFF_CPU_THRESHOLD_MS": "waits this long are recorded as they are (default 1)",
    "EBPF_STREAM_ON_UNAVAILABLE": "off (default) or raise",
}
"""The variables read here, and what each takes (the README has the full story)."""

# The parts of the config the variables set: an argument ``config`` replaces them all.
_CONFIG_KEYS = ("preset", "sample_rate", "stall_threshold_ms", "python_frames",
                "export_interval", "off_cpu", "off_cpu_threshold_ms")
_CONFIG_VARIABLES = tuple(map(variable_name, _CONFIG_KEYS))


class ProfilingOptions(TypedDict, total=False):
    """What code may settle instead of the environment; each wins over its variables.

    ``config`` stands for ``EBPF_STREAM_PRESET``, ``_SAMPLE_RATE``,
    ``_STALL_THRESHOLD_MS``, ``_PYTHON_FRAMES``, ``_EXPORT_INTERVAL``, ``_OFF_CPU`` and
    ``_OFF_CPU_THRESHOLD_MS``;
    ``outputs`` for ``EBPF_STREAM_OUTPUT``; ``exporters`` for every
    destination the environment names (``EBPF_STREAM_OUTPUT`` and OTLP),
    though ``outputs`` given too are still written; ``enabled`` for
    ``EBPF_STREAM_ENABLED``; ``on_unavailable`` for
    ``EBPF_STREAM_ON_UNAVAILABLE``.  ``environ`` replaces ``os.environ``
    as the place variables are read from (``OTEL_*`` included).
    """

    config: EbpfConfig
    exporters: Sequence[Exporter]
    outputs: Sequence[str | os.PathLike[str]]
    enabled: bool
    on_unavailable: OnUnavailable
    environ: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class Output:
    """A file to write: its format, and its path as given (``{pid}`` not yet replaced)."""

    format: str
    path: str


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The resolved answer: whether to profile, how, and where to.

    ``off`` says why not to profile (None: profile).  ``source`` is how
    errors about ``outputs`` name where they came from.  ``publish``: the
    process publishes its requests for a profiler outside it, whether or
    not it profiles itself; only disabling ebpf-stream turns that off.
    """

    off: str | None
    publish: bool = True
    config: EbpfConfig = dataclasses.field(default_factory=EbpfConfig)
    exporters: tuple[Exporter, ...] = ()
    outputs: tuple[Output, ...] = ()
    source: str = "EBPF_STREAM_OUTPUT"
    otlp: bool = False
    on_unavailable: OnUnavailable = "fallback"
    ignored: tuple[str, ...] = ()  # variables set, but settled by the code


def read_settings(options: ProfilingOptions) -> Settings:
    """Resolve ``options`` and the environment; ``ConfigError`` names a malformed value."""
    env = options.get("environ", os.environ)
    ignored = []
    enabled = options.get("enabled")
    if enabled is None:
        enabled = parsed(variable(env, "EBPF_STREAM_ENABLED"), parse_bool)
    elif env_value(env, "EBPF_STREAM_ENABLED") is not None:
        ignored.append("EBPF_STREAM_ENABLED")
    if enabled is False:
        by = ("enabled=False" if "enabled" in options
              else f"EBPF_STREAM_ENABLED={env_value(env, 'EBPF_STREAM_ENABLED')}")
        return Settings(off=f"profiling is disabled ({by})", publish=False)

    exporters = tuple(options.get("exporters", ()))
    given = options.get("outputs")
    source = "outputs" if given is not None else "EBPF_STREAM_OUTPUT"
    if isinstance(given, str | os.PathLike):  # one path: a str is a sequence too
        given = [given]
    if given is not None:
        paths = [os.fspath(p) for p in given]
    else:
        raw = env_value(env, "EBPF_STREAM_OUTPUT")
        paths = [] if raw is None else [p.strip() for p in raw.split(",") if p.strip()]
    sdk_disabled = (env_value(env, "OTEL_SDK_DISABLED") or "").lower() == "true"
    otlp = "exporters" not in options and endpoint_in_environment(env) and not sdk_disabled
    if "exporters" in options and given is None and paths:
        ignored.append("EBPF_STREAM_OUTPUT")
        paths = []
    if not (exporters or paths or otlp):
        if enabled:
            by = "enabled" if "enabled" in options else "EBPF_STREAM_ENABLED"
            raise ConfigError(f"{by}: profiling is on, but nothing says where profiles go "
                              "(set EBPF_STREAM_OUTPUT or OTEL_EXPORTER_OTLP_ENDPOINT)")
        why = ("OTEL_SDK_DISABLED=true turns OTLP export off, and no EBPF_STREAM_OUTPUT is set"
               if sdk_disabled and endpoint_in_environment(env)
               else "nothing says where profiles go (set EBPF_STREAM_OUTPUT or "
                    "OTEL_EXPORTER_OTLP_ENDPOINT)")
        return Settings(off=f"profiling is off: {why}")

    config = options.get("config")
    if config is None:
        config = config_from_environment(env)
    else:
        ignored.extend(name for name in _CONFIG_VARIABLES if env_value(env, name) is not None)
    outputs = tuple(_output(path, source, config) for path in paths)

    on_unavailable = options.get("on_unavailable")
    if on_unavailable is None:
        on_unavailable = parsed(variable(env, "EBPF_STREAM_ON_UNAVAILABLE"),
                                _parse_on_unavailable) or "fallback"
    elif env_value(env, "EBPF_STREAM_ON_UNAVAILABLE") is not None:
        ignored.append("EBPF_STREAM_ON_UNAVAILABLE")
    return Settings(off=None, config=config, exporters=exporters, outputs=outputs,
                    source=source, otlp=otlp, on_unavailable=on_unavailable,
                    ignored=tuple(ignored))


def config_from_environment(env: Mapping[str, str]) -> EbpfConfig:
    """The preset ``EBPF_STREAM_PRESET`` names, refined by the other config variables."""
    return config_from_settings(from_environment(env, _CONFIG_KEYS))


def _output(path: str, source: str, config: EbpfConfig) -> Output:
    # Loaded here: the formats' module brings the OTLP/JSON exporter, and protobuf.
    from .._outputs.formats import format_for_path

    fmt = format_for_path(path)
    if fmt is None:
        raise ConfigError(f"{source}: cannot tell the format of {path!r} from its name (end it "
                          "in .folded, .pb.gz, .speedscope.json, .svg or .otlp.jsonl)")
    if not config.cpu_profiling and fmt != "otlp-json":
        raise ConfigError(f"{source}: {path} would hold CPU samples, and CPU profiling is off; "
                          "write OTLP/JSON (.otlp.jsonl) instead")
    return Output(fmt, path)


def _parse_on_unavailable(value: Value) -> OnUnavailable:
    choices: dict[str, OnUnavailable] = {"fallback": "fallback", "off": "off", "raise": "raise"}
    try:
        return choices[str(value).lower()]
    except KeyError:
        raise ValueError(f"is not one of {', '.join(choices)}") from None
