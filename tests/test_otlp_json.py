"""OTLP/JSON lines: the Collector's file-exporter format, for files a Collector can replay."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    timestamp_pb2,
)
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.profiles.v1development import profiles_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2
from otlp_json_decode import decode_otlp_json

from ebpf_stream._convert.json import encode_otlp_json

TRACE_ID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SPAN_ID = bytes.fromhex("eee19b7ec3c1b174")
PARENT_ID = bytes.fromhex("eee19b7ec3c1b173")
PROFILE_ID = bytes(range(1, 17))
T0 = 1_544_712_660_000_000_000

# opentelemetry-proto examples/trace.json, verbatim: upper-case hex ids and 64-bit
# integers as plain numbers, both of which readers must accept.
EXAMPLE_TRACE = """{
  "resourceSpans": [
    {
      "resource": {
        "attributes": [
          {"key": "service.name", "value": {"stringValue": "my.service"}}
        ]
      },
      "scopeSpans": [
        {
          "scope": {
            "name": "my.library",
            "version": "1.0.0",
            "attributes": [
              {"key": "my.scope.attribute", "value": {"stringValue": "some scope attribute"}}
            ]
          },
          "spans": [
            {
              "traceId": "5B8EFFF798038103D269B633813FC60C",
              "spanId": "EEE19B7EC3C1B174",
              "parentSpanId": "EEE19B7EC3C1B173",
              "name": "I'm a server span",
              "startTimeUnixNano": 1544712660000000000,
              "endTimeUnixNano": 1544712661000000000,
              "kind": 2,
              "attributes": [
                {"key": "my.span.attr", "value": {"stringValue": "some value"}}
              ]
            }
          ]
        }
      ]
    }
  ]
}"""

# opentelemetry-proto examples/logs.json, the log record and its attributes verbatim.
EXAMPLE_LOGS = """{
  "resourceLogs": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]},
    "scopeLogs": [{
      "scope": {"name": "my.library", "version": "1.0.0"},
      "logRecords": [{
        "timeUnixNano": 1544712660300000000,
        "observedTimeUnixNano": 1544712660300000000,
        "severityText": "Information",
        "traceId": "5B8EFFF798038103D269B633813FC60C",
        "spanId": "EEE19B7EC3C1B174",
        "body": {"stringValue": "Example log record"},
        "attributes": [
          {"key": "string.attribute", "value": {"stringValue": "some string"}},
          {"key": "boolean.attribute", "value": {"boolValue": true}},
          {"key": "int.attribute", "value": {"intValue": 10}},
          {"key": "double.attribute", "value": {"doubleValue": 637.704}},
          {"key": "array.attribute", "value": {"arrayValue": {"values": [
            {"stringValue": "many"}, {"stringValue": "values"}]}}},
          {"key": "map.attribute", "value": {"kvlistValue": {"values": [
            {"key": "some.map.key", "value": {"stringValue": "some value"}}]}}}
        ]
      }]
    }]
  }]
}"""


# --- requests -----------------------------------------------------------------------------


def attributes() -> list[KeyValue]:
    """Every AnyValue shape, nested, with 64-bit extremes and a line break in a string."""
    nested = AnyValue(kvlist_value=KeyValueList(values=[
        KeyValue(key="list", value=AnyValue(array_value=ArrayValue(values=[
            AnyValue(int_value=-(2**63)),
            AnyValue(bytes_value=b"\x00\xffraw"),
            AnyValue(double_value=0.5),
            AnyValue(bool_value=True),
            AnyValue(array_value=ArrayValue()),
        ]))),
        KeyValue(key="empty", value=AnyValue(string_value="")),
        KeyValue(key="zero", value=AnyValue(int_value=0)),
    ]))
    return [
        KeyValue(key="text", value=AnyValue(string_value="line\nbreak\u2028é")),
        KeyValue(key="big", value=AnyValue(int_value=2**63 - 1)),
        KeyValue(key="nested", value=nested),
    ]


def resource() -> Resource:
    return Resource(attributes=[KeyValue(key="service.name",
                                         value=AnyValue(string_value="ebpf-stream"))])


SCOPE = InstrumentationScope(name="ebpf_stream", version="0.1.0")


def trace_request() -> ExportTraceServiceRequest:
    span = trace_pb2.Span(
        trace_id=TRACE_ID, span_id=SPAN_ID, parent_span_id=PARENT_ID, name="read",
        kind=trace_pb2.Span.SPAN_KIND_SERVER, start_time_unix_nano=T0,
        end_time_unix_nano=T0 + 1_000_000, attributes=attributes(), flags=0x300,
        events=[trace_pb2.Span.Event(time_unix_nano=T0 + 5, name="retry")],
        links=[trace_pb2.Span.Link(trace_id=TRACE_ID, span_id=PARENT_ID, flags=1)],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="boom"),
    )
    return ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource(),
        scope_spans=[trace_pb2.ScopeSpans(scope=SCOPE, spans=[span])])])


def metrics_request() -> ExportMetricsServiceRequest:
    exemplar = metrics_pb2.Exemplar(time_unix_nano=T0, as_int=7, trace_id=TRACE_ID,
                                    span_id=SPAN_ID)
    total = metrics_pb2.Metric(name="syscalls", unit="1", sum=metrics_pb2.Sum(
        aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE,
        is_monotonic=True,
        data_points=[metrics_pb2.NumberDataPoint(
            start_time_unix_nano=T0, time_unix_nano=T0 + 1, as_int=2**40,
            attributes=attributes(), exemplars=[exemplar])]))
    latency = metrics_pb2.Metric(name="latency", unit="ns", histogram=metrics_pb2.Histogram(
        aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_DELTA,
        data_points=[metrics_pb2.HistogramDataPoint(
            time_unix_nano=T0, count=3, sum=0.0, bucket_counts=[1, 0, 2],
            explicit_bounds=[0.5, 1e21], min=-1.5, max=float("inf"))]))
    spread = metrics_pb2.Metric(name="spread", exponential_histogram=(
        metrics_pb2.ExponentialHistogram(data_points=[
            metrics_pb2.ExponentialHistogramDataPoint(
                time_unix_nano=T0, count=4, scale=-2, zero_count=1,
                positive=metrics_pb2.ExponentialHistogramDataPoint.Buckets(
                    offset=-3, bucket_counts=[1, 2]))])))
    gauge = metrics_pb2.Metric(name="load", gauge=metrics_pb2.Gauge(data_points=[
        metrics_pb2.NumberDataPoint(time_unix_nano=T0, as_double=float("nan"))]))
    return ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
        resource=resource(), scope_metrics=[metrics_pb2.ScopeMetrics(
            scope=SCOPE, metrics=[total, latency, spread, gauge])])])


def logs_request() -> ExportLogsServiceRequest:
    record = logs_pb2.LogRecord(
        time_unix_nano=T0, observed_time_unix_nano=T0 + 2,
        severity_number=logs_pb2.SEVERITY_NUMBER_WARN, severity_text="WARN",
        body=AnyValue(kvlist_value=KeyValueList(values=attributes())),
        attributes=attributes(), flags=1, trace_id=TRACE_ID, span_id=SPAN_ID,
        event_name="oom")
    return ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource=resource(), scope_logs=[logs_pb2.ScopeLogs(scope=SCOPE,
                                                            log_records=[record])])])


def profiles_request(stacks: int = 3, depth: int = 4, per_stack: int = 2
                     ) -> ExportProfilesServiceRequest:
    """A profile shaped like ours: a shared dictionary, stacks, timestamped samples."""
    d = profiles_pb2.ProfilesDictionary(
        string_table=["", "cpu", "nanoseconds", "samples", "count", "/usr/lib/libc.so.6",
                      "thread.name", *(f"func_{i}" for i in range(depth * 2))],
        mapping_table=[profiles_pb2.Mapping(),
                       profiles_pb2.Mapping(memory_start=0x7F00_0000_0000,
                                            memory_limit=0xFFFF_FFFF_FFFF_FFFF,
                                            filename_strindex=5)],
        link_table=[profiles_pb2.Link(),
                    profiles_pb2.Link(trace_id=TRACE_ID, span_id=SPAN_ID)],
        attribute_table=[profiles_pb2.KeyValueAndUnit(),
                         profiles_pb2.KeyValueAndUnit(
                             key_strindex=6, value=AnyValue(string_value="worker"))],
    )
    d.function_table.add()
    d.location_table.add()
    for i in range(depth * 2):
        d.function_table.add(name_strindex=7 + i, system_name_strindex=7 + i,
                             filename_strindex=5, start_line=i)
        d.location_table.add(mapping_index=1, address=0x7F00_0000_1000 + 16 * i,
                             lines=[profiles_pb2.Line(function_index=1 + i, line=10 + i)])
    d.stack_table.add()
    for s in range(stacks):
        d.stack_table.add(location_indices=[1 + (s + k) % (depth * 2) for k in range(depth)])
    profile = profiles_pb2.Profile(
        sample_type=profiles_pb2.ValueType(type_strindex=3, unit_strindex=4),
        period_type=profiles_pb2.ValueType(type_strindex=1, unit_strindex=2),
        period=10_000_000, time_unix_nano=T0, duration_nano=10**10,
        profile_id=PROFILE_ID, original_payload_format="pprof",
        original_payload=b"\x1f\x8b\x08\x00", attribute_indices=[1])
    for s in range(stacks):
        profile.samples.add(stack_index=1 + s, attribute_indices=[1], link_index=s % 2,
                            timestamps_unix_nano=[T0 + 1000 * s + k for k in range(per_stack)])
    return ExportProfilesServiceRequest(
        dictionary=d,
        resource_profiles=[profiles_pb2.ResourceProfiles(
            resource=resource(), scope_profiles=[profiles_pb2.ScopeProfiles(
                scope=SCOPE, profiles=[profile])])])


REQUESTS = [trace_request, metrics_request, logs_request, profiles_request]


def reference(message: Message) -> dict[str, Any]:
    """protobuf's own proto3 JSON, with the OTLP changes made by hand: ids as hex."""
    obj = json_format.MessageToDict(message, use_integers_for_enums=True)

    def hexify(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId", "profileId"):
                    node[key] = base64.b64decode(value).hex()
                else:
                    hexify(value)
        elif isinstance(node, list):
            for value in node:
                hexify(value)
    hexify(obj)
    return obj


def parsed(message: Message) -> dict[str, Any]:
    obj = json.loads(encode_otlp_json(message))
    assert isinstance(obj, dict)
    return obj


def same(a: Message, b: Message) -> bool:
    """Equality that counts NaN as equal to itself (the metrics request holds one)."""
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


# --- round trips and the shape of a line --------------------------------------------------


@pytest.mark.parametrize("make", REQUESTS, ids=lambda make: make.__name__)
def test_round_trip(make: Any) -> None:
    request = make()
    line = encode_otlp_json(request)
    decoded = decode_otlp_json(line, type(request))
    assert same(decoded, request)
    assert same(decode_otlp_json(line.decode(), type(request)), decoded)  # str input too


@pytest.mark.parametrize("make", REQUESTS, ids=lambda make: make.__name__)
def test_one_line_per_request(make: Any) -> None:
    line = encode_otlp_json(make())
    assert b"\n" not in line and b"\r" not in line
    # No character that any reader might take for a line break, even in strings.
    assert len(line.decode().splitlines()) == 1


def test_a_file_of_lines_reads_back_in_order() -> None:
    requests = [trace_request(), ExportTraceServiceRequest(), trace_request()]
    requests[2].resource_spans[0].scope_spans[0].spans[0].name = "write"
    text = b"".join(encode_otlp_json(r) + b"\n" for r in requests)
    back = [decode_otlp_json(line, ExportTraceServiceRequest) for line in text.splitlines()]
    assert back == requests


@pytest.mark.parametrize("make", REQUESTS, ids=lambda make: make.__name__)
def test_matches_proto3_json_with_hex_ids(make: Any) -> None:
    request = make()
    if make is metrics_request:  # NaN != NaN; the non-finite test covers that data point
        del request.resource_metrics[0].scope_metrics[0].metrics[3]
    assert parsed(request) == reference(request)


def test_realistic_profile_matches_proto3_json() -> None:
    request = profiles_request(stacks=200, depth=20, per_stack=10)
    assert parsed(request) == reference(request)
    assert same(decode_otlp_json(encode_otlp_json(request), ExportProfilesServiceRequest),
                request)


# --- the OTLP rules, one by one -----------------------------------------------------------


def test_ids_are_lower_case_hex() -> None:
    span = parsed(trace_request())["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "5b8efff798038103d269b633813fc60c"
    assert span["spanId"] == "eee19b7ec3c1b174"
    assert span["parentSpanId"] == "eee19b7ec3c1b173"
    assert span["links"][0] == {"traceId": TRACE_ID.hex(), "spanId": PARENT_ID.hex(),
                                "flags": 1}

    record = parsed(logs_request())["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    assert (record["traceId"], record["spanId"]) == (TRACE_ID.hex(), SPAN_ID.hex())

    metric = parsed(metrics_request())["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]
    exemplar = metric["sum"]["dataPoints"][0]["exemplars"][0]
    assert (exemplar["traceId"], exemplar["spanId"]) == (TRACE_ID.hex(), SPAN_ID.hex())

    profiles = parsed(profiles_request())
    profile = profiles["resourceProfiles"][0]["scopeProfiles"][0]["profiles"][0]
    assert profile["profileId"] == "0102030405060708090a0b0c0d0e0f10"
    assert profiles["dictionary"]["linkTable"] == [
        {}, {"traceId": TRACE_ID.hex(), "spanId": SPAN_ID.hex()}]


def test_other_bytes_stay_base64() -> None:
    profile = parsed(profiles_request())["resourceProfiles"][0]["scopeProfiles"][0]
    assert profile["profiles"][0]["originalPayload"] == base64.b64encode(
        b"\x1f\x8b\x08\x00").decode()
    span = parsed(trace_request())["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    listed = span["attributes"][2]["value"]["kvlistValue"]["values"][0]["value"]
    assert listed["arrayValue"]["values"][1] == {"bytesValue": "AP9yYXc="}


def test_empty_and_all_zero_ids_are_left_out() -> None:
    request = trace_request()
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.parent_span_id = b""
    span.links[0].trace_id = bytes(16)
    out = parsed(request)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert "parentSpanId" not in out
    assert out["links"][0] == {"spanId": PARENT_ID.hex(), "flags": 1}
    # Read back, an all-zero id is no id, as the Collector has it.
    back = decode_otlp_json(encode_otlp_json(request), ExportTraceServiceRequest)
    assert back.resource_spans[0].scope_spans[0].spans[0].links[0].trace_id == b""


def test_enums_are_integers() -> None:
    span = parsed(trace_request())["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["kind"] == 2
    assert span["status"] == {"code": 2, "message": "boom"}
    record = parsed(logs_request())["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    assert record["severityNumber"] == 13
    metrics = parsed(metrics_request())["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    assert metrics[0]["sum"]["aggregationTemporality"] == 2
    assert metrics[1]["histogram"]["aggregationTemporality"] == 1


def test_64_bit_integers_are_decimal_strings() -> None:
    span = parsed(trace_request())["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["startTimeUnixNano"] == str(T0)
    assert span["flags"] == 0x300  # fixed32: a number
    assert span["attributes"][1]["value"] == {"intValue": str(2**63 - 1)}
    listed = span["attributes"][2]["value"]["kvlistValue"]["values"]
    assert listed[0]["value"]["arrayValue"]["values"][0] == {"intValue": str(-(2**63))}

    metrics = parsed(metrics_request())["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    assert metrics[0]["sum"]["dataPoints"][0]["asInt"] == str(2**40)
    assert metrics[1]["histogram"]["dataPoints"][0]["bucketCounts"] == ["1", "0", "2"]
    assert metrics[2]["exponentialHistogram"]["dataPoints"][0]["scale"] == -2

    dictionary = parsed(profiles_request())["dictionary"]
    assert dictionary["mappingTable"][1]["memoryLimit"] == str(2**64 - 1)
    profile = parsed(profiles_request())["resourceProfiles"][0]["scopeProfiles"][0]
    sample = profile["profiles"][0]["samples"][1]
    assert sample == {"stackIndex": 2, "attributeIndices": [1], "linkIndex": 1,
                      "timestampsUnixNano": [str(T0 + 1000), str(T0 + 1001)]}


def test_defaults_are_left_out_but_set_oneofs_and_optionals_are_not() -> None:
    span = parsed(trace_request())["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert "traceState" not in span and "droppedAttributesCount" not in span
    listed = span["attributes"][2]["value"]["kvlistValue"]["values"]
    assert listed[1]["value"] == {"stringValue": ""}  # oneof member set to ""
    assert listed[2]["value"] == {"intValue": "0"}
    assert listed[0]["value"]["arrayValue"]["values"][4] == {"arrayValue": {}}

    metrics = parsed(metrics_request())["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    point = metrics[1]["histogram"]["dataPoints"][0]
    assert point["sum"] == 0.0  # `optional double`: present although zero
    assert parsed(ExportTraceServiceRequest()) == {}


def test_non_finite_doubles() -> None:
    metrics = parsed(metrics_request())["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    assert metrics[1]["histogram"]["dataPoints"][0]["max"] == "Infinity"
    assert metrics[1]["histogram"]["dataPoints"][0]["explicitBounds"] == [0.5, 1e21]
    assert metrics[3]["gauge"]["dataPoints"][0]["asDouble"] == "NaN"
    # The Collector writes Go's spelling for infinities; read that too.
    point = decode_otlp_json('{"asDouble": "+Inf", "timeUnixNano": "1"}',
                             metrics_pb2.NumberDataPoint)
    assert point.as_double == math.inf


# --- the specification's examples, and what other writers send ----------------------------


def test_reads_and_rewrites_the_specification_trace_example() -> None:
    request = decode_otlp_json(EXAMPLE_TRACE, ExportTraceServiceRequest)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert (span.trace_id, span.span_id, span.parent_span_id) == (TRACE_ID, SPAN_ID, PARENT_ID)
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert span.start_time_unix_nano == 1544712660000000000

    # Written again: the same object, with ids in lower case and 64-bit integers as strings.
    expected = json.loads(EXAMPLE_TRACE)
    out_span = expected["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    for key in ("traceId", "spanId", "parentSpanId"):
        out_span[key] = out_span[key].lower()
    for key in ("startTimeUnixNano", "endTimeUnixNano"):
        out_span[key] = str(out_span[key])
    assert parsed(request) == expected


def test_reads_and_rewrites_the_specification_logs_example() -> None:
    request = decode_otlp_json(EXAMPLE_LOGS.encode(), ExportLogsServiceRequest)
    record = request.resource_logs[0].scope_logs[0].log_records[0]
    assert (record.trace_id, record.span_id) == (TRACE_ID, SPAN_ID)
    assert record.attributes[2].value.int_value == 10
    assert record.attributes[5].value.kvlist_value.values[0].key == "some.map.key"

    expected = json.loads(EXAMPLE_LOGS)
    out = expected["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    out["traceId"], out["spanId"] = out["traceId"].lower(), out["spanId"].lower()
    out["timeUnixNano"] = out["observedTimeUnixNano"] = "1544712660300000000"
    out["attributes"][2]["value"]["intValue"] = "10"
    assert parsed(request) == expected


def test_unknown_fields_are_ignored() -> None:
    line = json.dumps({
        "resourceSpans": [{
            "resource": {"attributes": [], "entityRefs": [], "newResourceThing": {"a": [1]}},
            "scopeSpans": [{"spans": [{
                "traceId": TRACE_ID.hex(), "spanId": SPAN_ID.hex(), "name": "x",
                "futureField": "ignored", "futureList": [{"traceId": "not hex"}],
                "attributes": [{"key": "k", "value": {"stringValue": "v", "extra": 1}}],
            }]}],
        }],
        "somethingNew": 42,
    })
    request = decode_otlp_json(line, ExportTraceServiceRequest)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert (span.trace_id, span.name, span.attributes[0].value.string_value) == (
        TRACE_ID, "x", "v")


def test_reads_other_proto3_json_spellings() -> None:
    line = json.dumps({"resource_spans": [{"scope_spans": [{"spans": [{
        "trace_id": TRACE_ID.hex().upper(), "span_id": "", "kind": "SPAN_KIND_CLIENT",
        "start_time_unix_nano": T0, "dropped_attributes_count": "3",
    }]}]}]})
    span = decode_otlp_json(line, ExportTraceServiceRequest).resource_spans[0] \
        .scope_spans[0].spans[0]
    assert (span.trace_id, span.span_id, span.kind) == (TRACE_ID, b"", 3)
    assert (span.start_time_unix_nano, span.dropped_attributes_count) == (T0, 3)


def one_span(span: dict[str, Any]) -> str:
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]})


@pytest.mark.parametrize("bad", [
    one_span({"traceId": "zz" + "0" * 30}),
    one_span({"spanId": base64.b64encode(SPAN_ID).decode()}),  # base64 where hex belongs
    one_span({"spanId": "ab cd ef 01"}),
    one_span({"startTimeUnixNano": "soon"}),
    '{"resourceSpans": {}}',
    "[1, 2]",
    "{not json",
])
def test_bad_input_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_otlp_json(bad, ExportTraceServiceRequest)


def test_wrong_size_id_is_refused_on_write() -> None:
    request = trace_request()
    request.resource_spans[0].scope_spans[0].spans[0].span_id = b"\x01\x02\x03"
    with pytest.raises(ValueError, match="span_id must be 8 bytes"):
        encode_otlp_json(request)


# --- ids found from the descriptors, not from a list of paths -----------------------------


def future_message_type() -> type[Message]:
    """A message OTLP might add: an id, a float, maps and a well-known type."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    f = descriptor_pb2.FieldDescriptorProto
    entry = descriptor_pb2.DescriptorProto(
        name="TagsEntry", options=descriptor_pb2.MessageOptions(map_entry=True), field=[
            f(name="key", number=1, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL),
            f(name="value", number=2, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)])
    pool.Add(descriptor_pb2.FileDescriptorProto(
        name="future.proto", package="future.v1", syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
        message_type=[descriptor_pb2.DescriptorProto(name="Thing", nested_type=[entry], field=[
            f(name="trace_id", number=1, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL),
            f(name="ratio", number=2, type=f.TYPE_FLOAT, label=f.LABEL_OPTIONAL),
            f(name="tags", number=3, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
              type_name=".future.v1.Thing.TagsEntry"),
            f(name="at", number=4, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
              type_name=".google.protobuf.Timestamp"),
            f(name="children", number=5, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
              type_name=".future.v1.Thing"),
        ])]))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("future.v1.Thing"))


def test_a_new_message_with_an_id_is_covered() -> None:
    thing_type = future_message_type()
    thing: Any = thing_type(trace_id=TRACE_ID, ratio=0.1)
    thing.tags[-5] = b"\x01"
    thing.at.FromNanoseconds(T0)
    child = thing.children.add(trace_id=bytes(range(16)))
    child.tags[7] = b""
    line = encode_otlp_json(thing)
    assert json.loads(line) == {
        "traceId": TRACE_ID.hex(), "ratio": 0.1, "tags": {"-5": "AQ=="},
        "at": "2018-12-13T14:51:00Z",
        "children": [{"traceId": bytes(range(16)).hex(), "tags": {"7": ""}}],
    }
    assert decode_otlp_json(line, thing_type) == thing
