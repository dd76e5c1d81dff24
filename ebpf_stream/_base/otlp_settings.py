"""Where and how OTLP data is sent: the standard ``OTEL_*`` variables, resolved.

The OpenTelemetry OTLP exporter specification defines one generic variable
per setting (``OTEL_EXPORTER_OTLP_ENDPOINT``) and one per signal
(``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``).  Following it lets a deployment
that already configures an OpenTelemetry SDK point ebpf-stream at the same
Collector without learning new flags.  Everything is resolved and checked
up front, once: a typo in a manifest should stop the CLI with one line
naming the variable, not surface as a connection error minutes later.

Precedence per setting: explicit argument > per-signal variable > generic
variable > default.  Empty variables count as unset.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from .errors import ConfigError

__all__ = [
    "DEFAULT_ENDPOINTS",
    "DEFAULT_TIMEOUT_S",
    "HTTP_PATHS",
    "Compression",
    "Endpoint",
    "Protocol",
    "Signal",
    "endpoint_in_environment",
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
_PREFIX = "OTEL_EXPORTER_OTLP_"
# RFC 9110 token: what an HTTP header name may contain.  gRPC metadata keys are
# stricter still, but the channel reports those itself.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Milliseconds as the specification writes them: digits, optionally a fraction.
# Not float(): it would take "inf", "nan", "1e3" and "1_000".
_MILLIS = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    explicit_timeout = None if timeout_s is None else _check_timeout_s(timeout_s)
    explicit_headers = None if headers is None else _check_headers(headers, "headers")
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
        env_value(env, f"{_PREFIX}{infix}ENDPOINT") is not None for infix in ("", "PROFILES_")
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
    attributes = {} if raw is None else _parse_pairs(raw, name, lower_keys=False)
    service = env_value(env, "OTEL_SERVICE_NAME")
    if service is not None:
        attributes["service.name"] = service
    return attributes


# -- resolution ---------------------------------------------------------------


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value, stripped; empty counts as unset, as the OTLP spec says."""
    value = env.get(name, "").strip()
    return value or None


def _lookup(env: Mapping[str, str], signal: Signal, setting: str) -> tuple[str, str] | None:
    """(variable name, value) of the per-signal variable, else the generic one."""
    for name in (f"{_PREFIX}{signal.upper()}_{setting}", f"{_PREFIX}{setting}"):
        value = env_value(env, name)
        if value is not None:
            return name, value
    return None


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
        found = _lookup(env, signal, "PROTOCOL")
        protocol = _DEFAULT_PROTOCOL if found is None else _parse_protocol(found[1], found[0])

    found = _lookup(env, signal, "INSECURE")
    insecure_flag = False if found is None else _parse_bool(found[1], found[0])

    # Which endpoint applies, and whether it is a base (signal path appended
    # for HTTP) or a per-signal URL used as is.
    per_signal = f"{_PREFIX}{signal.upper()}_ENDPOINT"
    if endpoint is not None:
        raw, name, is_base = endpoint, source, True
    elif (value := env_value(env, per_signal)) is not None:
        raw, name, is_base = value, per_signal, False
    elif (value := env_value(env, f"{_PREFIX}ENDPOINT")) is not None:
        raw, name, is_base = value, f"{_PREFIX}ENDPOINT", True
    else:
        raw, name, is_base = DEFAULT_ENDPOINTS[protocol], "default endpoint", True
    url, insecure = _parse_endpoint(
        raw, name, protocol, signal if is_base else None, insecure_flag
    )

    if headers is None:
        found = _lookup(env, signal, "HEADERS")
        headers = () if found is None else tuple(
            _parse_pairs(found[1], found[0], lower_keys=True).items()
        )
    if compression is None:
        found = _lookup(env, signal, "COMPRESSION")
        compression = Compression.NONE if found is None else _parse_compression(found[1], found[0])
    if timeout_s is None:
        found = _lookup(env, signal, "TIMEOUT")
        timeout_s = DEFAULT_TIMEOUT_S if found is None else _parse_timeout_ms(found[1], found[0])

    certificate = _file(env, signal, "CERTIFICATE")
    client_key = _file(env, signal, "CLIENT_KEY")
    client_certificate = _file(env, signal, "CLIENT_CERTIFICATE")
    # Mutual TLS needs both halves; with one, the TLS libraries fail later
    # with a message that names neither variable.
    for have, lack in ((client_key, client_certificate), (client_certificate, client_key)):
        if have is not None and lack is None:
            missing = "CLIENT_KEY" if have is client_certificate else "CLIENT_CERTIFICATE"
            raise ConfigError(
                f"{have[0]}: set without {_PREFIX}[{signal.upper()}_]{missing} "
                f"(client TLS needs both a key and a certificate)"
            )

    return Endpoint(
        signal=signal, protocol=protocol, url=url, headers=headers,
        compression=compression, timeout_s=timeout_s, insecure=insecure,
        certificate=_path(certificate), client_key=_path(client_key),
        client_certificate=_path(client_certificate),
    )


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
        host, port = _split_hostport(value, bad)
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
    host, port = _split_hostport(parts.netloc, bad)
    if port is None:  # a URL means what it says: the scheme's own port
        port = 443 if scheme == "https" else 80
    netloc = f"{host}:{port}"
    if protocol is Protocol.GRPC:
        return f"{scheme}://{netloc}", scheme == "http"
    path = parts.path
    if append_for is not None:
        path = f"{path.rstrip('/')}/{HTTP_PATHS[append_for]}"
    return urlunsplit((scheme, netloc, path, parts.query, "")), scheme == "http"


def _split_hostport(netloc: str, bad: Callable[[str], ConfigError]) -> tuple[str, int | None]:
    """(host, port or None) of ``host[:port]``; IPv6 hosts stay bracketed."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 2:
            raise bad("the IPv6 address is not closed with ]" if end < 0 else "it has no host")
        host, rest = netloc[: end + 1], netloc[end + 1:]
        if rest and not rest.startswith(":"):
            raise bad("unexpected text after the IPv6 address")
        port_text: str | None = rest[1:] if rest else None
    else:
        host, sep, port_text = netloc.partition(":")
        if ":" in port_text:
            raise bad("IPv6 addresses must be in brackets, like [::1]:4317")
        port_text = port_text if sep else None
    if not host:
        raise bad("it has no host")
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise bad(f"port {port_text!r} is not an integer 1-65535")
    return host, int(port_text)


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


def _parse_timeout_ms(value: str, name: str) -> float:
    if _MILLIS.fullmatch(value) is None or float(value) <= 0:
        raise ConfigError(
            f"{name}: {value!r} is not a valid timeout (expected milliseconds > 0, like 10000)"
        )
    return float(value) / 1000.0


def _check_timeout_s(value: float) -> float:
    # Exact types: a bool is not a duration.
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"timeout_s: {value!r} is not a valid timeout (expected seconds > 0)")
    return float(value)


def _parse_bool(value: str, name: str) -> bool:
    text = value.lower()
    if text not in ("true", "false"):
        raise ConfigError(f"{name}: {value!r} is not a boolean (expected true or false)")
    return text == "true"


def _parse_pairs(value: str, name: str, *, lower_keys: bool) -> dict[str, str]:
    """``k=v,k2=v2`` (W3C-baggage-like) with percent-decoded values.

    Splits on the first ``=`` only: base64 tokens end in ``=``.  Empty members
    (a trailing comma) are skipped; a later duplicate key wins.
    """
    pairs: dict[str, str] = {}
    for member in value.split(","):
        if not member.strip():
            continue
        key, sep, raw = member.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"{name}: {member.strip()!r} is not a key=value pair "
                f"(expected a list like key1=value1,key2=value2)"
            )
        if lower_keys:
            key, decoded = _check_header(key, unquote(raw.strip()), name)
        else:
            decoded = unquote(raw.strip())
        pairs[key] = decoded
    return pairs


def _check_headers(headers: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    checked = dict(_check_header(key.strip(), value, name) for key, value in headers.items())
    return tuple(checked.items())


def _check_header(key: str, value: str, name: str) -> tuple[str, str]:
    """Lower-cased key and value, refusing what no HTTP/2 stack would send.

    gRPC metadata keys must be lower-case; checking here gives a message
    naming the variable instead of a failure on the first export.
    """
    if _TOKEN.fullmatch(key) is None:
        raise ConfigError(f"{name}: {key!r} is not a valid header name")
    if _CONTROL.search(value):
        raise ConfigError(f"{name}: the value of {key!r} contains control characters")
    return key.lower(), value


def _file(env: Mapping[str, str], signal: Signal, setting: str) -> tuple[str, str] | None:
    """(variable, path) of the per-signal or generic variable; the path must be readable."""
    found = _lookup(env, signal, setting)
    if found is None:
        return None
    name, path = found
    if not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise ConfigError(f"{name}: {path!r} is not a readable file")
    return found


def _path(found: tuple[str, str] | None) -> str | None:
    return None if found is None else found[1]
