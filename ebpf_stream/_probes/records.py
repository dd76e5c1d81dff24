"""What the tracing families' programs record, viewed as numpy records.

In: a read of a ring (``Records``, still in the ring's framing) or a map's
entries; out: numpy record arrays of the layout a family declares (a dtype
mirroring its C struct), so that a family decodes a whole batch a column
at a time and only maps each record to its event.

The CPU probe decodes with ``struct`` instead (see ``samples``): a host
that only profiles CPU would pay numpy's memory for a few records a second.
"""

from __future__ import annotations

import functools

import numpy as np

from .._bpf.ringbuf import Records
from .._bpf.syscalls import BpfMap

PID = np.dtype([("pid", "<u4")])
"""The key of a map kept per process."""


def ring_records(frames: Records, record: np.dtype[np.void]) -> np.ndarray:
    """The payloads of one read of a ring, as records of ``record``."""
    return np.frombuffer(frames.frames, _framed(record, frames.stride))["payload"]


@functools.lru_cache(maxsize=16)
def _framed(record: np.dtype[np.void], stride: int) -> np.dtype[np.void]:
    """A record as the ring frames it: after the 8-byte header, padded to ``stride``.

    The payload is nested so that its field names cannot clash with the header's.
    """
    return np.dtype({"names": ["payload"], "formats": [record], "offsets": [8],
                     "itemsize": stride})


def map_records(table: BpfMap, key: np.dtype[np.void],
                value: np.dtype[np.void]) -> tuple[np.ndarray, np.ndarray]:
    """Every entry of ``table``: its keys as records of ``key``, its values of ``value``.

    A per-CPU map holds one value per CPU under each key; they are summed
    field by field.
    """
    entries = list(table.items())
    if not entries:
        return np.zeros(0, key), np.zeros(0, value)
    keys, values = zip(*entries, strict=True)
    per_cpu = np.frombuffer(b"".join(values), value).reshape(len(values), -1)
    if per_cpu.shape[1] == 1:
        summed = per_cpu[:, 0]
    else:
        summed = np.zeros(len(values), value)
        for field in value.names or ():
            summed[field] = per_cpu[field].sum(axis=1)
    return np.frombuffer(b"".join(keys), key), summed
