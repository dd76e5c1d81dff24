"""Discrete traced events, and the engine's own log records, as OTLP logs.

Each traced event becomes one log record with an event name, on the
resource of its process:

- ``tcp.connection.closed``: a TCP connection that closed, was reset or
  never established, at the time it ended, with both endpoints in the
  semantic conventions' ``network.*`` attributes;
- ``syscall.slow``: a syscall over the threshold, with its stack in
  ``code.stacktrace`` (root first, one ``function (module)`` per line);
- ``process.oom_kill``: the OOM killer's victim, at severity WARN;
- ``asyncio.loop.stall``: an asyncio loop that ran callbacks past the stall
  threshold without waiting, at severity WARN, naming the culprit (the
  innermost Python frame of the heaviest stack) in ``code.*`` and the
  stacks seen meanwhile in ``code.stacktrace``; when the loop was blocked
  serving a request, the record carries the request's span (its
  ``trace_id`` and ``span_id``, so a backend links the stall to the trace)
  and its ``http.route`` and ``http.request.method``.

Warnings and errors of the engine (lost samples, a failing exporter, a slow
shutdown) reach the same pipeline as its data, so operators see them where
they look at the profiles.
"""

from __future__ import annotations

import errno
import logging
import traceback
from collections.abc import Iterable

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.logs.v1 import logs_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .._model.batch import SlowCall, Stall, StallStack, TraceRecord
from .._model.events import OomKill, TcpConnection, endpoint
from .._model.labels import stall_place
from .._model.profile import Frame
from .._model.request_fields import request_attributes, span_ids
from .attributes import AttributeValue, any_value, key_values

TCP_CONNECTION_CLOSED = "tcp.connection.closed"
SYSCALL_SLOW = "syscall.slow"
PROCESS_OOM_KILL = "process.oom_kill"
ASYNCIO_LOOP_STALL = "asyncio.loop.stall"
# A stall's stack trace stays a readable size: its heaviest stacks, each
# with its innermost frames (where the time went).
STALL_STACKS = 8
STALL_FRAMES = 64
_MAX_ERRNO = 4095  # the kernel returns -1 .. -4095 for errors; anything else is a result

_SEVERITIES = (  # (lowest logging level, OTLP severity number): the data model's mapping
    (logging.CRITICAL, pb.SeverityNumber.SEVERITY_NUMBER_FATAL),
    (logging.ERROR, pb.SeverityNumber.SEVERITY_NUMBER_ERROR),
    (logging.WARNING, pb.SeverityNumber.SEVERITY_NUMBER_WARN),
    (logging.INFO, pb.SeverityNumber.SEVERITY_NUMBER_INFO),
    (logging.DEBUG, pb.SeverityNumber.SEVERITY_NUMBER_DEBUG),
)


def severity(level: int) -> pb.SeverityNumber.ValueType:
    return next((number for lowest, number in _SEVERITIES if level >= lowest),
                pb.SeverityNumber.SEVERITY_NUMBER_TRACE)


def log_record(record: logging.LogRecord) -> pb.LogRecord:
    attributes: dict[str, AttributeValue] = {
        "code.file.path": record.pathname,
        "code.line.number": record.lineno,
        "code.function.name": record.funcName,
        "logger.name": record.name,
    }
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        kind = type(exc)
        attributes["exception.type"] = (kind.__qualname__ if kind.__module__ == "builtins"
                                        else f"{kind.__module__}.{kind.__qualname__}")
        attributes["exception.message"] = str(exc)
        attributes["exception.stacktrace"] = "".join(traceback.format_exception(exc))
    time_ns = int(record.created * 1e9)
    return pb.LogRecord(
        time_unix_nano=time_ns, observed_time_unix_nano=time_ns,
        severity_number=severity(record.levelno), severity_text=record.levelname,
        body=any_value(record.getMessage()), attributes=key_values(attributes),
    )



def _event(event_name: str, time_ns: int, body: str, attributes: dict[str, AttributeValue],
           severity_number: pb.SeverityNumber.ValueType = pb.SeverityNumber.SEVERITY_NUMBER_INFO,
           ) -> pb.LogRecord:
    return pb.LogRecord(
        event_name=event_name, time_unix_nano=time_ns, observed_time_unix_nano=time_ns,
        severity_number=severity_number,
        severity_text=pb.SeverityNumber.Name(severity_number).removeprefix("SEVERITY_NUMBER_"),
        body=any_value(body), attributes=key_values(attributes))


def _connection(c: TcpConnection) -> pb.LogRecord:
    duration_s = max(0, c.end_ns - c.start_ns) / 1e9
    local, peer = endpoint(c.local_address, c.local_port), endpoint(c.peer_address, c.peer_port)
    return _event(
        TCP_CONNECTION_CLOSED, c.end_ns,
        f"TCP {c.role} {local} -> {peer} {c.outcome} after {duration_s:.6f} s: "
        f"{c.bytes_sent} bytes sent, {c.bytes_received} received",
        {
            "network.transport": "tcp",
            "network.type": f"ipv{c.family}",
            "network.local.address": c.local_address,
            "network.local.port": c.local_port,
            "network.peer.address": c.peer_address,
            "network.peer.port": c.peer_port,
            "tcp.connection.role": c.role,
            "tcp.connection.outcome": c.outcome,
            "tcp.connection.duration": duration_s,
            "tcp.connection.bytes_sent": c.bytes_sent,
            "tcp.connection.bytes_received": c.bytes_received,
            "tcp.connection.retransmits": c.retransmits,
        })


def _slow_call(slow: SlowCall) -> pb.LogRecord:
    call = slow.call
    attributes: dict[str, AttributeValue] = {
        "syscall.name": call.syscall,
        "syscall.duration": call.duration_ns / 1e9,
        "syscall.return_value": call.ret,
        "thread.id": call.tid,
        "thread.name": call.comm,
    }
    outcome = ""
    if -_MAX_ERRNO <= call.ret < 0:
        attributes["error.type"] = errno.errorcode.get(-call.ret, str(-call.ret))
        outcome = f", failed with {attributes['error.type']}"
    if slow.frames:
        attributes["code.stacktrace"] = "\n".join(f"{f.name} ({f.module})" for f in slow.frames)
    return _event(SYSCALL_SLOW, call.timestamp_ns,
                  f"{call.syscall} took {call.duration_ns / 1e6:.3f} ms{outcome}", attributes)


def _oom_kill(kill: OomKill) -> pb.LogRecord:
    return _event(
        PROCESS_OOM_KILL, kill.timestamp_ns,
        f"OOM killer killed {kill.comm} (pid {kill.pid}), "
        f"{kill.anon_rss + kill.file_rss + kill.shmem_rss} bytes resident",
        {
            "process.pid": kill.pid,
            "process.executable.name": kill.comm,
            "process.oom_kill.total_vm": kill.total_vm,
            "process.oom_kill.anon_rss": kill.anon_rss,
            "process.oom_kill.file_rss": kill.file_rss,
            "process.oom_kill.shmem_rss": kill.shmem_rss,
            "process.oom_kill.oom_score_adj": kill.oom_score_adj,
        },
        pb.SeverityNumber.SEVERITY_NUMBER_WARN)


def _frame_line(frame: Frame) -> str:
    where = f"{frame.module}:{frame.line}" if frame.line else frame.module
    return f"  at {frame.name} ({where})"


def _more(count: int, what: str) -> list[str]:
    return [f"  ... {count} more {what}"] if count > 0 else []


def _stall_stack(stack: StallStack) -> str:
    """``slept 300.1 ms / 3 samples:`` then the frames, leaf first, one per line."""
    return "\n".join([f"slept {stack.slept_ns / 1e6:.1f} ms / {stack.samples} samples:",
                      *map(_frame_line, stack.frames[::-1][:STALL_FRAMES]),
                      *_more(len(stack.frames) - STALL_FRAMES, "frames")])


def _stall(record: Stall) -> pb.LogRecord:
    stall = record.stall
    attributes: dict[str, AttributeValue] = {
        "thread.id": stall.tid,
        "asyncio.loop.stall.duration": stall.duration_ns / 1e9,
    }
    culprit = record.culprit
    if culprit is not None:
        attributes["code.function.name"] = culprit.name
        attributes["code.file.path"] = culprit.module
        attributes["code.line.number"] = culprit.line
    if record.stacks:
        attributes["code.stacktrace"] = "\n".join(
            [*map(_stall_stack, record.stacks[:STALL_STACKS]),
             *_more(len(record.stacks) - STALL_STACKS, "stacks")])
    context = record.context
    attributes.update(request_attributes(context))
    where = stall_place(record)
    log = _event(ASYNCIO_LOOP_STALL, stall.timestamp_ns,
                 f"asyncio loop blocked for {stall.duration_ns / 1e6:.0f} ms"
                 f"{' ' + where if where else ''}",
                 attributes, pb.SeverityNumber.SEVERITY_NUMBER_WARN)
    ids = span_ids(context)
    if ids is not None:
        log.trace_id, log.span_id = ids
    return log


def trace_log_record(record: TraceRecord) -> pb.LogRecord:
    """One traced event as a log record (its process goes in the resource)."""
    if isinstance(record, TcpConnection):
        return _connection(record)
    if isinstance(record, SlowCall):
        return _slow_call(record)
    if isinstance(record, Stall):
        return _stall(record)
    return _oom_kill(record)


def logs_request(groups: Iterable[tuple[Resource, list[pb.LogRecord]]],
                 scope: InstrumentationScope) -> ExportLogsServiceRequest:
    """One request with the records of each resource; empty (no resources) without records."""
    request = ExportLogsServiceRequest()
    for resource, records in groups:
        if records:
            request.resource_logs.add(resource=resource, scope_logs=[pb.ScopeLogs(
                scope=scope, log_records=records)])
    return request
