from __future__ import annotations

import anyio
import pytest

from ebpf_stream import OverflowPolicy
from ebpf_stream._pipeline.channels import BoundedQueue, Channel


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


@pytest.mark.anyio
async def test_drops_are_counted_in_samples_by_weight() -> None:
    for policy, dropped in ((OverflowPolicy.DROP_NEWEST, [3, 4]),
                            (OverflowPolicy.DROP_OLDEST, [1, 2])):
        drops: list[int] = []
        channel = Channel[str](2, policy, weight=len, on_drop=drops.append)
        for item in ("a", "bb", "ccc", "dddd"):
            await channel.send(item)
        assert drops == dropped, policy


@pytest.mark.anyio
async def test_four_producers_blocked_on_a_full_channel_all_get_through_in_turn() -> None:
    # One producer per probe (CPU, syscalls, network, memory) sends into the run's channel.
    channel, drops = make(OverflowPolicy.BLOCK, capacity=1)
    await channel.send(0)
    sent: list[int] = []

    async def produce(n: int) -> None:
        await channel.send(n)
        sent.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for n in (1, 2, 3, 4):
                tg.start_soon(produce, n)
            await anyio.wait_all_tasks_blocked()
            assert sent == [] and channel.queued == 1
            received = []
            for _ in range(5):
                received.append(await channel.receive())
                # The first in line moves in as an item leaves: the channel stays full.
                assert channel.queued == (1 if len(received) < 5 else 0)
    assert received == [0, 1, 2, 3, 4] and sorted(sent) == [1, 2, 3, 4] and drops == []


@pytest.mark.anyio
async def test_many_producers_blocked_at_once_all_finish_as_the_consumer_drains() -> None:
    channel, drops = make(OverflowPolicy.BLOCK, capacity=2)

    async def produce(first: int) -> None:
        for n in range(first, first + 5):
            await channel.send(n)

    received: list[int] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for first in (0, 10, 20, 30):
                tg.start_soon(produce, first)
            await anyio.wait_all_tasks_blocked()
            while len(received) < 20:
                received.append(await channel.receive())
    assert drops == [] and channel.queued == 0
    for first in (0, 10, 20, 30):  # each producer's items, all of them, in its order
        assert [n for n in received if first <= n < first + 10] == list(range(first, first + 5))


@pytest.mark.anyio
async def test_a_blocked_producer_cancelled_leaves_its_item_out_and_the_line() -> None:
    channel, drops = make(OverflowPolicy.BLOCK, capacity=1)
    await channel.send(0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(channel.send, 1)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        assert await channel.receive() == 0
        assert channel.queued == 0  # the cancelled item was not let in
        await channel.send(2)  # nor does it hold a place in line
    assert await drain(channel) == [2] and drops == []


@pytest.mark.anyio
async def test_a_producer_cancelled_once_let_in_has_sent_its_item_once() -> None:
    channel, _ = make(OverflowPolicy.BLOCK, capacity=1)
    await channel.send(0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(channel.send, 1)
            await anyio.wait_all_tasks_blocked()
            assert await channel.receive() == 0  # lets 1 in and wakes its producer...
            tg.cancel_scope.cancel()  # ...which is cancelled before it runs
    assert await drain(channel) == [1]


@pytest.mark.anyio
async def test_close_turns_blocked_producers_away_at_once() -> None:
    channel, drops = make(OverflowPolicy.BLOCK, capacity=1)
    await channel.send(0)
    refused: list[int] = []

    async def produce(n: int) -> None:
        with pytest.raises(anyio.ClosedResourceError):
            await channel.send(n)
        refused.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for n in (1, 2, 3):
                tg.start_soon(produce, n)
            await anyio.wait_all_tasks_blocked()
            channel.close()
    assert sorted(refused) == [1, 2, 3]
    assert [item async for item in channel] == [0] and drops == []


@pytest.mark.anyio
@pytest.mark.parametrize("policy", list(OverflowPolicy))
async def test_send_after_close_is_refused(policy: OverflowPolicy) -> None:
    channel, drops = make(policy)
    channel.close()
    with pytest.raises(anyio.ClosedResourceError):
        await channel.send(1)
    assert channel.queued == 0 and drops == []


@pytest.mark.anyio
async def test_receive_ends_once_closed_and_drained() -> None:
    channel, _ = make(OverflowPolicy.BLOCK)
    await channel.send(1)
    channel.close()
    assert await channel.receive() == 1
    with pytest.raises(anyio.EndOfStream):
        await channel.receive()

    idle, _ = make(OverflowPolicy.BLOCK)
    ended: list[bool] = []

    async def consume() -> None:
        with pytest.raises(anyio.EndOfStream):
            await idle.receive()
        ended.append(True)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            idle.close()  # a consumer waiting on an empty channel is woken, and ends
    assert ended == [True]


@pytest.mark.anyio
async def test_a_cancelled_receive_takes_nothing() -> None:
    channel, _ = make(OverflowPolicy.BLOCK)
    with anyio.move_on_after(0.01):
        await channel.receive()
    await channel.send(1)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await channel.receive()
    assert await drain(channel) == [1]


@pytest.mark.anyio
async def test_the_queue_takes_what_must_not_wait_past_its_bound() -> None:
    drops: list[int] = []
    queue = BoundedQueue[int](1, OverflowPolicy.DROP_NEWEST, weight=lambda n: n,
                              on_drop=drops.append)
    await queue.put(1)
    queue.append(2)
    assert len(queue) == 2 and drops == []
    assert queue.take_all() == [1, 2] and len(queue) == 0
    with pytest.raises(ValueError, match="capacity"):
        BoundedQueue[int](0, OverflowPolicy.BLOCK, weight=lambda n: n, on_drop=drops.append)
