"""Where and how OTLP data is sent: the standard ``OTEL_*`` variables, resolved.

The OpenTelemetry OTLP exporter specification defines one generic variable
per setting (``OTEL_EXPORTER_OTLP_ENDPOINT``) and one per signal
(``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``).  Following it lets a deployment
that already configures an OpenTelemetry SDK point ebpf-stream at the same
Collector without learning new flags.  Everything is resolved and checked
up front, once: a typo in a manifest should stop the CLI with one line
naming the variable, not surface as a connection error minutes later.

Precedence per setting: explicit argument > per-signal variable > generic
variable > default.  Empty variables count as unset.  Looking variables up,
and parsing the kinds of value any of them takes, is ``otel_env``'s job;
the OTLP vocabulary (protocol, compression, endpoint URL) is parsed here.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .otel_env import (
    PREFIX,
    check_headers,
    check_timeout_s,
    env_value,
    lookup,
    parse_bool,
    parse_pairs,
    parse_timeout_ms,
    readable_file,
    split_hostport,
)

__all__ = [
    "DEFAULT_ENDPOINTS",
    "DEFAULT_TIMEOUT_S",
    "HTTP_PATHS",
    "Compression",
    "Endpoint",
    "Protocol",
    "Signal",
    "endpoint_in_environment",
    "env_value",
    "otlp_endpoints",
    "resource_attributes",
]


class Protocol(enum.StrEnum):
    GRPC = "grpc"
    HTTP_PROTOBUF = "http/protobuf"


class Signal(enum.StrEnum):
    PROFILES = "profiles"
    METRICS = "metrics"
    LOGS = "logs"


class Compression(enum.StrEnum):
    GZIP = "gzip"
    NONE = "none"


# The Collector's OTLP/HTTP paths.  Profiles are still a development signal,
# hence the versioned path; it moves when the signal is declared stable.
HTTP_PATHS: Mapping[Signal, str] = types.MappingProxyType({
    Signal.PROFILES: "v1development/profiles",
    Signal.METRICS: "v1/metrics",
    Signal.LOGS: "v1/logs",
})
DEFAULT_ENDPOINTS: Mapping[Protocol, str] = types.MappingProxyType({
    Protocol.GRPC: "http://localhost:4317",
    Protocol.HTTP_PROTOBUF: "http://localhost:4318",
})
DEFAULT_TIMEOUT_S = 10.0

# The specification's default is http/protobuf: it needs no HTTP/2 and passes
# through ordinary proxies.
_DEFAULT_PROTOCOL = Protocol.HTTP_PROTOBUF
_DEFAULT_PORTS: Mapping[Protocol, int] = types.MappingProxyType({
    Protocol.GRPC: 4317,
    Protocol.HTTP_PROTOBUF: 4318,
})
_EXAMPLES: Mapping[Protocol, str] = types.MappingProxyType({
    Protocol.GRPC: "http://collector:4317",
    Protocol.HTTP_PROTOBUF: "http://collector:4318",
})


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one signal goes and how.

    ``url`` is normalised (scheme lower-cased, port always present) so the
    exporters never re-apply defaults: for OTLP/HTTP it is the full URL to
    POST to, for gRPC only ``scheme://host:port``.
    """

    signal: Signal
    protocol: Protocol
    url: str
    headers: tuple[tuple[str, str], ...]
    compression: Compression
    timeout_s: float
    insecure: bool
    certificate: str | None = None
    client_key: str | None = None
    client_certificate: str | None = None

    @property
    def grpc_target(self) -> str:
        """``host:port`` (IPv6 hosts bracketed), as ``grpc.aio`` channels take it."""
        return urlsplit(self.url).netloc

    @property
    def display(self) -> str:
        """How error messages name this endpoint: the URL, marked when it is gRPC."""
        if self.protocol is Protocol.GRPC:
            return f"grpc {self.url}"
        return self.url


def otlp_endpoints(
    environ: Mapping[str, str] | None = None,
    *,
    endpoint: str | None = None,
    protocol: Protocol | str | None = None,
    headers: Mapping[str, str] | None = None,
    compression: Compression | str | None = None,
    timeout_s: float | None = None,
    source: str = "endpoint",
) -> dict[Signal, Endpoint]:
    """One ``Endpoint`` per signal, from the explicit arguments and ``environ``.

    ``endpoint`` is a base, like ``OTEL_EXPORTER_OTLP_ENDPOINT``: it overrides
    every endpoint variable, and OTLP/HTTP appends each signal's path to it.
    ``headers`` replaces the headers from the environment rather than merging,
    so a caller can always drop a stale token.  ``source`` is how errors name
    the explicit endpoint (for example ``--otlp-endpoint``).
    """
    env = os.environ if environ is None else environ
    explicit_protocol = None if protocol is None else _parse_protocol(protocol, "protocol")
    explicit_compression = (
        None if compression is None else _parse_compression(compression, "compression")
    )
    explicit_timeout = None if timeout_s is None else check_timeout_s(timeout_s)
    explicit_headers = None if headers is None else check_headers(headers, "headers")
    return {
        signal: _resolve(
            env, signal,
            endpoint=endpoint, source=source, protocol=explicit_protocol,
            headers=explicit_headers, compression=explicit_compression,
            timeout_s=explicit_timeout,
        )
        for signal in Signal
    }


def endpoint_in_environment(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names a Collector for profiles.

    Setting ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the profiles one) is how
    OpenTelemetry deployments say "export here", so the CLI exports OTLP by
    default when it is set.
    """
    env = os.environ if environ is None else environ
    return any(
        env_value(env, f"{PREFIX}{infix}ENDPOINT") is not None for infix in ("", "PROFILES_")
    )


def resource_attributes(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` as a dict, with ``OTEL_SERVICE_NAME`` on top.

    No ``service.name`` key when neither variable sets it: the caller picks
    the default (the specification's ``unknown_service:<executable>``).  A
    malformed list is refused rather than discarded, because dropping it
    silently would ship data under the wrong service.
    """
    env = os.environ if environ is None else environ
    name = "OTEL_RESOURCE_ATTRIBUTES"
    raw = env_value(env, name)
    attributes = {} if raw is None else parse_pairs(raw, name, lower_keys=False)
    service = env_value(env, "OTEL_SERVICE_NAME")
    if service is not None:
        attributes["service.name"] = service
    return attributes


# -- resolution ---------------------------------------------------------------


def _resolve(
    env: Mapping[str, str],
    signal: Signal,
    *,
    endpoint: str | None,
    source: str,
    protocol: Protocol | None,
    headers: tuple[tuple[str, str], ...] | None,
    compression: Compression | None,
    timeout_s: float | None,
) -> Endpoint:
    if protocol is None:
        found = lookup(env, signal, "PROTOCOL")
        protocol = _DEFAULT_PROTOCOL if found is None else _parse_protocol(found[1], found[0])

    found = lookup(env, signal, "INSECURE")
    insecure_flag = False if found is None else parse_bool(found[1], found[0])

    # Which endpoint applies, and whether it is a base (signal path appended
    # for HTTP) or a per-signal URL used as is.
    per_signal = f"{PREFIX}{signal.upper()}_ENDPOINT"
    if endpoint is not None:
        raw, name, is_base = endpoint, source, True
    elif (value := env_value(env, per_signal)) is not None:
        raw, name, is_base = value, per_signal, False
    elif (value := env_value(env, f"{PREFIX}ENDPOINT")) is not None:
        raw, name, is_base = value, f"{PREFIX}ENDPOINT", True
    else:
        raw, name, is_base = DEFAULT_ENDPOINTS[protocol], "default endpoint", True
    url, insecure = _parse_endpoint(
        raw, name, protocol, signal if is_base else None, insecure_flag
    )

    if headers is None:
        found = lookup(env, signal, "HEADERS")
        headers = () if found is None else tuple(
            parse_pairs(found[1], found[0], lower_keys=True).items()
        )
    if compression is None:
        found = lookup(env, signal, "COMPRESSION")
        compression = Compression.NONE if found is None else _parse_compression(found[1], found[0])
    if timeout_s is None:
        found = lookup(env, signal, "TIMEOUT")
        timeout_s = DEFAULT_TIMEOUT_S if found is None else parse_timeout_ms(found[1], found[0])

    certificate = readable_file(env, signal, "CERTIFICATE")
    client_key = readable_file(env, signal, "CLIENT_KEY")
    client_certificate = readable_file(env, signal, "CLIENT_CERTIFICATE")
    # Mutual TLS needs both halves; with one, the TLS libraries fail later
    # with a message that names neither variable.
    for have, lack in ((client_key, client_certificate), (client_certificate, client_key)):
        if have is not None and lack is None:
            missing = "CLIENT_KEY" if have is client_certificate else "CLIENT_CERTIFICATE"
            raise ConfigError(
                f"{have[0]}: set without {PREFIX}[{signal.upper()}_]{missing} "
                f"(client TLS needs both a key and a certificate)"
            )

    return Endpoint(
        signal=signal, protocol=protocol, url=url, headers=headers,
        compression=compression, timeout_s=timeout_s, insecure=insecure,
        certificate=_path(certificate), client_key=_path(client_key),
        client_certificate=_path(client_certificate),
    )


def _path(found: tuple[str, str] | None) -> str | None:
    return None if found is None else found[1]


# -- parsers: each raises ConfigError naming ``name`` --------------------------


def _parse_endpoint(
    value: str, name: str, protocol: Protocol, append_for: Signal | None, insecure_flag: bool,
) -> tuple[str, bool]:
    """(normalised URL, insecure) for ``value``; ``append_for`` marks a base URL.

    Parsed by hand around ``urlsplit`` because ``urlsplit`` accepts far too
    much ("localhost:4317" becomes scheme "localhost") and what its ``.port``
    accepts has changed between Python versions.
    """
    def bad(reason: str) -> ConfigError:
        return ConfigError(
            f"{name}: {value!r} is not a valid OTLP endpoint "
            f"(expected a URL like {_EXAMPLES[protocol]}): {reason}"
        )

    value = value.strip()
    if not value or any(c.isspace() for c in value):
        raise bad("it contains spaces" if value else "it is empty")

    if "://" not in value:
        # gRPC alone accepts the "host:port" form; _INSECURE picks the scheme.
        if protocol is not Protocol.GRPC:
            raise bad("it has no http:// or https:// scheme")
        if any(c in value for c in "/?#@"):
            raise bad("without a scheme only host:port is accepted")
        host, port = split_hostport(value, bad)
        scheme = "http" if insecure_flag else "https"
        port = _DEFAULT_PORTS[protocol] if port is None else port
        return f"{scheme}://{host}:{port}", insecure_flag

    try:
        parts = urlsplit(value)
    except ValueError:  # an unbalanced IPv6 bracket, say
        raise bad("it cannot be parsed as a URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise bad(f"scheme {parts.scheme!r} is not http or https")
    if "@" in parts.netloc:
        # Refused rather than kept: the URL is echoed in logs and errors.
        raise bad("credentials belong in OTEL_EXPORTER_OTLP_HEADERS, not the URL")
    host, port = split_hostport(parts.netloc, bad)
    if port is None:  # a URL means what it says: the scheme's own port
        port = 443 if scheme == "https" else 80
    netloc = f"{host}:{port}"
    if protocol is Protocol.GRPC:
        return f"{scheme}://{netloc}", scheme == "http"
    path = parts.path
    if append_for is not None:
        path = f"{path.rstrip('/')}/{HTTP_PATHS[append_for]}"
    return urlunsplit((scheme, netloc, path, parts.query, "")), scheme == "http"




def _parse_protocol(value: Protocol | str, name: str) -> Protocol:
    text = str(value).strip().lower()
    if text == "http/json":
        raise ConfigError(
            f"{name}: 'http/json' is not supported (use grpc or http/protobuf)"
        )
    try:
        return Protocol(text)
    except ValueError:
        raise ConfigError(
            f"{name}: {value!r} is not an OTLP protocol (expected grpc or http/protobuf)"
        ) from None


def _parse_compression(value: Compression | str, name: str) -> Compression:
    try:
        return Compression(str(value).strip().lower())
    except ValueError:
        raise ConfigError(
            f"{name}: {value!r} is not an OTLP compression (expected gzip or none)"
        ) from None
