"""The CPU meter charges the profiler's task steps, and nothing else."""

from __future__ import annotations

import time

import anyio
import pytest

from ebpf_stream._base.overhead import CpuMeter


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.mark.anyio
async def test_task_steps_are_metered_and_the_host_is_not() -> None:
    meter = CpuMeter()

    async def ours() -> str:
        for _ in range(5):
            burn(0.01)
            await anyio.sleep(0)
        return "done"

    async def host() -> None:
        for _ in range(5):
            burn(0.02)
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(host)
        assert await meter.run(ours()) == "done"
    assert 0.045e9 < meter.ns < 0.08e9


@pytest.mark.anyio
async def test_cancellation_reaches_the_metered_coroutine() -> None:
    meter = CpuMeter()
    cancelled = False

    async def ours() -> None:
        nonlocal cancelled
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise

    with anyio.move_on_after(0.05):
        await meter.run(ours())
    assert cancelled
