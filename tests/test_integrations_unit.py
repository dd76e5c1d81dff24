"""The integrations without a server: settings, file claims, the runner and the lifespan.

A mapping stands in for the environment, and no BPF is loaded.  The file
claims are real locks, taken by real processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from ebpf_stream import ConfigError, EbpfConfig, PythonFrames
from ebpf_stream.exporters import FoldedFileExporter, MemoryExporter
from ebpf_stream.integrations import ServiceProfiling
from ebpf_stream.integrations._claims import claim, holder, lock_path
from ebpf_stream.integrations._service import per_process_path
from ebpf_stream.integrations._settings import VARIABLES, Output, ProfilingOptions, read_settings
from ebpf_stream.integrations.starlette import ProfilingLifespan

README = Path(__file__).resolve().parent.parent / "README.md"
ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


def settings(env: dict[str, str], **options: object) -> object:
    return read_settings(ProfilingOptions(environ=env, **options))  # type: ignore[typeddict-item]


def refused(env: dict[str, str], **options: object) -> str:
    with pytest.raises(ConfigError) as info:
        settings(env, **options)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_nothing_set_means_no_profiling_and_says_why() -> None:
    s = read_settings(ProfilingOptions(environ={}))
    assert s.off == ("profiling is off: nothing says where profiles go "
                     "(set EBPF_STREAM_OUTPUT or OTEL_EXPORTER_OTLP_ENDPOINT)")


def test_outputs_are_split_on_commas_and_take_their_format_from_the_suffix() -> None:
    s = read_settings(ProfilingOptions(environ={
        "EBPF_STREAM_OUTPUT": " /a/cpu.folded, /b/cpu.{pid}.pb.gz,,/c/x.otlp.jsonl,/d/s.svg "}))
    assert s.off is None and not s.otlp
    assert s.outputs == (Output("folded", "/a/cpu.folded"), Output("pprof", "/b/cpu.{pid}.pb.gz"),
                         Output("otlp-json", "/c/x.otlp.jsonl"), Output("svg", "/d/s.svg"))
    assert s.config == EbpfConfig.for_environment("production")
    assert s.on_unavailable == "fallback"


def test_an_output_of_unknown_format_is_refused() -> None:
    assert refused({"EBPF_STREAM_OUTPUT": "/tmp/cpu.dat"}) == (
        "EBPF_STREAM_OUTPUT: cannot tell the format of '/tmp/cpu.dat' from its name (end it in "
        ".folded, .pb.gz, .speedscope.json, .svg or .otlp.jsonl)")


def test_the_config_variables_refine_the_preset() -> None:
    s = read_settings(ProfilingOptions(environ={
        "EBPF_STREAM_OUTPUT": "x.folded", "EBPF_STREAM_PRESET": "Debug",
        "EBPF_STREAM_SAMPLE_RATE": "97", "EBPF_STREAM_STALL_THRESHOLD_MS": "50",
        "EBPF_STREAM_PYTHON_FRAMES": "Python", "EBPF_STREAM_EXPORT_INTERVAL": "2.5",
        "EBPF_STREAM_ON_UNAVAILABLE": "RAISE"}))
    expected = (EbpfConfig.for_environment("debug").with_sample_rate(97)
                .with_export_interval(2.5).with_python_frames("python").with_stall_threshold(50))
    assert s.config == expected and s.on_unavailable == "raise"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("EBPF_STREAM_ENABLED", "maybe", "'maybe' is not a boolean (expected true or false)"),
    ("EBPF_STREAM_PRESET", "prod",
     "'prod' is not one of production, staging, development, debug"),
    ("EBPF_STREAM_SAMPLE_RATE", "5000", "5000 is outside the allowed range 1..1000"),
    ("EBPF_STREAM_SAMPLE_RATE", "fast", "'fast' is not a whole number"),
    ("EBPF_STREAM_SAMPLE_RATE", "99.5", "'99.5' is not a whole number"),
    ("EBPF_STREAM_EXPORT_INTERVAL", "inf", "'inf' is not a number (expected digits, like 2.5)"),
    ("EBPF_STREAM_EXPORT_INTERVAL", "0", "0.0 is outside the allowed range 0.1..3600"),
    ("EBPF_STREAM_STALL_THRESHOLD_MS", "-1", "'-1' is not a number (expected digits, like 2.5)"),
    ("EBPF_STREAM_PYTHON_FRAMES", "all", "'all' is not one of merged, python, off"),
    ("EBPF_STREAM_ON_UNAVAILABLE", "explode", "'explode' is not one of fallback, off, raise"),
])
def test_a_malformed_value_is_refused_in_one_line_naming_the_variable(
        name: str, value: str, message: str) -> None:
    assert refused({"EBPF_STREAM_OUTPUT": "x.folded", name: value}) == f"{name}: {message}"


def test_a_stall_threshold_without_python_frames_is_refused() -> None:
    assert refused({"EBPF_STREAM_OUTPUT": "x.folded", "EBPF_STREAM_PYTHON_FRAMES": "off",
                    "EBPF_STREAM_STALL_THRESHOLD_MS": "50"}).startswith(
        "EBPF_STREAM_STALL_THRESHOLD_MS: stall detection needs Python frames")
    s = read_settings(ProfilingOptions(environ={
        "EBPF_STREAM_OUTPUT": "x.folded", "EBPF_STREAM_PYTHON_FRAMES": "off",
        "EBPF_STREAM_STALL_THRESHOLD_MS": "0"}))
    assert s.config.python_frames is PythonFrames.OFF and s.config.loop_stall_ms == 0


def test_empty_variables_count_as_unset() -> None:
    s = read_settings(ProfilingOptions(environ={
        "EBPF_STREAM_OUTPUT": "x.folded", "EBPF_STREAM_ENABLED": "", "EBPF_STREAM_PRESET": " ",
        "EBPF_STREAM_SAMPLE_RATE": ""}))
    assert s.off is None and s.config == EbpfConfig()


@pytest.mark.parametrize("value", ["false", "0", "No", "OFF"])
def test_enabled_false_turns_profiling_off_whatever_else_is_set(value: str) -> None:
    s = read_settings(ProfilingOptions(environ={
        "EBPF_STREAM_ENABLED": value, "EBPF_STREAM_OUTPUT": "x.folded",
        "EBPF_STREAM_SAMPLE_RATE": "not even read", **ENDPOINT}))
    assert s.off == f"profiling is disabled (EBPF_STREAM_ENABLED={value})"


def test_enabled_true_with_nowhere_to_send_is_a_mistake() -> None:
    assert refused({"EBPF_STREAM_ENABLED": "true"}) == (
        "EBPF_STREAM_ENABLED: profiling is on, but nothing says where profiles go "
        "(set EBPF_STREAM_OUTPUT or OTEL_EXPORTER_OTLP_ENDPOINT)")
    assert refused({}, enabled=True).startswith("enabled: profiling is on, but nothing")


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT",
                                      "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT"])
def test_an_otlp_endpoint_in_the_environment_exports_otlp(variable: str) -> None:
    s = read_settings(ProfilingOptions(environ={variable: "http://collector:4318"}))
    assert s.off is None and s.otlp and s.outputs == ()


def test_otel_sdk_disabled_turns_the_environments_otlp_export_off() -> None:
    s = read_settings(ProfilingOptions(environ={**ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"}))
    assert s.off == ("profiling is off: OTEL_SDK_DISABLED=true turns OTLP export off, and no "
                     "EBPF_STREAM_OUTPUT is set")
    s = read_settings(ProfilingOptions(environ={**ENDPOINT, "OTEL_SDK_DISABLED": "true",
                                                "EBPF_STREAM_OUTPUT": "x.folded"}))
    assert s.off is None and not s.otlp and len(s.outputs) == 1
    # As the specification says: any value but "true" changes nothing.
    s = read_settings(ProfilingOptions(environ={**ENDPOINT, "OTEL_SDK_DISABLED": "1"}))
    assert s.otlp


def test_arguments_in_code_override_the_environment() -> None:
    env = {"EBPF_STREAM_ENABLED": "false", "EBPF_STREAM_OUTPUT": "env.folded",
           "EBPF_STREAM_SAMPLE_RATE": "not a number", "EBPF_STREAM_ON_UNAVAILABLE": "raise",
           **ENDPOINT}
    config = EbpfConfig().with_sample_rate(29)
    s = read_settings(ProfilingOptions(environ=env, enabled=True, config=config,
                                       outputs=[Path("code.pb.gz")], on_unavailable="off"))
    assert s.off is None and s.config is config and s.on_unavailable == "off"
    assert s.outputs == (Output("pprof", "code.pb.gz"),) and s.source == "outputs"
    assert s.otlp, "outputs stand for EBPF_STREAM_OUTPUT alone"
    assert set(s.ignored) == {"EBPF_STREAM_ENABLED", "EBPF_STREAM_SAMPLE_RATE",
                              "EBPF_STREAM_ON_UNAVAILABLE"}
    memory = MemoryExporter()
    s = read_settings(ProfilingOptions(environ={**env, "EBPF_STREAM_ENABLED": "",
                                                "EBPF_STREAM_SAMPLE_RATE": ""},
                                       exporters=[memory]))
    assert s.exporters == (memory,) and s.outputs == () and not s.otlp
    assert "EBPF_STREAM_OUTPUT" in s.ignored
    assert read_settings(ProfilingOptions(environ=env, exporters=[])).off is not None
    assert read_settings(ProfilingOptions(environ={"EBPF_STREAM_OUTPUT": "x.folded"},
                                          enabled=False)).off == (
        "profiling is disabled (enabled=False)")


def test_without_cpu_profiling_only_otlp_json_files_are_written() -> None:
    config = EbpfConfig().with_syscall_tracing(True).with_cpu_profiling(False)
    assert refused({}, config=config, outputs=["x.folded"]).startswith(
        "outputs: x.folded would hold CPU samples, and CPU profiling is off")
    assert settings({}, config=config, outputs=["x.otlp.jsonl"]).off is None  # type: ignore[attr-defined]


def test_every_variable_is_documented_in_the_readme() -> None:
    text = README.read_text()
    section = text[text.index("\n### Embed it in a service\n"):
                   text.index("\n### When the machine cannot run BPF\n")]
    for name in [*VARIABLES, "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"]:
        assert re.search(rf"`{name}`", section), name


@pytest.mark.parametrize(("name", "mine"), [
    ("cpu.pb.gz", "cpu.42.pb.gz"), ("app.otlp.jsonl", "app.42.otlp.jsonl"),
    ("a.speedscope.json", "a.42.speedscope.json"), ("my.service.folded", "my.service.42.folded"),
    ("flame.SVG", "flame.42.SVG"),
])
def test_a_per_process_name_keeps_the_format_suffix(name: str, mine: str) -> None:
    assert per_process_path(Path("/d") / name, 42) == Path("/d") / mine


# -- claims ---------------------------------------------------------------------------------

HOLD = """
    import sys
    from pathlib import Path
    from ebpf_stream.integrations._claims import claim
    taken = claim(Path(sys.argv[1]))
    print("held" if taken else "busy", flush=True)
    sys.stdin.read()
"""


def test_a_claimed_file_is_refused_to_other_processes_until_its_holder_dies(
        tmp_path: Path) -> None:
    path = tmp_path / "cpu.folded"
    other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        assert claim(path) is None
        assert holder(path) == other.pid
    finally:
        other.kill()
        other.wait()
    mine = claim(path)
    assert mine is not None and holder(path) == os.getpid()
    again = claim(path)  # this process's own claims are counted, never refused
    assert again is not None
    mine.release()
    busy = subprocess.run([sys.executable, "-c", textwrap.dedent(HOLD), str(path)],
                          input="", capture_output=True, text=True, timeout=60)
    assert busy.stdout.strip() == "busy", "one claim of this process is still held"
    again.release()
    free = subprocess.run([sys.executable, "-c", textwrap.dedent(HOLD), str(path)],
                          input="", capture_output=True, text=True, timeout=60)
    assert free.stdout.strip() == "held"
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock_path(path).name]


# -- the runner, where no BPF is needed -----------------------------------------------------

async def enter(**options: object) -> None:
    async with ServiceProfiling(**options) as profiler:  # type: ignore[arg-type]
        raise AssertionError(f"entered: {profiler}")


@pytest.mark.parametrize("source", ["env", "code"])
def test_an_output_directory_that_does_not_exist_is_refused_on_entering(
        source: str, tmp_path: Path) -> None:
    path = tmp_path / "missing" / "cpu.folded"
    options: dict[str, object] = (
        {"environ": {"EBPF_STREAM_OUTPUT": str(path)}} if source == "env"
        else {"environ": {}, "outputs": [path]})
    with pytest.raises(ConfigError) as info:
        anyio.run(lambda: enter(**options))
    name = "EBPF_STREAM_OUTPUT" if source == "env" else "outputs"
    assert str(info.value) == (f"{name}: cannot write {path}: directory {path.parent} "
                               "does not exist")


def test_a_malformed_otlp_endpoint_is_refused_on_entering() -> None:
    with pytest.raises(ConfigError) as info:
        anyio.run(lambda: enter(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}))
    assert str(info.value).startswith(
        "OTEL_EXPORTER_OTLP_ENDPOINT: 'collector:4318' is not a valid OTLP endpoint")


def test_with_nowhere_to_send_the_service_runs_unprofiled_with_one_info_line(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> object:
        service = ServiceProfiling(environ={})
        async with service as profiler:
            return profiler, service.profiler

    with caplog.at_level(logging.INFO, logger="ebpf_stream"):
        assert anyio.run(main) == (None, None)
    assert [r.getMessage() for r in caplog.records] == [
        "ebpf-stream: profiling is off: nothing says where profiles go "
        "(set EBPF_STREAM_OUTPUT or OTEL_EXPORTER_OTLP_ENDPOINT)"]
    assert caplog.records[0].levelno == logging.INFO


def test_a_file_exporter_given_in_code_is_left_out_while_another_process_writes_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cpu.folded"
    other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"

        async def main() -> object:
            async with ServiceProfiling(environ={},
                                        exporters=[FoldedFileExporter(path)]) as profiler:
                return profiler

        with caplog.at_level(logging.INFO, logger="ebpf_stream"):
            assert anyio.run(main) is None
    finally:
        other.kill()
        other.wait()
    assert [r.getMessage() for r in caplog.records] == [
        f"ebpf-stream: {path} is written by pid {other.pid}; this process (pid {os.getpid()}) "
        "leaves its FoldedFileExporter out (name files with outputs= or EBPF_STREAM_OUTPUT for "
        "one per process)",
        "ebpf-stream: profiling is off: every output is written by another process"]
    assert not path.exists()


def test_a_single_path_is_one_output() -> None:
    s = read_settings(ProfilingOptions(environ={}, outputs="cpu.folded"))  # type: ignore[typeddict-item]
    assert s.outputs == (Output("folded", "cpu.folded"),)


def test_the_lifespan_wraps_the_apps_own_and_passes_its_state_on() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def app_lifespan(app: object) -> AsyncIterator[dict[str, str]]:
        events.append(f"app starts: {app}")
        yield {"greeting": "hello"}
        events.append("app stops")

    lifespan = ProfilingLifespan(app_lifespan, environ={})

    async def main() -> None:
        async with lifespan("the app") as state:
            assert state == {"greeting": "hello"}
            events.append("serving")
        async with ProfilingLifespan(environ={})("the app") as state:
            assert state is None

    anyio.run(main)
    assert events == ["app starts: the app", "serving", "app stops"]
    assert lifespan.profiler is None  # nothing said where profiles go


def test_the_apps_own_lifespan_failing_at_shutdown_is_its_own_to_raise() -> None:
    @contextlib.asynccontextmanager
    async def app_lifespan(app: object) -> AsyncIterator[None]:
        yield
        raise RuntimeError("the app's own shutdown failed")

    async def main() -> None:
        async with ProfilingLifespan(app_lifespan, environ={})(None):
            pass

    with pytest.raises(RuntimeError, match="the app's own shutdown failed"):
        anyio.run(main)
