"""Opening a run's probes: together, then started together."""

from __future__ import annotations

import anyio
import pytest

from ebpf_stream._base.errors import ProbeError
from ebpf_stream._pipeline.reading import open_probes
from ebpf_stream._probes.base import Emit, Probe


class Recorder(Probe):
    """A stand-in probe: records when it opens, starts and closes."""

    def __init__(self, name: str, log: list[str], open_s: float = 0.0,
                 fail_start: bool = False) -> None:
        self.name, self.log, self.open_s, self.fail_start = name, log, open_s, fail_start

    async def open(self) -> None:
        await anyio.sleep(self.open_s)
        self.log.append(f"{self.name} opened")

    def start(self) -> None:
        if self.fail_start:
            raise ProbeError(f"{self.name} could not attach")
        self.log.append(f"{self.name} started")

    async def run(self, emit: Emit) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    async def drain(self, emit: Emit) -> None:
        pass

    def close(self) -> None:
        self.log.append(f"{self.name} closed")

    def kernel_drops(self) -> int:
        return 0

    def program_fds(self) -> list[int]:
        return []

    map_fds = program_fds


@pytest.mark.anyio
async def test_no_probe_records_before_every_probe_has_opened() -> None:
    # A probe that opens fast (from the compile cache) would otherwise record
    # while a slow one compiles, with no reader to take what it records.
    log: list[str] = []
    await open_probes([Recorder("cpu", log), Recorder("syscalls", log, open_s=0.1)],
                      meanwhile=lambda: None)
    assert log == ["cpu opened", "syscalls opened", "cpu started", "syscalls started"]


@pytest.mark.anyio
async def test_a_probe_that_cannot_start_closes_them_all() -> None:
    log: list[str] = []
    with pytest.raises(ProbeError, match="syscalls could not attach"):
        await open_probes([Recorder("cpu", log), Recorder("syscalls", log, fail_start=True)],
                          meanwhile=lambda: None)
    assert {"cpu closed", "syscalls closed"} <= set(log)
