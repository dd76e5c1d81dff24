"""One run's stages from the probes to the batches channel, wired together.

The events channel is bounded in samples, so a slow batch stage costs
samples, counted, never memory; the batches channel holds a few batches
for slow exporters.  Both count what they drop through ``on_drop``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .._base.config import EbpfConfig
from .._base.stats import Stats
from .._model.batch import Batch
from .._model.events import EventMessage
from .._probes.base import Probe
from .._symbols import Symbolizer
from .batch import Batcher
from .channels import Channel
from .reading import Readers

_BATCH_QUEUE = 2  # batches waiting for slow exporters; each holds up to max_samples

Task = Callable[[], Coroutine[Any, Any, None]]


class Stages:
    """The probe readers, the events channel, the symbolize and batch stages, and
    the batches channel they fill for the exporters."""

    def __init__(self, config: EbpfConfig, probes: Sequence[Probe], symbolizer: Symbolizer,
                 stats: Stats, on_drop: Callable[[int], None], *,
                 native_stacks: bool) -> None:
        self._probes = probes
        self._events = Channel[EventMessage](
            config.channel_capacity, config.overflow_policy,
            weight=lambda m: m.samples, on_drop=on_drop)
        self.batches = Channel[Batch](
            _BATCH_QUEUE, config.overflow_policy,
            weight=lambda b: b.sample_count, on_drop=on_drop)
        self.readers = Readers(probes, self._events)
        self._batcher = Batcher(config, symbolizer, stats, offload=native_stacks)

    def tasks(self) -> list[Task]:
        """What runs the stages: a reader per probe, and the batch stage."""
        return [*(functools.partial(self.readers.read, probe) for probe in self._probes),
                functools.partial(self._batcher.run, self._events, self.batches)]
