"""Where BPF cannot run, the host runs on: real processes without the privileges.

Each script runs in its own process, as uid 65534 with no capabilities, or as
root with the BPF capabilities dropped, the way containers start services.
Debian's python3 runs the unprivileged ones: the test interpreter may live
where uid 65534 cannot read (pyenv under /root), so the package and its
dependencies come from this checkout and this environment's site-packages.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _support import DROPS_PRIVILEGES, NO_BPF_CAPS

ROOT = Path(__file__).resolve().parent.parent
WARNING = "ebpf-stream: profiling is off: "
FALLBACK = "ebpf-stream: profiling in fallback mode (in-process sampling, Python frames only): "

pytestmark = DROPS_PRIVILEGES




def run(prefix: list[str], code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, "-c", textwrap.dedent(code), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def readme_example(heading: str) -> str:
    """The first Python example after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n"):]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match is not None, heading
    return match.group(1)


def assert_ran_with_one_warning(result: subprocess.CompletedProcess[str], *named: str,
                                warning: str = FALLBACK) -> str:
    """The script ran to its end and said on one stderr line how it profiles, and why."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(warning), result.stderr
    for words in named:
        assert words in lines[0], lines[0]
    return lines[0]


SCRIPT = """
    import dataclasses, json, sys, time
    import anyio
    from ebpf_stream import EbpfConfig, Profiler
    from ebpf_stream.exporters import FoldedFileExporter

    async def main() -> None:
        started = time.monotonic()
        async with Profiler(EbpfConfig(), [FoldedFileExporter("out.folded")],
                            on_unavailable=sys.argv[1]) as profiler:
            entered = time.monotonic() - started
            await anyio.sleep(0.2)
        print(json.dumps({"entered_s": entered, "mode": profiler.mode,
                          "stats": dataclasses.asdict(profiler.stats),
                          "memory": profiler.get_overhead().memory_bytes}))

    anyio.run(main)
"""


def outcome(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """What SCRIPT printed about its run."""
    return dict(json.loads(result.stdout.splitlines()[-1]))


def test_an_unprivileged_host_is_profiled_in_fallback_with_one_warning(
        as_nobody: list[str], workdir: Path) -> None:
    result = run(as_nobody, SCRIPT, workdir, "fallback")
    assert_ran_with_one_warning(result, "CAP_BPF and CAP_PERFMON", "uid 65534", "fix: ")
    ran = outcome(result)
    assert ran["mode"] == "fallback"
    assert isinstance(ran["memory"], int) and ran["memory"] > 0


def test_an_unprivileged_host_asking_for_off_runs_unprofiled(as_nobody: list[str],
                                                             workdir: Path) -> None:
    result = run(as_nobody, SCRIPT, workdir, "off")
    assert_ran_with_one_warning(result, "CAP_BPF and CAP_PERFMON", "uid 65534", "fix: ",
                                warning=WARNING)
    ran = outcome(result)
    assert ran["mode"] == "off" and ran["memory"] == 0
    assert isinstance(ran["stats"], dict) and not any(ran["stats"].values())
    assert not (workdir / "out.folded").exists(), "exporters are not fed"


def test_the_sync_api_runs_on_unprivileged_too(as_nobody: list[str], workdir: Path) -> None:
    result = run(as_nobody, """
        from ebpf_stream import EbpfConfig, EbpfCpuProfiler
        profiler = EbpfCpuProfiler(EbpfConfig(), on_unavailable="off")
        profiler.start()
        total = sum(i * i for i in range(100_000))
        profiler.stop()
        print(profiler.mode, profiler.stats.received)
    """, workdir)
    assert_ran_with_one_warning(result, "uid 65534 lacks CAP_BPF", warning=WARNING)
    assert result.stdout.split() == ["off", "0"]


def test_the_readme_async_example_runs_unprivileged(as_nobody: list[str],
                                                    workdir: Path) -> None:
    result = run(as_nobody, readme_example("### Profile an async app"), workdir)
    assert_ran_with_one_warning(result, "CAP_BPF")
    assert "received=0" not in result.stdout and "mode='fallback'" in result.stdout
    assert "busy" in (workdir / "app.folded").read_text()


def test_the_readme_unavailable_example_runs_unprivileged(as_nobody: list[str],
                                                          workdir: Path) -> None:
    result = run(as_nobody, readme_example("### When the machine cannot run BPF"), workdir)
    assert_ran_with_one_warning(result, "CAP_BPF")
    assert "profiling: fallback privileges: " in result.stdout
    assert "cannot profile here: privileges: " in result.stdout


def test_root_without_the_bpf_capabilities_is_told_so_before_compiling(workdir: Path) -> None:
    result = run([*NO_BPF_CAPS, sys.executable], SCRIPT, workdir, "fallback")
    assert_ran_with_one_warning(result, "uid 0 (root) lacks CAP_BPF and CAP_PERFMON",
                                "--cap-add BPF")
    ran = outcome(result)
    assert ran["mode"] == "fallback"
    # A compile takes seconds; the capability check, a few milliseconds.
    assert isinstance(ran["entered_s"], float) and ran["entered_s"] < 1.0


STRICT = """
    import anyio
    from ebpf_stream import EbpfConfig, EbpfCpuProfiler, EnvironmentCheckError, Profiler

    async def main() -> None:
        try:
            async with Profiler(EbpfConfig(), on_unavailable="raise"):
                raise AssertionError("started without BPF")
        except EnvironmentCheckError as exc:
            print(repr(str(exc)))
        try:
            EbpfCpuProfiler(EbpfConfig(), on_unavailable="raise").start()
        except EnvironmentCheckError as exc:
            print(repr(str(exc)))

    anyio.run(main)
"""


@pytest.mark.parametrize("who", ["nobody", "root without CAP_BPF"])
def test_strict_mode_raises_the_reason_in_one_line(who: str, request: pytest.FixtureRequest,
                                                   workdir: Path) -> None:
    prefix = (request.getfixturevalue("as_nobody") if who == "nobody"
              else [*NO_BPF_CAPS, sys.executable])
    result = run(prefix, STRICT, workdir)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    messages = [eval(line) for line in result.stdout.splitlines()]
    assert len(messages) == 2
    for message in messages:
        assert "\n" not in message
        assert message.startswith("privileges: loading BPF needs CAP_BPF and CAP_PERFMON")


def test_doctor_as_nobody_lists_what_fails_and_exits_non_zero(as_nobody: list[str],
                                                             workdir: Path) -> None:
    result = subprocess.run([*as_nobody, "-m", "ebpf_stream._cli", "doctor"], cwd=workdir,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "checked as uid 65534" in result.stdout
    failed = {line.split("│")[1].strip() for line in result.stdout.splitlines()
              if "FAIL" in line}
    assert {"CAP_BPF", "CAP_PERFMON", "tracefs"} <= failed, result.stdout


def test_the_command_line_refuses_to_record_unprivileged(as_nobody: list[str],
                                                         workdir: Path) -> None:
    result = subprocess.run([*as_nobody, "-m", "ebpf_stream._cli", "record", "--duration", "1"],
                            cwd=workdir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: privileges: loading BPF needs CAP_BPF")


def test_an_output_directory_this_user_cannot_write_is_refused_when_made(
        as_nobody: list[str], workdir: Path) -> None:
    locked = workdir / "locked"
    locked.mkdir(mode=0o755)  # root's: uid 65534 may not write in it
    result = run(as_nobody, f"""
        from ebpf_stream import ConfigError
        from ebpf_stream.exporters import PprofFileExporter
        try:
            PprofFileExporter("{locked}/cpu.pb.gz")
        except ConfigError as exc:
            print(exc)
    """, workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"cannot write {locked}/cpu.pb.gz: directory {locked} "
                                     "is not writable by uid 65534")


# A machine other than x86-64, as the profiler would see one.
_ON_ARM = "import platform; platform.machine = lambda: 'aarch64'; import sys; "


def test_another_architecture_is_refused_in_one_line_by_the_command_line() -> None:
    result = subprocess.run([sys.executable, "-c", _ON_ARM + "sys.argv[1:] = ['record', "
                             "'--duration', '1']; from ebpf_stream._cli import main; main()"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: architecture: aarch64: BPF mode runs on x86-64 only; fix: run on an x86-64 "
        "machine, or let the profiler fall back (on_unavailable='fallback', the default)"]


def test_another_architecture_falls_back_and_says_why() -> None:
    result = subprocess.run([sys.executable, "-c", _ON_ARM + textwrap.dedent("""
        import anyio
        from ebpf_stream import Profiler

        async def main():
            async with Profiler() as profiler:
                await anyio.sleep(0.2)
            print(profiler.mode)

        anyio.run(main)
        """)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fallback"]
    (line,) = result.stderr.splitlines()
    assert "architecture: aarch64: BPF mode runs on x86-64 only" in line, line
