"""The README's Python examples run as written."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal
from otlp_receivers import http_receiver

README = Path(__file__).parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code: str, tmp_path: Path) -> None:
    for module in re.findall(r"^from (\w+)", code, flags=re.M):
        if module != "ebpf_stream":
            pytest.importorskip(module)
    if "Profiler" in code and os.geteuid() != 0:
        pytest.skip("the example loads BPF programs, which needs root")
    with contextlib.ExitStack() as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        if "OtlpExporter" in code:
            # The example exports to a collector the environment names: start one.
            portal = stack.enter_context(start_blocking_portal("asyncio"))
            receiver = stack.enter_context(portal.wrap_async_context_manager(http_receiver()))
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        if "OtlpExporter" in code:
            assert receiver.requests("profiles"), "the example delivered no profile"
