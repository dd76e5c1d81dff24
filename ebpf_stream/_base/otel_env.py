"""Reading the ``OTEL_*`` variables: lookups, and the parsers their values share.

Each parser takes the variable's name and puts it in its ``ConfigError``,
so a typo in a manifest stops the CLI with one line naming the variable.
``otlp_settings`` builds the endpoints from these; the integrations read
their own variables with ``env_value`` under the same rules.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from urllib.parse import unquote

from .errors import ConfigError

PREFIX = "OTEL_EXPORTER_OTLP_"
# RFC 9110 token: what an HTTP header name may contain.  gRPC metadata keys are
# stricter still, but the channel reports those itself.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Milliseconds as the specification writes them: digits, optionally a fraction.
# Not float(): it would take "inf", "nan", "1e3" and "1_000".
_MILLIS = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value, stripped; empty counts as unset, as the OTLP spec says."""
    value = env.get(name, "").strip()
    return value or None


def lookup(env: Mapping[str, str], signal: str, setting: str) -> tuple[str, str] | None:
    """(variable name, value) of the per-signal variable, else the generic one."""
    for name in (f"{PREFIX}{signal.upper()}_{setting}", f"{PREFIX}{setting}"):
        value = env_value(env, name)
        if value is not None:
            return name, value
    return None


def readable_file(env: Mapping[str, str], signal: str, setting: str) -> tuple[str, str] | None:
    """(variable, path) of the per-signal or generic variable; the path must be readable."""
    found = lookup(env, signal, setting)
    if found is None:
        return None
    name, path = found
    if not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise ConfigError(f"{name}: {path!r} is not a readable file")
    return found


def split_hostport(netloc: str, bad: Callable[[str], ConfigError]) -> tuple[str, int | None]:
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


def parse_timeout_ms(value: str, name: str) -> float:
    if _MILLIS.fullmatch(value) is None or float(value) <= 0:
        raise ConfigError(
            f"{name}: {value!r} is not a valid timeout (expected milliseconds > 0, like 10000)"
        )
    return float(value) / 1000.0


def check_timeout_s(value: float) -> float:
    # Exact types: a bool is not a duration.
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"timeout_s: {value!r} is not a valid timeout (expected seconds > 0)")
    return float(value)


def parse_bool(value: str, name: str) -> bool:
    text = value.lower()
    if text not in ("true", "false"):
        raise ConfigError(f"{name}: {value!r} is not a boolean (expected true or false)")
    return text == "true"


def parse_pairs(value: str, name: str, *, lower_keys: bool) -> dict[str, str]:
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


def check_headers(headers: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
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
