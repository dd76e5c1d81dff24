from __future__ import annotations

import re
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from ebpf_stream._base.errors import ConfigError
from ebpf_stream._base.otlp_settings import (
    DEFAULT_ENDPOINTS,
    DEFAULT_TIMEOUT_S,
    HTTP_PATHS,
    Compression,
    Endpoint,
    Protocol,
    Signal,
    endpoint_in_environment,
    otlp_endpoints,
    resource_attributes,
)

P = "OTEL_EXPORTER_OTLP_"


def metrics(environ: dict[str, str] | None = None, **kwargs: object) -> Endpoint:
    return otlp_endpoints(environ or {}, **kwargs)[Signal.METRICS]  # type: ignore[arg-type]


def refused(message: str) -> AbstractContextManager[pytest.ExceptionInfo[ConfigError]]:
    return pytest.raises(ConfigError, match=re.escape(message))


# -- defaults -----------------------------------------------------------------


def test_defaults_are_http_protobuf_to_localhost() -> None:
    endpoints = otlp_endpoints({})
    assert set(endpoints) == set(Signal)
    for signal, ep in endpoints.items():
        assert ep.signal is signal
        assert ep.protocol is Protocol.HTTP_PROTOBUF
        assert ep.url == f"http://localhost:4318/{HTTP_PATHS[signal]}"
        assert ep.headers == ()
        assert ep.compression is Compression.NONE
        assert ep.timeout_s == DEFAULT_TIMEOUT_S == 10.0
        assert ep.insecure is True
        assert (ep.certificate, ep.client_key, ep.client_certificate) == (None, None, None)


def test_http_paths_are_the_collectors() -> None:
    assert dict(HTTP_PATHS) == {
        Signal.PROFILES: "v1development/profiles",
        Signal.METRICS: "v1/metrics",
        Signal.LOGS: "v1/logs",
    }
    assert dict(DEFAULT_ENDPOINTS) == {
        Protocol.GRPC: "http://localhost:4317",
        Protocol.HTTP_PROTOBUF: "http://localhost:4318",
    }


def test_grpc_default_endpoint() -> None:
    ep = metrics({P + "PROTOCOL": "grpc"})
    assert ep.protocol is Protocol.GRPC
    assert ep.url == "http://localhost:4317"
    assert ep.grpc_target == "localhost:4317"
    assert ep.insecure is True
    assert ep.display == "grpc http://localhost:4317"


def test_empty_variables_count_as_unset() -> None:
    env = {P + "ENDPOINT": "", P + "METRICS_ENDPOINT": "  ", P + "PROTOCOL": "",
           P + "HEADERS": "", P + "TIMEOUT": "", P + "INSECURE": "", P + "CERTIFICATE": ""}
    assert metrics(env) == metrics({})


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(P + "ENDPOINT", "http://from-os-environ:4318")
    assert otlp_endpoints()[Signal.LOGS].url == "http://from-os-environ:4318/v1/logs"
    assert endpoint_in_environment()


# -- precedence ---------------------------------------------------------------


def test_per_signal_variables_beat_generic_ones() -> None:
    env = {
        P + "ENDPOINT": "http://generic:4318",
        P + "LOGS_ENDPOINT": "http://logs:9999/custom/path",
        P + "PROTOCOL": "http/protobuf",
        P + "METRICS_PROTOCOL": "grpc",
        P + "HEADERS": "a=generic",
        P + "PROFILES_HEADERS": "a=profiles",
        P + "COMPRESSION": "none",
        P + "LOGS_COMPRESSION": "gzip",
        P + "TIMEOUT": "2000",
        P + "PROFILES_TIMEOUT": "500",
    }
    eps = otlp_endpoints(env)
    prof, met, logs = eps[Signal.PROFILES], eps[Signal.METRICS], eps[Signal.LOGS]
    assert prof.url == "http://generic:4318/v1development/profiles"
    assert met.protocol is Protocol.GRPC and met.url == "http://generic:4318"
    # A per-signal endpoint is used as is: no signal path appended.
    assert logs.url == "http://logs:9999/custom/path"
    assert prof.headers == (("a", "profiles"),)
    assert met.headers == logs.headers == (("a", "generic"),)
    assert logs.compression is Compression.GZIP and prof.compression is Compression.NONE
    assert prof.timeout_s == 0.5 and met.timeout_s == 2.0


def test_explicit_arguments_beat_every_variable() -> None:
    env = {
        P + "ENDPOINT": "http://generic:4318",
        P + "METRICS_ENDPOINT": "http://metrics:4318/v1/metrics",
        P + "METRICS_PROTOCOL": "grpc",
        P + "METRICS_HEADERS": "a=env,b=env",
        P + "METRICS_COMPRESSION": "gzip",
        P + "METRICS_TIMEOUT": "1",
    }
    ep = metrics(
        env, endpoint="http://explicit:4318/base", protocol="http/protobuf",
        headers={"X-Token": "t"}, compression="none", timeout_s=3,
    )
    assert ep.url == "http://explicit:4318/base/v1/metrics"
    assert ep.protocol is Protocol.HTTP_PROTOBUF
    assert ep.headers == (("x-token", "t"),)  # replaced, not merged
    assert ep.compression is Compression.NONE
    assert ep.timeout_s == 3.0 and type(ep.timeout_s) is float


def test_explicit_enum_values_are_accepted() -> None:
    ep = metrics(protocol=Protocol.GRPC, compression=Compression.GZIP)
    assert ep.protocol is Protocol.GRPC and ep.compression is Compression.GZIP


def test_explicit_empty_headers_drop_the_environments() -> None:
    assert metrics({P + "HEADERS": "a=b"}, headers={}).headers == ()


# -- endpoint URLs ------------------------------------------------------------


@pytest.mark.parametrize(("base", "url"), [
    ("http://h:4318", "http://h:4318/v1/metrics"),
    ("http://h:4318/", "http://h:4318/v1/metrics"),
    ("http://h:4318/otel", "http://h:4318/otel/v1/metrics"),
    ("http://h:4318/otel/", "http://h:4318/otel/v1/metrics"),
    ("HTTP://h:4318", "http://h:4318/v1/metrics"),
    ("http://h", "http://h:80/v1/metrics"),
    ("https://h", "https://h:443/v1/metrics"),
    ("https://h:8443/x/", "https://h:8443/x/v1/metrics"),
    ("http://[::1]:4318", "http://[::1]:4318/v1/metrics"),
])
def test_http_base_endpoints_get_the_signal_path(base: str, url: str) -> None:
    assert metrics({P + "ENDPOINT": base}).url == url
    assert metrics(endpoint=base).url == url


def test_http_insecure_follows_the_scheme() -> None:
    assert metrics(endpoint="http://h").insecure is True
    assert metrics(endpoint="https://h").insecure is False


def test_per_signal_http_endpoint_keeps_its_path_and_the_schemes_port() -> None:
    assert metrics({P + "METRICS_ENDPOINT": "https://h/ingest"}).url == "https://h:443/ingest"
    assert metrics({P + "METRICS_ENDPOINT": "http://h"}).url == "http://h:80"


@pytest.mark.parametrize(("value", "url", "target", "insecure"), [
    ("http://h:4317", "http://h:4317", "h:4317", True),
    ("http://h:4317/ignored/path", "http://h:4317", "h:4317", True),
    ("http://h", "http://h:80", "h:80", True),
    ("https://h", "https://h:443", "h:443", False),
    ("https://h:4317", "https://h:4317", "h:4317", False),
    ("http://[::1]:4317", "http://[::1]:4317", "[::1]:4317", True),
])
def test_grpc_endpoints_keep_only_scheme_host_and_port(
    value: str, url: str, target: str, insecure: bool,
) -> None:
    ep = metrics({P + "PROTOCOL": "grpc", P + "METRICS_ENDPOINT": value})
    assert (ep.url, ep.grpc_target, ep.insecure) == (url, target, insecure)
    assert ep.display == f"grpc {url}"


def test_grpc_https_url_ignores_insecure_variable() -> None:
    ep = metrics({P + "PROTOCOL": "grpc", P + "INSECURE": "true"}, endpoint="https://h:4317")
    assert ep.insecure is False


def test_grpc_scheme_less_endpoint_is_secure_by_default() -> None:
    ep = metrics({P + "PROTOCOL": "grpc", P + "ENDPOINT": "collector:4317"})
    assert (ep.url, ep.grpc_target, ep.insecure) == ("https://collector:4317", "collector:4317",
                                                     False)


@pytest.mark.parametrize("flag", ["true", "TRUE", "True"])
def test_grpc_scheme_less_endpoint_uses_insecure(flag: str) -> None:
    ep = metrics({P + "PROTOCOL": "grpc", P + "ENDPOINT": "collector:4317", P + "INSECURE": flag})
    assert (ep.url, ep.insecure) == ("http://collector:4317", True)


def test_per_signal_insecure_beats_generic() -> None:
    env = {P + "PROTOCOL": "grpc", P + "ENDPOINT": "c:4317",
           P + "INSECURE": "true", P + "LOGS_INSECURE": "false"}
    eps = otlp_endpoints(env)
    assert eps[Signal.METRICS].insecure is True
    assert eps[Signal.LOGS].insecure is False


def test_grpc_scheme_less_without_port_gets_4317() -> None:
    ep = metrics({P + "PROTOCOL": "grpc"}, endpoint="collector")
    assert ep.grpc_target == "collector:4317"
    assert metrics(protocol="grpc", endpoint="[::1]").grpc_target == "[::1]:4317"


def test_http_display_is_the_url() -> None:
    assert metrics(endpoint="http://127.0.0.1:4318").display == "http://127.0.0.1:4318/v1/metrics"


@pytest.mark.parametrize(("value", "reason"), [
    ("htp//x", "no http:// or https:// scheme"),
    ("collector:4318", "no http:// or https:// scheme"),
    ("ftp://h:4318", "scheme 'ftp' is not http or https"),
    ("http://", "no host"),
    ("http://:4318", "no host"),
    ("http://h:0", "port '0' is not an integer 1-65535"),
    ("http://h:65536", "port '65536' is not an integer 1-65535"),
    ("http://h:port", "port 'port' is not an integer 1-65535"),
    ("http://h:-1", "port '-1' is not an integer 1-65535"),
    ("http://h:", "port '' is not an integer 1-65535"),
    ("http://h ost:4318", "spaces"),
    ("http://[::1:4318", "cannot be parsed"),
    ("http://::1:4318", "IPv6 addresses must be in brackets"),
    ("http://user:pw@h:4318", "credentials"),
])
def test_malformed_http_endpoints_name_the_variable(value: str, reason: str) -> None:
    expected = f"{P}ENDPOINT: {value!r} is not a valid OTLP endpoint (expected a URL like " \
               "http://collector:4318)"
    with refused(expected) as info:
        metrics({P + "ENDPOINT": value})
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_per_signal_endpoint_names_its_variable() -> None:
    with refused(f"{P}PROFILES_ENDPOINT: 'ftp://x'"):
        otlp_endpoints({P + "PROFILES_ENDPOINT": "ftp://x"})


def test_malformed_explicit_endpoint_names_the_source() -> None:
    with refused("--otlp-endpoint: 'htp//x' is not a valid OTLP endpoint"):
        otlp_endpoints({}, endpoint="htp//x", source="--otlp-endpoint")
    with refused("endpoint: 'http://h:99999'"):
        otlp_endpoints({}, endpoint="http://h:99999")


@pytest.mark.parametrize("value", [
    "htp//x", "c:4317/path", "c:99999", "c:", ":4317", "user@c:4317", "c:43 17", "::1",
])
def test_malformed_grpc_endpoints(value: str) -> None:
    with refused(f"{P}ENDPOINT: {value!r} is not a valid OTLP endpoint (expected a URL like "
                 "http://collector:4317"):
        metrics({P + "PROTOCOL": "grpc", P + "ENDPOINT": value})


# -- protocol -----------------------------------------------------------------


@pytest.mark.parametrize(("value", "protocol"), [
    ("grpc", Protocol.GRPC), ("GRPC", Protocol.GRPC),
    ("http/protobuf", Protocol.HTTP_PROTOBUF), ("HTTP/Protobuf", Protocol.HTTP_PROTOBUF),
])
def test_protocol_is_case_insensitive(value: str, protocol: Protocol) -> None:
    assert metrics({P + "PROTOCOL": value}).protocol is protocol
    assert metrics(protocol=value).protocol is protocol


def test_http_json_is_refused_with_alternatives() -> None:
    with refused(f"{P}PROTOCOL: 'http/json' is not supported (use grpc or http/protobuf)"):
        metrics({P + "PROTOCOL": "http/json"})
    with refused(f"{P}LOGS_PROTOCOL: 'http/json' is not supported"):
        otlp_endpoints({P + "LOGS_PROTOCOL": "HTTP/JSON"})
    with refused("protocol: 'http/json' is not supported"):
        metrics(protocol="http/json")


def test_unknown_protocol_names_the_variable() -> None:
    with refused(f"{P}METRICS_PROTOCOL: 'thrift' is not an OTLP protocol "
                 "(expected grpc or http/protobuf)"):
        metrics({P + "METRICS_PROTOCOL": "thrift"})


# -- headers ------------------------------------------------------------------


def test_headers_are_decoded_stripped_and_lower_cased() -> None:
    env = {P + "HEADERS":
           " API-Key = secret%20value , X-Tenant=a%2Cb,Authorization=Basic YWI6Y2Q=,"}
    assert metrics(env).headers == (
        ("api-key", "secret value"),
        ("x-tenant", "a,b"),
        ("authorization", "Basic YWI6Y2Q="),
    )


def test_header_value_may_be_empty() -> None:
    assert metrics({P + "HEADERS": "k="}).headers == (("k", ""),)


def test_explicit_header_keys_are_lower_cased() -> None:
    assert metrics(headers={"Authorization": "Bearer x"}).headers == (
        ("authorization", "Bearer x"),
    )


@pytest.mark.parametrize(("value", "message"), [
    ("novalue", "'novalue' is not a key=value pair"),
    ("a=b,=c", "'=c' is not a key=value pair"),
    ("a b=c", "'a b' is not a valid header name"),
    ("a=%0d%0aInjected: x", "the value of 'a' contains control characters"),
])
def test_malformed_headers_name_the_variable(value: str, message: str) -> None:
    with refused(f"{P}METRICS_HEADERS: {message}"):
        metrics({P + "METRICS_HEADERS": value})


def test_malformed_explicit_header_is_refused() -> None:
    with refused("headers: 'bad key' is not a valid header name"):
        metrics(headers={"bad key": "v"})


# -- compression --------------------------------------------------------------


def test_compression() -> None:
    assert metrics({P + "COMPRESSION": "GZIP"}).compression is Compression.GZIP
    assert metrics({P + "COMPRESSION": "none"}).compression is Compression.NONE
    with refused(f"{P}COMPRESSION: 'zstd' is not an OTLP compression (expected gzip or none)"):
        metrics({P + "COMPRESSION": "zstd"})
    with refused("compression: 'br'"):
        metrics(compression="br")


# -- timeout ------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    ("10000", 10.0), ("1500", 1.5), ("250.5", 0.2505), ("1", 0.001), (".5", 0.0005),
])
def test_timeout_variables_are_milliseconds(value: str, seconds: float) -> None:
    assert metrics({P + "TIMEOUT": value}).timeout_s == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1e3", "inf", "nan", "10s", "0.0"])
def test_invalid_timeout_variables_name_the_variable(value: str) -> None:
    with refused(f"{P}LOGS_TIMEOUT: {value!r} is not a valid timeout (expected milliseconds"):
        otlp_endpoints({P + "LOGS_TIMEOUT": value})


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True])
def test_invalid_explicit_timeout(value: float) -> None:
    with refused("timeout_s: ") as info:
        metrics(timeout_s=value)
    assert "expected seconds > 0" in str(info.value)


# -- insecure and certificates -------------------------------------------------


def test_invalid_insecure_names_the_variable() -> None:
    with refused(f"{P}METRICS_INSECURE: 'yes' is not a boolean (expected true or false)"):
        metrics({P + "METRICS_INSECURE": "yes"})


def test_certificates_must_be_readable_files(tmp_path: Path) -> None:
    ca, key, cert, metrics_cert = (
        tmp_path / n for n in ("ca.pem", "key.pem", "cert.pem", "metrics.pem")
    )
    for f in (ca, key, cert, metrics_cert):
        f.write_text("x")
    env = {P + "CERTIFICATE": str(ca), P + "CLIENT_KEY": str(key),
           P + "CLIENT_CERTIFICATE": str(cert), P + "METRICS_CLIENT_CERTIFICATE": str(metrics_cert)}
    eps = otlp_endpoints(env)
    ep = eps[Signal.METRICS]
    assert (ep.certificate, ep.client_key, ep.client_certificate) == (
        str(ca), str(key), str(metrics_cert),
    )
    assert eps[Signal.LOGS].client_certificate == str(cert)

    missing = tmp_path / "missing.pem"
    with refused(f"{P}LOGS_CERTIFICATE: {str(missing)!r} is not a readable file"):
        otlp_endpoints({P + "LOGS_CERTIFICATE": str(missing)})
    with refused(f"{P}CLIENT_KEY: {str(tmp_path)!r} is not a readable file"):
        otlp_endpoints({P + "CLIENT_KEY": str(tmp_path)})


def test_client_key_without_certificate_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    with refused(f"{P}CLIENT_KEY: set without {P}[PROFILES_]CLIENT_CERTIFICATE"):
        otlp_endpoints({P + "CLIENT_KEY": str(key)})


# -- endpoint_in_environment ---------------------------------------------------


@pytest.mark.parametrize(("env", "expected"), [
    ({}, False),
    ({P + "ENDPOINT": ""}, False),
    ({P + "ENDPOINT": "http://c:4318"}, True),
    ({P + "PROFILES_ENDPOINT": "http://c:4318/v1development/profiles"}, True),
    ({P + "PROFILES_ENDPOINT": " "}, False),
    ({P + "METRICS_ENDPOINT": "http://c:4318/v1/metrics"}, False),
])
def test_endpoint_in_environment(env: dict[str, str], expected: bool) -> None:
    assert endpoint_in_environment(env) is expected


# -- resource attributes -------------------------------------------------------


def test_resource_attributes_are_decoded_and_stripped() -> None:
    env = {"OTEL_RESOURCE_ATTRIBUTES":
           " deployment.environment = prod , team=a%20b%2Cc,empty=,host.name=h%3D1"}
    assert resource_attributes(env) == {
        "deployment.environment": "prod", "team": "a b,c", "empty": "", "host.name": "h=1",
    }


def test_no_service_name_unless_set() -> None:
    assert resource_attributes({}) == {}
    assert "service.name" not in resource_attributes({"OTEL_RESOURCE_ATTRIBUTES": "a=b"})


def test_service_name_variable_wins() -> None:
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,a=b"}
    assert resource_attributes(env)["service.name"] == "from-attrs"
    env["OTEL_SERVICE_NAME"] = "from-var"
    assert resource_attributes(env) == {"service.name": "from-var", "a": "b"}
    env["OTEL_SERVICE_NAME"] = ""
    assert resource_attributes(env)["service.name"] == "from-attrs"


def test_resource_attribute_keys_keep_their_case() -> None:
    assert resource_attributes({"OTEL_RESOURCE_ATTRIBUTES": "K8s.Pod=x"}) == {"K8s.Pod": "x"}


def test_malformed_resource_attributes_name_the_variable() -> None:
    with refused("OTEL_RESOURCE_ATTRIBUTES: 'oops' is not a key=value pair"):
        resource_attributes({"OTEL_RESOURCE_ATTRIBUTES": "a=b,oops"})
