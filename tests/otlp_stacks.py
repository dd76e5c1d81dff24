"""Reading stacks back out of OTLP profile requests, for comparing with other outputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from ebpf_stream._model.labels import KERNEL_SUFFIX, short_file


def resource_attributes(resource: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in resource.attributes:  # type: ignore[attr-defined]
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


def stacks(requests: Iterable[ExportProfilesServiceRequest], *,
           sample_type: str = "samples") -> Counter[tuple[int, tuple[str, ...]]]:
    """{(pid, root-first frame names): value} over every profile of ``sample_type``.

    Kernel frames get the folded format's suffix and Python frames read
    ``qualname (file.py:line)``, so the result compares directly with folded
    output.
    """
    total: Counter[tuple[int, tuple[str, ...]]] = Counter()
    for request in requests:
        d = request.dictionary
        s = d.string_table
        kinds = {i: a.value.string_value for i, a in enumerate(d.attribute_table)
                 if s[a.key_strindex] == "profile.frame.type"}

        def name(location_index: int, d: Any = d, s: Any = s,
                 kinds: dict[int, str] = kinds) -> str:
            loc = d.location_table[location_index]
            (line,) = loc.lines
            fn = d.function_table[line.function_index]
            (kind,) = (kinds[i] for i in loc.attribute_indices)
            if kind == "cpython":
                return f"{s[fn.name_strindex]} ({short_file(s[fn.filename_strindex])}:{line.line})"
            return s[fn.name_strindex] + (KERNEL_SUFFIX if kind == "kernel" else "")

        for rp in request.resource_profiles:
            pid = int(resource_attributes(rp.resource)["process.pid"])  # type: ignore[call-overload]
            for sp in rp.scope_profiles:
                for profile in sp.profiles:
                    if s[profile.sample_type.type_strindex] != sample_type:
                        continue
                    for sample in profile.samples:
                        leaf_first = d.stack_table[sample.stack_index].location_indices
                        frames = tuple(name(i) for i in reversed(leaf_first))
                        value = sum(sample.values) if sample.values else len(
                            sample.timestamps_unix_nano)
                        total[pid, frames] += value
    return total
