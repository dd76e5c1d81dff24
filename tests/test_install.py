"""``pip install`` into a fresh virtual environment of each CPython, then the README's
library examples, as a user would: no manual step, no bcc in the environment, and
nothing on stderr."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import NO_BPF_CAPS
from test_fallback import check_fallback, check_loop_stalls, check_shares, embedded

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYENV = Path("/root/.pyenv/versions")
INTERPRETERS = {"3.11": PYENV / "3.11.7/bin/python3.11", "3.12": PYENV / "3.12.1/bin/python3.12",
                "3.13": PYENV / "3.13.0/bin/python3.13"}
# What an example may import to run in an environment holding ebpf-stream alone.
_AVAILABLE = set(sys.stdlib_module_names) | {"anyio", "ebpf_stream"}

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]


def library_examples() -> list[str]:
    """The README's Python examples that need nothing but the package and the
    standard library (others need a web framework or a collector)."""
    examples = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [code for code in examples
            if {m.split(".")[0] for m in re.findall(r"^(?:from|import) ([\w.]+)", code, re.M)}
            <= _AVAILABLE and "OtlpExporter" not in code]


@pytest.fixture(scope="module", params=list(INTERPRETERS))
def installed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Path]:
    """The python of a fresh venv that ``pip install``ed this checkout."""
    interpreter = INTERPRETERS[request.param]
    if not interpreter.exists():
        pytest.skip(f"{interpreter} is not installed")
    venv = tmp_path_factory.mktemp(f"venv{request.param}")
    subprocess.run([str(interpreter), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # A copy of the checkout: pip builds in it, and the clone's own .venv stays out.
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(ROOT, source, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", ".cache", "out", "build",
                                                  "*.egg-info", "__pycache__"))
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    yield python


def test_the_environment_has_no_bcc(installed: Path) -> None:
    probe = subprocess.run([str(installed), "-c", "import importlib.util as u; "
                            "print(u.find_spec('bcc') is None)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "True", "bcc must stay out of a service's environment"


@pytest.mark.parametrize("example", range(len(library_examples())))
def test_readme_examples_run_without_a_word_on_stderr(
        installed: Path, example: int, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    code = library_examples()[example]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "PYTHON", "BCC_", "EBPF_STREAM_"))}
    env["EBPF_STREAM_CACHE"] = str(tmp_path_factory.getbasetemp() / "install-cache")
    result = subprocess.run([str(installed), "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "profiling is off" not in result.stdout


@pytest.mark.parametrize("workload", ["shares", "asyncio", "uvloop"])
def test_the_fallback_profiles_and_finds_stalls(installed: Path, workload: str,
                                                workdir: Path) -> None:
    """Root without the BPF capabilities, in the fresh environment of each CPython:
    the shares workload, and the stalls one on each loop."""
    if workload == "uvloop":
        added = subprocess.run([str(installed), "-m", "pip", "install", "-q", "uvloop>=0.19"],
                               capture_output=True, text=True, timeout=600)
        assert added.returncode == 0, added.stdout + added.stderr
    args = (["shares", "12", str(workdir)] if workload == "shares"
            else ["stalls", str(workdir), "--loop", workload])
    ran, log = embedded([*NO_BPF_CAPS, str(installed)], workdir, *args)
    check_fallback(ran, log, "uid 0 (root) lacks CAP_BPF")
    if workload == "shares":
        check_shares(ran, workdir / "profile.folded")
    else:
        check_loop_stalls(ran, workload)
