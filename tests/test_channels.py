from __future__ import annotations

import anyio
import pytest

from ebpf_stream import OverflowPolicy
from ebpf_stream._pipeline.channels import Channel


def make(policy: OverflowPolicy, capacity: int = 2) -> tuple[Channel[int], list[int]]:
    drops: list[int] = []
    return Channel[int](capacity, policy, weight=lambda n: n, on_drop=drops.append), drops


async def drain(channel: Channel[int]) -> list[int]:
    channel.close()
    return [item async for item in channel]


@pytest.mark.anyio
async def test_drop_newest_keeps_the_queue_and_counts_the_newcomer() -> None:
    channel, drops = make(OverflowPolicy.DROP_NEWEST)
    for n in (1, 2, 3, 4):
        await channel.send(n)
    assert drops == [3, 4]
    assert await drain(channel) == [1, 2]


@pytest.mark.anyio
async def test_drop_oldest_keeps_the_newest_items() -> None:
    channel, drops = make(OverflowPolicy.DROP_OLDEST)
    for n in (1, 2, 3, 4):
        await channel.send(n)
    assert drops == [1, 2]
    assert await drain(channel) == [3, 4]


@pytest.mark.anyio
async def test_block_applies_backpressure_without_dropping() -> None:
    channel, drops = make(OverflowPolicy.BLOCK)
    await channel.send(1)
    await channel.send(2)
    with anyio.move_on_after(0.05) as scope:
        await channel.send(3)
    assert scope.cancelled_caught, "a full channel must block the sender"
    assert await channel.receive() == 1
    await channel.send(3)
    assert drops == []
    assert await drain(channel) == [2, 3]


@pytest.mark.anyio
async def test_memory_stays_bounded_under_a_flood() -> None:
    channel, drops = make(OverflowPolicy.DROP_OLDEST, capacity=8)
    for _ in range(10_000):
        await channel.send(1)
        assert channel.queued <= 8
    assert sum(drops) == 10_000 - 8
