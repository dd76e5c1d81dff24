"""The symbolize stage alone: what it yields for a message, and what it skips."""

from __future__ import annotations

from test_batcher import FakeSymbolizer, message

from ebpf_stream import EbpfConfig
from ebpf_stream._base.stats import Stats
from ebpf_stream._model.events import OomKill, Watermark, encode_events
from ebpf_stream._pipeline.symbolize import Sample, SamplingBegan, Symbolize


def stage() -> tuple[Symbolize, FakeSymbolizer]:
    symbolizer = FakeSymbolizer()
    return Symbolize(EbpfConfig(), symbolizer, Stats()), symbolizer  # type: ignore[arg-type]


def test_samples_come_named_between_where_sampling_began_and_the_watermark() -> None:
    symbolize, _ = stage()
    items = list(symbolize.items(message(2, at=1000, complete=5000, started=500),
                                 lambda: True))
    assert items[0] == SamplingBegan(500), "before the samples: where windows start"
    assert items[-1] == Watermark(500, 5000), "after the samples it vouches for"
    first, second = items[1:-1]
    assert isinstance(first, Sample) and isinstance(second, Sample)
    assert (first.pid, first.comm, first.timestamp_ns, second.timestamp_ns) == (
        42, "app", 1000, 2000)
    assert [f.name for f in first.frames] == ["ua", "ub", "uc", "k1", "k2"]


def test_what_is_refused_is_not_symbolized() -> None:
    symbolize, symbolizer = stage()
    oom = OomKill(1, 9, "hog", 0, 0, 0, 0, 0)
    assert list(symbolize.items(message(3), lambda: False)) == []
    assert list(symbolize.items(encode_events([oom], 1), lambda: False)) == []
    assert symbolizer.user_calls == 0, "a sample over the cap costs no symbolization"
    assert list(symbolize.items(encode_events([oom], 1), lambda: True)) == [oom]
