"""The CPU probe: its bookkeeping without BPF, and a run on real BPF.

``Generations`` decides which stack keys to read and when the kernel switches
stack maps, and ``LoopHooks`` when the event-loop hooks attach; each is
tested on its own.  The real run samples a busy native process and checks
that the probe leaves nothing loaded behind.
"""

from __future__ import annotations

import subprocess

import anyio
import pytest
from _support import bpf_fds, program_ids, unloaded

from ebpf_stream import EbpfConfig, Stats
from ebpf_stream._bpf.loader import LoadedProgram
from ebpf_stream._bpf.ringbuf import Records
from ebpf_stream._model.events import (
    CpuSample,
    Event,
    EventMessage,
    StackTrace,
    Watermark,
    decode_events,
)
from ebpf_stream._probes.cpu import CpuProbe
from ebpf_stream._probes.loops import LoopHooks
from ebpf_stream._probes.stacks import Generations

SECOND_NS = 1_000_000_000


class Reader:
    """A stand-in for the stack maps: records each read, finds every stack but ``gone``."""

    def __init__(self, generations: Generations, gone: frozenset[int] = frozenset()) -> None:
        self.generations = generations
        self.gone = gone
        self.reads: list[tuple[int, int]] = []

    def __call__(self, key: int, generation: int) -> StackTrace | None:
        self.reads.append((key, generation))
        return None if key in self.gone else StackTrace(key, [key], self.generations.epoch)

    def new(self, keys: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (key, generation) pairs read for a batch of ``keys``."""
        self.reads = []
        events = self.generations.new_stacks(keys, self)
        assert [e.key for e in events if isinstance(e, StackTrace)] == [
            key for key, _ in self.reads if key not in self.gone]
        return self.reads


def test_a_key_is_read_once_in_two_epochs() -> None:
    generations = Generations(rotate_after_keys=100, rotate_after_ns=SECOND_NS)
    reader = Reader(generations)
    # Read once however many samples carry it, from the map of its generation's parity.
    assert reader.new([(3, 0), (3, 0), (5, 2)]) == [(3, 0), (5, 0)]
    assert reader.new([(3, 0)]) == []
    generations.advance(1)
    assert reader.new([(3, 1)]) == [], "the batcher still keeps last epoch's keys"
    generations.advance(2)
    assert reader.new([(3, 0), (5, 0)]) == [(3, 0), (5, 0)]


def test_fields_without_a_stack_are_not_read() -> None:
    """Stack keys are odd: 0 (no stack, or no Python stack) and 2 (lost) are no keys."""
    reader = Reader(Generations(rotate_after_keys=100, rotate_after_ns=SECOND_NS))
    assert reader.new([(0, 0), (2, 1), (7, 1)]) == [(7, 1)]


def test_a_stack_the_map_no_longer_has_is_looked_up_again() -> None:
    generations = Generations(rotate_after_keys=100, rotate_after_ns=SECOND_NS)
    assert Reader(generations, gone=frozenset({9})).new([(9, 0)]) == [(9, 0)]
    assert Reader(generations).new([(9, 0)]) == [(9, 0)]


def test_the_maps_switch_once_the_generation_has_aged() -> None:
    generations = Generations(rotate_after_keys=100, rotate_after_ns=SECOND_NS)
    generations.start(5 * SECOND_NS)
    assert not generations.due(6 * SECOND_NS - 1)
    assert generations.due(6 * SECOND_NS)
    generations.advance(6 * SECOND_NS)
    assert generations.epoch == 1 and not generations.due(6 * SECOND_NS + 1)


def test_the_maps_switch_once_the_current_generation_is_half_full() -> None:
    """Only keys stored in the current generation's maps fill it."""
    generations = Generations(rotate_after_keys=2, rotate_after_ns=SECOND_NS)
    reader = Reader(generations)
    reader.new([(1, 1), (3, 1)])  # the other generation's
    assert not generations.due(0)
    reader.new([(5, 0), (7, 2)])
    assert generations.due(0)
    generations.advance(0)
    assert not generations.due(0)


class Attachments:
    """A stand-in for the loaded program: records what is attached."""

    def __init__(self) -> None:
        self.attached: list[str] = []

    def attach_tracepoint(self, program: str, category: str, event: str) -> None:
        self.attached.append(f"{category}:{event}")

    def attach_tracepoints(self, only: list[str]) -> None:
        self.attached += only


def program(attachments: Attachments) -> LoadedProgram:
    return attachments  # type: ignore[return-value]


def test_loop_hooks_attach_once_loaded_and_wanted() -> None:
    """A loop found while the hooks load is watched as soon as they are, and only once."""
    attachments = Attachments()
    hooks = LoopHooks(enabled=True)
    hooks.watch(program(attachments))
    assert attachments.attached == []
    hooks.loaded(program(attachments))
    assert "syscalls:sys_enter_epoll_wait" in attachments.attached
    attached = list(attachments.attached)
    hooks.watch(program(attachments))
    assert attachments.attached == attached


def test_loop_hooks_wait_for_a_loop_and_stay_off_when_disabled() -> None:
    attachments = Attachments()
    hooks = LoopHooks(enabled=True)
    hooks.loaded(program(attachments))
    assert attachments.attached == [], "no loop to watch yet"
    hooks.watch(None)  # the probe has been closed
    assert attachments.attached == []
    disabled = LoopHooks(enabled=False)
    disabled.loaded(program(attachments))
    disabled.watch(program(attachments))
    assert attachments.attached == []


def test_a_read_that_found_nothing_still_sends_a_watermark() -> None:
    """The batcher learns from it that a window is complete."""
    probe = CpuProbe(EbpfConfig.for_environment("development"), Stats(), targets=None)
    events = decode_events(probe.read_message(Records(b"", 96), None))
    assert [type(e) for e in events] == [Watermark]


async def sample_for(probe: CpuProbe, seconds: float) -> list[Event]:
    """Open ``probe``, run it for ``seconds``, stop, drain and close it: its events.

    Checks on the way that it loads programs and that nothing stays loaded."""
    events: list[Event] = []

    async def collect(message: EventMessage) -> None:
        events.extend(decode_events(message))

    await probe.open()
    probe.start()
    try:
        ours = program_ids()
        assert ours and probe.program_fds()
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe.run, collect)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()
        probe.stop()
        await probe.drain(collect)
    finally:
        probe.close()
    assert probe.program_fds() == [] and probe.map_fds() == []
    assert unloaded(ours)
    assert bpf_fds() == []
    return events


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
@pytest.mark.anyio
async def test_samples_a_busy_process_and_leaves_nothing_attached(
        running: subprocess.Popen[str]) -> None:
    config = (EbpfConfig.for_environment("development").with_pids([running.pid])
              .with_export_interval(0.5).with_sample_rate(99))
    stats = Stats()
    probe = CpuProbe(config, stats, targets=[running.pid])
    events = await sample_for(probe, 1.5)
    assert probe.kernel_drops() == 0

    cpu = [e for e in events if isinstance(e, CpuSample)]
    assert len(cpu) > 20 and {e.pid for e in cpu} == {running.pid}
    assert stats.received == len(cpu)
    stacks = {e.key: e for e in events if isinstance(e, StackTrace)}
    user = [stacks[e.user_stack] for e in cpu if e.user_stack in stacks]
    assert user and max(len(s.addresses) for s in user) >= 3  # main -> outer -> middle -> hot_leaf
    watermarks = [e for e in events if isinstance(e, Watermark)]
    assert watermarks[-1].stopped and not any(w.stopped for w in watermarks[:-1])


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
@pytest.mark.anyio
@pytest.mark.parametrize("idle", [False, True])
async def test_the_idle_task_is_sampled_only_when_asked(idle: bool) -> None:
    """Across the whole machine, the idle task (pid 0) is left out unless
    ``with_include_idle`` asks for it: time a CPU spends idle is not a process's."""
    config = (EbpfConfig.for_environment("development").with_sample_rate(99)
              .with_python_frames("off").with_include_idle(idle))
    probe = CpuProbe(config, Stats(), targets=None)
    events = await sample_for(probe, 1.0)
    pids = {e.pid for e in events if isinstance(e, CpuSample)}
    assert (0 in pids) == idle
