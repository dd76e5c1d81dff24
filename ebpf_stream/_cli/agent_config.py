"""The node agent's settings: a TOML file, overridden by the environment.

The file is the one ``--config`` names, else ``$EBPF_STREAM_CONFIG``, else
``/etc/ebpf-stream/agent.toml`` when it exists.  Each top-level key has a
variable, ``EBPF_STREAM_`` and the key in capitals, which wins over the file,
so a DaemonSet can ship one file and change a node or a rollout through its
environment.  The ``[otlp]`` table stands for the ``OTEL_EXPORTER_OTLP_*``
variables and ``[resource]`` for ``OTEL_RESOURCE_ATTRIBUTES`` (merged, the
variable winning per attribute): the exporter reads an environment in which
the file's values fill what the real one leaves unset.

Everything is resolved and checked here, before anything loads, so that a
typo stops the agent with one line naming the file and key, or the variable.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._base.config import EbpfConfig
from .._base.errors import ConfigError
from .._base.otel_env import env_value, parse_pairs
from .._base.otlp_settings import (
    Endpoint,
    Signal,
    endpoint_in_environment,
    otlp_endpoints,
    resource_attributes,
)
from .._base.variables import (
    CONFIG_KEYS,
    Setting,
    config_from_settings,
    from_environment,
    parse_decimal,
    parsed,
)

DEFAULT_PATH = Path("/etc/ebpf-stream/agent.toml")
PATH_VARIABLE = "EBPF_STREAM_CONFIG"
AGENT_KEYS = ("stats_interval", "stats_file")
KEYS = (*CONFIG_KEYS, *AGENT_KEYS)
DEFAULT_STATS_INTERVAL_S = 60.0
_RESOURCE = "OTEL_RESOURCE_ATTRIBUTES"
# The [otlp] keys and the variables they stand for.
_OTLP_VARIABLES = {
    "endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT",
    "protocol": "OTEL_EXPORTER_OTLP_PROTOCOL",
    "headers": "OTEL_EXPORTER_OTLP_HEADERS",
    "compression": "OTEL_EXPORTER_OTLP_COMPRESSION",
    "timeout": "OTEL_EXPORTER_OTLP_TIMEOUT",
}
_TABLES = ("otlp", "resource")


@dataclasses.dataclass(frozen=True, slots=True)
class AgentSettings:
    """What the agent runs with, and where each value came from (for ``--check``)."""

    path: Path | None  # the configuration file, None when there is none
    config: EbpfConfig
    stats_interval_s: float
    stats_file: Path | None
    environ: Mapping[str, str]  # what the OTLP exporter reads: the file's under the real one
    endpoints: Mapping[Signal, Endpoint]
    origins: Mapping[str, str]  # key -> variable or "file" that set it; absent: the default

    def describe(self) -> list[str]:
        """The resolved settings, one ``key: value`` a line, each with its origin."""
        c = self.config
        values: dict[str, object] = {
            "preset": c.environment.value, "sample_rate": c.sample_rate_hz,
            "python_frames": c.python_frames.value, "stall_threshold_ms": c.loop_stall_ms,
            "export_interval": c.export_interval_s, "max_samples": c.max_samples,
            "syscalls": c.syscall_tracing, "network": c.network_tracing,
            "memory": c.memory_tracing, "stats_interval": self.stats_interval_s,
            "stats_file": self.stats_file or "none",
        }
        lines = [f"config: {self.path or 'none'}"]
        for key, value in values.items():
            lines.append(f"{key}: {_shown(value)} ({self.origins.get(key, 'default')})")
        profiles = self.endpoints[Signal.PROFILES]
        lines += [
            f"otlp.endpoint: {profiles.url}",
            f"otlp.protocol: {profiles.protocol.value}",
            f"otlp.compression: {profiles.compression.value}",
            f"otlp.timeout: {profiles.timeout_s * 1000:g} ms",
            # Names only: header values are credentials.
            f"otlp.headers: {', '.join(k for k, _ in profiles.headers) or 'none'}",
            f"resource: {self.environ.get(_RESOURCE) or 'none'}",
        ]
        return lines


def _shown(value: object) -> str:
    """A value as the file writes it: ``true``, ``2.5``, ``100`` (not ``100.0``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_path(option: Path | None, env: Mapping[str, str]) -> Path | None:
    """The file to read: ``--config``, else ``$EBPF_STREAM_CONFIG``, else the default if any."""
    if option is not None:
        return option
    named = env.get(PATH_VARIABLE, "").strip()
    if named:
        return Path(named)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def load(option: Path | None, env: Mapping[str, str]) -> AgentSettings:
    """Read and check the file and the environment; ``ConfigError`` names what is wrong."""
    path = config_path(option, env)
    document = {} if path is None else _read(path)
    settings: dict[str, Setting] = {}
    for key, value in document.items():
        if key in _TABLES:
            continue
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(KEYS)}, "
                              f"and the tables {', '.join(f'[{t}]' for t in _TABLES)})")
        settings[key] = _scalar(value, f"{path}: {key}")
    from_env = from_environment(env, KEYS)
    settings.update(from_env)
    origins = {key: setting.origin if key in from_env else str(path)
               for key, setting in settings.items()}

    config = config_from_settings(settings).with_pids(())
    interval = parsed(settings.get("stats_interval"), parse_decimal)
    if interval is not None and not 0 < interval <= 86400:
        raise ConfigError(f"{settings['stats_interval'].origin}: {interval:g} is outside the "
                          "allowed range (seconds, more than 0 and at most 86400)")
    stats_file = _stats_file(settings.get("stats_file"))

    environ, file_variables = _otlp_environ(path, document, env)
    if not endpoint_in_environment(environ):
        raise ConfigError("no OTLP endpoint: set endpoint in the [otlp] table of "
                          f"{path or DEFAULT_PATH}, or OTEL_EXPORTER_OTLP_ENDPOINT")
    try:
        endpoints = otlp_endpoints(environ)
    except ConfigError as exc:  # name the file's key, not the variable it stood for
        name, _, reason = str(exc).partition(": ")
        if name in file_variables:
            raise ConfigError(f"{file_variables[name]}: {reason}") from None
        raise
    resource_attributes(environ)  # checked now: the exporter would refuse it at start
    return AgentSettings(path=path, config=config,
                         stats_interval_s=interval or DEFAULT_STATS_INTERVAL_S,
                         stats_file=stats_file, environ=environ, endpoints=endpoints,
                         origins=origins)


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _scalar(value: object, origin: str) -> Setting:
    """A file's value as a setting; tables, arrays and dates have no place at the top."""
    if not isinstance(value, str | int | float | bool):
        raise ConfigError(f"{origin}: {value!r} is not a single value (expected text, a "
                          "number or true/false)")
    return Setting(origin, value)


def _stats_file(setting: Setting | None) -> Path | None:
    if setting is None:
        return None
    if not isinstance(setting.value, str):
        raise ConfigError(f"{setting.origin}: {setting.value!r} is not a path (expected text "
                          "in quotes)")
    path = Path(setting.value)
    if not path.parent.is_dir():
        raise ConfigError(f"{setting.origin}: {str(path)!r}: directory {str(path.parent)!r} "
                          "does not exist")
    return path


def _table(document: Mapping[str, Any], path: Path | None, name: str) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {name} must be a table ([{name}])")
    return table


def _otlp_environ(path: Path | None, document: Mapping[str, Any], env: Mapping[str, str]
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """The environment the exporter reads, and which of its variables the file set
    (variable -> "FILE: otlp.KEY"), so errors can name the file's key."""
    from_file: dict[str, str] = {}
    origins: dict[str, str] = {}
    for key, value in _table(document, path, "otlp").items():
        origin = f"{path}: otlp.{key}"
        if key not in _OTLP_VARIABLES:
            raise ConfigError(f"{path}: unknown key 'otlp.{key}' (known: "
                              f"{', '.join(_OTLP_VARIABLES)})")
        variable = _OTLP_VARIABLES[key]
        if key == "headers":
            if not isinstance(value, dict) or not all(
                    isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{origin}: must be a table of text values, like "
                                  '{ authorization = "Bearer ..." }')
            text = ",".join(f"{k}={quote(v, safe='')}" for k, v in value.items())
        elif key == "timeout" and type(value) is int:
            text = str(value)  # milliseconds, as the variable
        elif isinstance(value, str):
            text = value
        else:
            raise ConfigError(f"{origin}: {value!r} is not "
                              + ("a whole number of milliseconds" if key == "timeout"
                                 else "text in quotes"))
        from_file[variable] = text
        origins[variable] = origin
    # The environment wins, variable by variable; a blank variable counts as unset.
    applied = {name: text for name, text in from_file.items() if env_value(env, name) is None}
    environ = {**env, **applied}
    file_variables = {name: origins[name] for name in applied}

    attributes = {}
    for key, value in _table(document, path, "resource").items():
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"{path}: resource.{key}: {value!r} is not a single value")
        attributes[key] = str(value).lower() if isinstance(value, bool) else str(value)
    if attributes:
        given = env_value(env, _RESOURCE)
        attributes.update(parse_pairs(given, _RESOURCE, lower_keys=False) if given else {})
        environ[_RESOURCE] = ",".join(f"{k}={quote(v, safe='')}"
                                      for k, v in attributes.items())
    return environ, file_variables

