"""Resources, scopes and attributes: the identity every OTLP signal carries.

A backend groups profiles and metrics by their resource, so each sampled
process gets its own resource (``process.pid``, executable, command line, and
its container's ``container.id`` and ``k8s.pod.uid`` where it runs in one)
under the user's ``service.name`` and resource attributes, and the engine's
own telemetry gets the resource of the process the engine runs in.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import socket
import sys
from collections.abc import Mapping

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .._base.lru import Lru
from .._model.dictionary import valid_utf8
from .._model.profile import ProcessInfo

_CACHED_RESOURCES = 1024  # processes: those a batch names, and then some

SCOPE_NAME = "ebpf_stream"

AttributeValue = str | int | float | bool


def any_value(value: AttributeValue) -> AnyValue:
    # bool before int: True is an int too.
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=valid_utf8(value))


def key_values(attributes: Mapping[str, AttributeValue]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attributes.items()]


@functools.cache
def scope(mode: str) -> InstrumentationScope:
    """The scope of everything a run sends; ``ebpf_stream.mode`` says how it profiled
    (``bpf``, or ``fallback``: in-process, Python frames only)."""
    try:
        version = importlib.metadata.version("ebpf-stream")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    return InstrumentationScope(name=SCOPE_NAME, version=version,
                                attributes=key_values({"ebpf_stream.mode": mode}))


@functools.cache
def host_name() -> str:
    return socket.gethostname()


def process_attributes(process: ProcessInfo) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {"process.pid": process.pid}
    if process.executable:
        attributes["process.executable.name"] = process.executable
    if process.command_line:
        attributes["process.command_line"] = process.command_line
    if process.namespace_pid:
        attributes["process.vpid"] = process.namespace_pid  # the pid the container sees
    if process.container_id:
        attributes["container.id"] = process.container_id
    if process.pod_uid:
        attributes["k8s.pod.uid"] = process.pod_uid
    return attributes


@functools.cache
def own_process() -> ProcessInfo:
    """The process the engine runs in, for the resource of its own telemetry."""
    return ProcessInfo(os.getpid(), os.path.basename(sys.executable),
                       os.path.basename(sys.executable), " ".join(sys.argv))


class ResourceFactory:
    """Builds one resource per process from the user's attributes.

    ``base`` holds the user's resource attributes (``OTEL_RESOURCE_ATTRIBUTES``
    and ``OTEL_SERVICE_NAME``).  Without a ``service.name`` there, the
    specification's fallback ``unknown_service:<executable>`` is used, so
    every resource is attributable to some service.
    """

    def __init__(self, base: Mapping[str, str]) -> None:
        self._base = dict(base)
        # Pids churn: a bounded cache of the recent ones, not one that grows with them.
        self._cache: Lru[ProcessInfo, Resource] = Lru(_CACHED_RESOURCES)

    def for_process(self, process: ProcessInfo) -> Resource:
        resource = self._cache.get(process)
        if resource is None:
            attributes: dict[str, AttributeValue] = {
                "service.name": f"unknown_service:{process.executable or process.name}",
                "host.name": host_name(),
                **self._base,
                **process_attributes(process),
            }
            resource = Resource(attributes=key_values(attributes))
            self._cache.put(process, resource)
        return resource
