"""What importing the package does to a host: nothing heavy loads, no event loop is chosen.

Each check runs a fresh interpreter, since this test process has long loaded
everything.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("numpy", "google.protobuf", "grpc", "httpx", "rich", "click", "uvloop")


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


def loaded_after(statement: str) -> set[str]:
    """The names in ``sys.modules`` after ``statement`` runs in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(list(sys.modules)))"
    return set(json.loads(run_python(code)))


@pytest.mark.parametrize("statement", [
    "import ebpf_stream",
    "import ebpf_stream.exporters",
    "from ebpf_stream import Profiler, EbpfConfig",
])
def test_import_loads_no_heavy_module(statement: str) -> None:
    assert sorted(loaded_after(statement) & set(HEAVY)) == []


def test_the_integrations_load_neither_their_framework_nor_anything_heavy() -> None:
    loaded = loaded_after("import ebpf_stream.integrations.starlette\n"
                          "import ebpf_stream.integrations.aiohttp\n"
                          "from ebpf_stream.integrations import ServiceProfiling")
    frameworks = {"starlette", "fastapi", "aiohttp", "uvicorn", "gunicorn"}
    assert sorted(loaded & {*HEAVY, *frameworks}) == []


def test_making_file_exporters_loads_no_renderer(tmp_path: Path) -> None:
    """A service makes its exporters at startup: what renders them loads at the first
    export, in a worker thread."""
    loaded = loaded_after(
        "from ebpf_stream.exporters import FoldedFileExporter, FlamegraphSvgExporter, "
        "OtlpJsonFileExporter, PprofFileExporter, SpeedscopeFileExporter\n"
        f"d = {str(tmp_path)!r}\n"
        "FoldedFileExporter(d + '/a.folded'); FlamegraphSvgExporter(d + '/a.svg')\n"
        "OtlpJsonFileExporter(d + '/a.jsonl'); PprofFileExporter(d + '/a.pb.gz')\n"
        "SpeedscopeFileExporter(d + '/a.json')")
    renderers = {"ebpf_stream._outputs.folded", "ebpf_stream._outputs.flamegraph",
                 "ebpf_stream._outputs.speedscope", "ebpf_stream._convert.pprof_pb2",
                 "ebpf_stream._convert.converter", "xml.sax.saxutils"}
    assert sorted(loaded & {*HEAVY, *renderers}) == []


def test_every_public_name_resolves() -> None:
    for package in ("ebpf_stream", "ebpf_stream.exporters", "ebpf_stream.integrations"):
        out = run_python(f"import {package} as p\n"
                         "print(all(getattr(p, n).__name__ == n for n in p.__all__))")
        assert out.split() == ["True"], package
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_python("import ebpf_stream; ebpf_stream.NoSuchName")
    assert "module 'ebpf_stream' has no attribute 'NoSuchName'" in failed.value.stderr


def test_import_keeps_the_hosts_event_loop_policy() -> None:
    out = run_python(
        "import asyncio\n"
        "before = type(asyncio.get_event_loop_policy())\n"
        "import ebpf_stream, ebpf_stream.exporters, ebpf_stream._cli\n"
        "for name in ebpf_stream.__all__: getattr(ebpf_stream, name)\n"
        "print(before.__module__, type(asyncio.get_event_loop_policy()) is before)")
    assert out.split() == ["asyncio.unix_events", "True"]


def record_loop(tmp_path: Path, prelude: str) -> str:
    """The event loop ``ebpf-stream record`` logs it runs on, after ``prelude``."""
    out = tmp_path / "out.folded"
    argv = ["ebpf-stream", "-v", "record", "-d", "0.5", "-o", str(out), "--", "sleep", "1"]
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = {argv!r}\n"
            "runpy.run_module('ebpf_stream._cli', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.exists()
    loops = [line.rpartition(" ")[2] for line in done.stderr.splitlines()
             if line.startswith("INFO: event loop: ")]
    assert len(loops) == 1, done.stderr
    return loops[0]


@pytest.mark.bpf
@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop not installed")
def test_cli_runs_on_uvloop_when_installed(tmp_path: Path, bpf_environment: None) -> None:
    assert record_loop(tmp_path, "") == "uvloop"


@pytest.mark.bpf
def test_cli_falls_back_to_asyncio_without_uvloop(tmp_path: Path, bpf_environment: None) -> None:
    # A None entry in sys.modules makes every import of uvloop fail, as if not installed.
    assert record_loop(tmp_path, "import sys; sys.modules['uvloop'] = None") == "asyncio"


def test_profiling_cpu_loads_no_numpy(bpf_environment: None, tmp_path: Path) -> None:
    """numpy is the tracers' alone: a host that only profiles CPU would pay some
    12 MiB for it."""
    loaded = loaded_after(
        "import anyio, time\n"
        "from ebpf_stream import EbpfConfig, Profiler\n"
        "from ebpf_stream.exporters import FoldedFileExporter, OtlpJsonFileExporter\n"
        "async def main():\n"
        f"    out = [FoldedFileExporter({str(tmp_path / 'cpu.folded')!r}),\n"
        f"           OtlpJsonFileExporter({str(tmp_path / 'cpu.jsonl')!r})]\n"
        "    config = EbpfConfig.for_environment('production').with_export_interval(0.5)\n"
        "    async with Profiler(config, out) as profiler:\n"
        "        assert profiler.mode == 'bpf', profiler.unavailable\n"
        # Busy, so that this process (the profiler's target) has samples.
        "        deadline = time.monotonic() + 1\n"
        "        while time.monotonic() < deadline:\n"
        "            pass\n"
        "        await anyio.sleep(1)\n"
        "anyio.run(main)")
    assert (tmp_path / "cpu.folded").stat().st_size > 0
    assert "ebpf_stream._symbols" in loaded and "numpy" not in loaded
