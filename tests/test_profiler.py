"""The whole pipeline on real BPF: probes, reader, batcher, exporters, cleanup."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import anyio
import msgspec
import otlp_stacks
import pytest
from _support import UVLOOP, bpf_fds, cpu_seconds, loaded_programs, program_ids, start_ready
from otlp_receivers import grpc_receiver

from ebpf_stream import (
    Batch,
    ConfigError,
    EbpfConfig,
    EbpfCpuProfiler,
    Exporter,
    ExportError,
    FrameKind,
    OverflowPolicy,
    ProbeError,
    Profile,
    Profiler,
    Stats,
    TargetError,
)
from ebpf_stream.exporters import FoldedFileExporter, MemoryExporter

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]


def config_for(pid: int, **changes: object) -> EbpfConfig:
    base = (EbpfConfig.for_environment("development").with_pids([pid])
            .with_export_interval(0.5).with_sample_rate(99))
    return msgspec.structs.replace(base, **changes)


async def profile_until_killed(proc: subprocess.Popen[str], seconds: float,
                               *also: Exporter, shutdown_timeout: float = 15.0,
                               **changes: object) -> tuple[Profile, Stats]:
    """Profile ``proc`` for ``seconds``, then kill it; ``also`` export alongside."""
    memory = MemoryExporter()
    try:
        async with Profiler(config_for(proc.pid, **changes), [memory, *also],
                            shutdown_timeout=shutdown_timeout) as profiler:
            await anyio.sleep(seconds)
    finally:
        proc.kill()
        proc.wait()
    assert memory.profile is not None
    return memory.profile, profiler.stats


def shares(profile: Profile, leaf: str) -> float:
    total = profile.sample_count
    return sum(s.count for s in profile if s.frames and s.frames[-1].name == leaf) / total


@pytest.mark.parametrize("anyio_backend", ["asyncio", UVLOOP], ids=["asyncio", "uvloop"])
@pytest.mark.anyio
async def test_native_hot_function_dominates_in_root_first_order(
        running: subprocess.Popen[str]) -> None:
    memory = MemoryExporter()
    async with Profiler(config_for(running.pid), [memory]) as profiler:
        cpu = cpu_seconds(running.pid)
        await anyio.sleep(2)
        cpu = cpu_seconds(running.pid) - cpu
    assert profiler.mode == "bpf" and profiler.unavailable is None
    profile = memory.profile
    assert profile is not None and memory.closed
    assert profile.sample_count >= 0.85 * cpu * 99
    assert shares(profile, "hot_leaf") > 0.8
    top = max(profile, key=lambda s: s.count)
    names = [f.name for f in top.frames]
    assert names[-4:] == ["main", "outer", "middle", "hot_leaf"]
    assert names[0] == "__libc_start_call_main" or names[0].startswith("libc.so.6+0x")
    assert top.process == "hot_native" and top.pid == running.pid
    stats = profiler.stats
    assert stats.received == stats.exported == profile.sample_count
    assert stats.dropped == 0 and stats.lost_stacks == 0


@pytest.mark.anyio
async def test_syscall_heavy_workload_shows_kernel_frames_after_user_frames(
        syscall_heavy: Path) -> None:
    profile, _ = await profile_until_killed(start_ready([str(syscall_heavy), "30"]), 1.5)
    in_kernel = [s for s in profile if s.frames and s.frames[-1].kind is FrameKind.KERNEL]
    assert sum(s.count for s in in_kernel) > 0.5 * profile.sample_count
    for s in in_kernel:
        kinds = [f.kind for f in s.frames]
        first_kernel = kinds.index(FrameKind.KERNEL)
        assert all(k is FrameKind.KERNEL for k in kinds[first_kernel:]), "kernel frames last"
        assert all(f.module == "[kernel.kallsyms]" for f in s.frames[first_kernel:])
    names = {f.name for s in in_kernel for f in s.frames}
    # libc's read() keeps no frame pointer, so it hides its caller; main stays.
    assert {"main", "ksys_read", "entry_SYSCALL_64_after_hwframe"} <= names


@pytest.mark.anyio
async def test_host_event_loop_keeps_ticking_while_starting_and_running(
        running: subprocess.Popen[str]) -> None:
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.05)
        started = time.monotonic()
        async with Profiler(config_for(running.pid), [MemoryExporter()]):
            startup = time.monotonic() - started
            await anyio.sleep(1.5)
        tg.cancel_scope.cancel()
    assert startup > 0.2, "compiling takes a while; the ticker must have run meanwhile"
    assert len(gaps) > (startup + 1.5) / 0.05
    assert max(gaps) < 0.25, f"the host loop stalled for {max(gaps):.3f}s"


@pytest.mark.anyio
async def test_nothing_stays_loaded_after_exit(running: subprocess.Popen[str]) -> None:
    async with Profiler(config_for(running.pid), [MemoryExporter()]):
        ours = program_ids()
        assert ours and ours <= loaded_programs(), "the probe should be loaded"
    assert not ours & loaded_programs()
    assert bpf_fds() == []


@pytest.mark.anyio
async def test_cancellation_flushes_and_detaches(running: subprocess.Popen[str]) -> None:
    memory = MemoryExporter()
    ours: set[int] = set()
    started = anyio.Event()

    async def profile() -> None:
        nonlocal ours
        async with Profiler(config_for(running.pid, export_interval_s=60.0), [memory]):
            ours = program_ids()
            started.set()
            await anyio.sleep(30)

    async with anyio.create_task_group() as tg:
        tg.start_soon(profile)
        await started.wait()
        await anyio.sleep(1)
        tg.cancel_scope.cancel()
    assert memory.closed and memory.profile is not None
    assert memory.profile.sample_count > 50, "what was collected before cancelling is exported"
    assert ours and not ours & loaded_programs()
    assert bpf_fds() == []


@pytest.fixture
def cold_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty compile cache: every probe compiles, as on a machine's first start."""
    monkeypatch.setenv("EBPF_STREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.anyio
async def test_cancellation_while_starting_leaves_nothing_loaded(
        running: subprocess.Popen[str], cold_cache: Path) -> None:
    with anyio.move_on_after(0.2) as scope:
        async with Profiler(config_for(running.pid), [MemoryExporter()]):
            pytest.fail("the profiler cannot have started within 0.2 s")
    assert scope.cancelled_caught
    assert bpf_fds() == [], "the program compiled meanwhile must be closed"


@pytest.mark.anyio
async def test_stack_maps_rotate_without_losing_stacks(many_stacks: Path) -> None:
    # 48 stacks in every 0.2 s generation, in maps of 128 entries: two of
    # them share a bucket of a table that size (about 9 pairs on average),
    # and none may be lost for it.
    proc = start_ready([str(many_stacks)])
    try:
        memory = MemoryExporter()
        config = config_for(proc.pid, export_interval_s=0.2, stack_map_entries=128,
                            sample_rate_hz=499)
        async with Profiler(config, [memory]) as profiler:
            await anyio.sleep(3)
    finally:
        proc.kill()
        proc.wait()
    profile = memory.profile
    assert profile is not None
    assert profiler.stats.lost_stacks == 0
    depths = {sum(f.name == "descend" for f in s.frames) for s in profile
              if s.frames[-1].name == "spin"}
    assert depths == set(range(2, 50))  # descend(n) is n + 1 frames


class SlowExporter:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.samples = 0

    async def export(self, batch: Batch) -> None:
        await anyio.sleep(self.delay)
        self.samples += batch.profile.sample_count

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_slow_exporter_under_drop_oldest_counts_every_sample(
        running: subprocess.Popen[str]) -> None:
    slow = SlowExporter(0.8)
    config = config_for(running.pid, export_interval_s=0.1, max_samples=5,
                        overflow_policy=OverflowPolicy.DROP_OLDEST)
    async with Profiler(config, [slow]) as profiler:
        await anyio.sleep(2.5)
    stats = profiler.stats
    assert stats.dropped_user > 0
    assert stats.exported == slow.samples
    assert stats.received == stats.exported + stats.dropped_user


@pytest.mark.anyio
async def test_max_samples_caps_each_interval(running: subprocess.Popen[str]) -> None:
    memory = MemoryExporter()
    config = config_for(running.pid, export_interval_s=0.5, max_samples=10)
    async with Profiler(config, [memory]) as profiler:
        await anyio.sleep(2)
    assert all(b.profile.sample_count <= 10 for b in memory.batches)
    stats = profiler.stats
    assert len(memory.batches) > 2 / 0.5 + 1, "full windows go early"
    assert stats.received == stats.exported + stats.dropped_user


class FailingExporter:
    async def export(self, batch: Batch) -> None:
        raise ExportError("disk full")

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_a_failing_exporter_does_not_starve_the_others(
        running: subprocess.Popen[str], tmp_path: Path) -> None:
    folded = tmp_path / "out.folded"
    with pytest.raises(ExportError, match="disk full"):
        async with Profiler(config_for(running.pid), [FailingExporter(),
                                                      FoldedFileExporter(folded)]):
            await anyio.sleep(1)
    assert "hot_leaf" in folded.read_text()


@pytest.mark.anyio
async def test_a_missing_pid_is_refused_before_loading() -> None:
    with pytest.raises(TargetError, match="pid 4000000: no such process"):
        async with Profiler(EbpfConfig().with_pids([4_000_000])):
            pass
    assert bpf_fds() == []


def test_sync_api_profiles_the_host_process() -> None:
    memory = MemoryExporter()
    profiler = EbpfCpuProfiler(EbpfConfig().with_sample_rate(99).with_export_interval(0.5),
                               [memory])
    profiler.start()
    ours = program_ids()
    try:
        busy = time.thread_time()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            sum(i * i for i in range(1000))
        busy = time.thread_time() - busy
        overhead = profiler.get_overhead()
    finally:
        profiler.stop()
    assert memory.profile is not None
    assert {s.pid for s in memory.profile} == {os.getpid()}
    assert profiler.stats.received > 0.85 * busy * 99
    assert 0 < overhead.cpu_percent < 20
    assert overhead.bpf_cpu_ns > 0 and overhead.bpf_run_count > 0
    # Memory is what the process grew by since the start: in a test process
    # whose heap earlier profilers already grew, that may be nothing.
    assert overhead.bpf_map_bytes > 0 and overhead.memory_bytes >= overhead.anon_rss_bytes >= 0
    assert ours and not ours & loaded_programs()
    assert bpf_fds() == []


@pytest.mark.anyio
async def test_a_full_ring_is_counted_as_kernel_drops(running: subprocess.Popen[str]) -> None:
    slow = SlowExporter(1.5)
    config = config_for(running.pid, sample_rate_hz=1000, ring_buffer_bytes=4096,
                        export_interval_s=0.1, channel_capacity=1, max_samples=50,
                        overflow_policy=OverflowPolicy.BLOCK)
    async with Profiler(config, [slow], shutdown_timeout=30) as profiler:
        await anyio.sleep(2)
    stats = profiler.stats
    assert stats.dropped_kernel > 0, "backpressure must reach the kernel ring"
    assert stats.received == stats.exported + stats.dropped_user


@pytest.mark.anyio
async def test_stacks_a_full_stack_map_could_not_store_are_counted(many_stacks: Path) -> None:
    # 200 stacks against maps of 64 entries, while a slow exporter holds the
    # reader up: the map fills before the reader can rotate it.
    proc = start_ready([str(many_stacks), "30", "200"])
    # The slow exporter drains the backlog after the run at 0.5 s a batch: on a
    # loaded machine that takes longer than the default shutdown timeout.
    profile, stats = await profile_until_killed(
        proc, 2, SlowExporter(0.5), shutdown_timeout=120, sample_rate_hz=999,
        stack_map_entries=64,
        export_interval_s=0.1, channel_capacity=1, max_samples=5000,
        overflow_policy=OverflowPolicy.BLOCK, ring_buffer_bytes=1 << 20)
    lost = sum(s.count for s in profile if any(f.name == "[stack lost]" for f in s.frames))
    assert stats.lost_stacks == lost > 0
    assert profile.sample_count == stats.received, "lost stacks keep their samples"


@pytest.mark.anyio
async def test_otel_endpoint_alone_makes_the_profiler_export_otlp(
        running: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    async with grpc_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout")
        async with Profiler(config_for(running.pid)) as profiler:
            await anyio.sleep(1.5)
        stats = profiler.stats
        delivered = otlp_stacks.stacks(receiver.requests("profiles"))
    assert stats.received > 50 and stats.undelivered == 0
    assert sum(delivered.values()) == stats.exported == stats.received - stats.dropped
    assert {pid for pid, _ in delivered} == {running.pid}


@pytest.mark.anyio
async def test_a_malformed_otel_endpoint_is_refused_before_loading(
        running: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")
    before = loaded_programs()
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT: 'collector:4318'"):
        async with Profiler(config_for(running.pid)):
            pass
    assert loaded_programs() == before


def one_probe_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a real CPU probe beside one the kernel refuses, as a verifier would."""
    from ebpf_stream._probes import cpu

    class Refused(cpu.CpuProbe):
        async def open(self) -> None:
            await anyio.sleep(0.1)
            raise ProbeError("refused.bpf.c failed to compile or load: on purpose")

    def two_probes(config: EbpfConfig, stats: object, **kwargs: object) -> list[object]:
        return [cpu.CpuProbe(config, stats, **kwargs), Refused(config, stats, **kwargs)]  # type: ignore[arg-type]

    monkeypatch.setattr("ebpf_stream._profiler.probes_for", two_probes)


@pytest.mark.anyio
async def test_a_refused_probe_turns_profiling_off_with_one_warning_and_the_body_runs(
        running: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    one_probe_refused(monkeypatch)
    memory = MemoryExporter()
    ran = False
    async with Profiler(config_for(running.pid), [memory]) as profiler:
        assert bpf_fds() == [], "the probe that opened must be closed"
        await anyio.sleep(0.6)  # past an export interval
        ran = True
    assert ran and profiler.mode == "off"
    assert isinstance(profiler.unavailable, ProbeError)
    assert profiler.stats == Stats() and profiler.get_overhead().memory_bytes == 0
    assert memory.batches == [] and not memory.closed, "exporters are not fed"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["ebpf-stream: profiling is off: refused.bpf.c failed to compile or "
                        "load: on purpose"]


@pytest.mark.anyio
async def test_a_refused_probe_closes_the_others_and_is_raised_alone_when_asked(
        running: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    one_probe_refused(monkeypatch)
    with pytest.raises(ProbeError, match="on purpose"):
        async with Profiler(config_for(running.pid), [MemoryExporter()],
                            on_unavailable="raise"):
            pytest.fail("cannot start with a probe that failed")
    assert bpf_fds() == [], "the probe that opened must be closed"


@pytest.mark.anyio
async def test_a_background_start_refused_runs_the_body_then_raises_when_asked(
        running: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Started in the background, a refusal cannot reach the host's code while it
    runs: it is logged at once, and raised when the block exits."""
    one_probe_refused(monkeypatch)
    ran = False
    with pytest.raises(ProbeError, match="on purpose"):
        async with Profiler(config_for(running.pid), [MemoryExporter()],
                            on_unavailable="raise", start_in_background=True) as profiler:
            assert await profiler.wait_started() == "off"
            assert bpf_fds() == [], "the probe that opened must be closed"
            ran = True
    assert ran
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["ebpf-stream: profiling did not start: refused.bpf.c failed to compile "
                      "or load: on purpose"]


def test_an_unknown_on_unavailable_is_a_config_error() -> None:
    with pytest.raises(ConfigError,
                       match="on_unavailable: 'ignore' is not one of fallback, off, raise"):
        Profiler(on_unavailable="ignore")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_background_start_returns_at_once_and_profiles_once_loaded(
        running: subprocess.Popen[str], cold_cache: Path) -> None:
    memory = MemoryExporter()
    started = time.monotonic()
    async with Profiler(config_for(running.pid), [memory], start_in_background=True) as p:
        entered = time.monotonic() - started
        assert p.mode == "starting"
        assert await p.wait_started() == "bpf"
        loaded = time.monotonic() - started
        await anyio.sleep(1)
    running.kill()
    running.wait()
    assert entered < 0.1 < loaded, (entered, loaded)
    assert memory.profile is not None and memory.profile.sample_count > 20
    assert await p.wait_started() == "bpf", "a finished run keeps its mode"


@pytest.mark.anyio
async def test_leaving_during_a_background_start_leaves_nothing_loaded(
        running: subprocess.Popen[str], cold_cache: Path) -> None:
    memory = MemoryExporter()
    async with Profiler(config_for(running.pid), [memory], start_in_background=True) as p:
        await anyio.sleep(0.2)
        assert p.mode == "starting"
    assert p.mode == "off" and p.unavailable is None
    assert bpf_fds() == [], "the program compiled meanwhile must be closed"
    assert memory.profile is None


@pytest.mark.anyio
async def test_a_second_start_loads_from_the_compile_cache(
        running: subprocess.Popen[str], cold_cache: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "ebpf_stream")
    entered = []
    for _ in range(2):
        caplog.clear()
        started = time.monotonic()
        async with Profiler(config_for(running.pid), [MemoryExporter()]):
            entered.append(time.monotonic() - started)
        messages = [r.getMessage() for r in caplog.records]
    assert "loaded cpu_profile.bpf.c from the compile cache" in messages
    assert not any(m.startswith("compiled") for m in messages), messages
    assert entered[1] < entered[0], entered
