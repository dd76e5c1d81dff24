"""Waits off the CPU in the profile model and the formats that hold them."""

from __future__ import annotations

from sample_frames import EXT4, MAIN, PERIOD, READ, START, WORK
from sample_profiles import decode_pprof

from ebpf_stream._convert.converter import EventConverter
from ebpf_stream._model.batch import Batch
from ebpf_stream._model.profile import Profile, ProfileKind
from ebpf_stream._outputs.folded import collapse
from ebpf_stream._outputs.pprof import render_pprof


def profile_with_waits() -> Profile:
    """pid 10 on the CPU in work() 3 samples; waiting in read() twice, 1.5 ms in all,
    and pid 11 waiting only."""
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 1_000_000_000)
    p.add(10, "app", (MAIN, WORK), count=3, timestamps_ns=[START + 1] * 3)
    p.add_off_cpu(10, "app", (MAIN, WORK, READ, EXT4), 1_500_000, count=2,
                  timestamps_ns=[START + 10, START + 20], waits_ns=[1_000_000, 500_000])
    p.add_off_cpu(11, "db", (MAIN, READ), 2_000_000, timestamps_ns=[START + 30],
                  waits_ns=[2_000_000])
    return p


def test_waits_count_as_samples_but_stay_apart_from_the_cpu_samples() -> None:
    p = profile_with_waits()
    assert p.sample_count == 3 + 2 + 1
    assert [s.frames for s in p] == [(MAIN, WORK)]


def test_each_kind_of_profile_holds_its_own_time_in_microseconds() -> None:
    p = profile_with_waits()
    assert p.of_kind(ProfileKind.ON_CPU).off_cpu == {}
    off = collapse(p.of_kind(ProfileKind.OFF_CPU))
    assert off == {("app", "main", "work", "vfs_read_[k]", "ext4_file_read_iter_[k]"): 1500,
                   ("db", "main", "vfs_read_[k]"): 2000}
    wall = collapse(p.of_kind(ProfileKind.WALL))
    assert wall == {**off, ("app", "main", "work"): 3 * PERIOD // 1000}


def test_merging_keeps_the_waits() -> None:
    total = Profile(PERIOD, START, START)
    total.merge(profile_with_waits(), keep_timestamps=False)
    total.merge(profile_with_waits(), keep_timestamps=False)
    (read,) = [s for s in total.off_cpu.values() if s.pid == 10]
    assert (read.count, read.off_cpu_ns, read.timestamps_ns, read.waits_ns) == (
        4, 3_000_000, [], [])


def test_pprof_gives_the_waits_a_sample_type_of_their_own() -> None:
    out = decode_pprof(render_pprof(profile_with_waits()))
    s = out.string_table
    assert [(s[t.type], s[t.unit]) for t in out.sample_type] == [
        ("samples", "count"), ("cpu", "nanoseconds"), ("off_cpu", "nanoseconds")]
    assert sorted(list(sample.value) for sample in out.sample) == [
        [0, 0, 1_500_000], [0, 0, 2_000_000], [3, 3 * PERIOD, 0]]


def test_otlp_gives_each_process_an_off_cpu_profile() -> None:
    request = EventConverter(resource_attributes={}).convert_batch(
        Batch(profile_with_waits())).profiles
    strings = request.dictionary.string_table
    kinds = {}
    for rp in request.resource_profiles:
        pid = next(a.value.int_value for a in rp.resource.attributes if a.key == "process.pid")
        for profile in rp.scope_profiles[0].profiles:
            kind = strings[profile.sample_type.type_strindex]
            kinds.setdefault(pid, []).append(kind)
            if kind == "off_cpu":
                assert strings[profile.sample_type.unit_strindex] == "nanoseconds"
                waits = [(list(x.timestamps_unix_nano), list(x.values)) for x in profile.samples]
                assert waits == ([([START + 10, START + 20], [1_000_000, 500_000])] if pid == 10
                                 else [([START + 30], [2_000_000])])
    assert kinds == {10: ["samples", "cpu", "off_cpu"], 11: ["off_cpu"]}


def test_the_wall_clock_view_stands_each_stack_on_its_thread() -> None:
    p = Profile(period_ns=PERIOD, start_ns=START, end_ns=START + 1)
    p.add(10, "app", (MAIN, WORK), count=2, thread="app [10]")
    p.add(10, "app", (MAIN, WORK), count=1, thread="worker [12]")
    p.add_off_cpu(10, "app", (MAIN, READ), 3_000, thread="worker [12]")
    # On the CPU nothing changes: the threads' samples add up as before.
    assert collapse(p.of_kind(ProfileKind.ON_CPU)) == {("app", "main", "work"): 3}
    assert collapse(p.of_kind(ProfileKind.WALL)) == {
        ("app", "app [10]", "main", "work"): 2 * PERIOD // 1000,
        ("app", "worker [12]", "main", "work"): PERIOD // 1000,
        ("app", "worker [12]", "main", "vfs_read_[k]"): 3}
