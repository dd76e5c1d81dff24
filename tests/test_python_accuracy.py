"""Python function shares as ``ebpf-stream record`` sees them, against py-spy's
on the same run of the same process, for every interpreter on the machine.

py-spy reads the process from outside and knows nothing of BPF: it is the
independent reference.  Both record at 99 Hz for the same seconds (ours
starts later, as it compiles first); the workload's shares do not change
over its run, so the windows need not coincide.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from _support import start_ready
from test_python_runtime import INTERPRETERS, available

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]

SHARES = Path(__file__).parent / "workloads" / "python" / "shares.py"
FUNCTIONS = ("alpha", "beta", "gamma", "delta")
PY_SPY = Path(sys.executable).with_name("py-spy")
ECLI = Path(sys.executable).with_name("ebpf-stream")
SECONDS = 12  # at 12 s, py-spy's shares still vary by about 2 points (1 sd) from run to run
TOLERANCE = 0.05
# A frame label both tools write for a Python frame: ``name (file.py:line)``.
PYTHON_FRAME = re.compile(r"^(?P<name>.+) \((?P<file>[^()]+\.py):(?P<line>\d+)\)$")

Stacks = list[tuple[list[str], int]]  # root-first Python function names, samples


def read_stacks(path: Path, has_process: bool) -> Stacks:
    """The Python functions of each stack of a folded file (ours names the
    process first; py-spy's raw format does not)."""
    stacks: Stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        labels = stack.split(";")[1 if has_process else 0:]
        names = [m["name"] for m in map(PYTHON_FRAME.match, labels) if m]
        stacks.append((names, int(count)))
    return stacks


def shares(stacks: Stacks) -> tuple[dict[str, float], dict[str, float]]:
    """(leaf share, inclusive share) of each workload function among all samples."""
    total = sum(count for _, count in stacks)
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for names, count in stacks:
        if names:
            leaf[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return ({f: leaf[f] / total for f in FUNCTIONS},
            {f: inclusive[f] / total for f in FUNCTIONS})


@pytest.mark.skipif(not PY_SPY.exists(), reason="py-spy is not installed (dev extras)")
@pytest.mark.parametrize("name", list(INTERPRETERS))
def test_shares_match_py_spy(name: str, tmp_path: Path) -> None:
    workload = start_ready([available(name), str(SHARES), "60"])
    try:
        pid = str(workload.pid)
        ours_file, py_spy_file = tmp_path / "ours.folded", tmp_path / "py-spy.txt"
        ours = subprocess.Popen(
            [str(ECLI), "record", "--pid", pid, "--duration", str(SECONDS), "--rate", "99",
             "-o", str(ours_file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        reference = subprocess.run(
            [str(PY_SPY), "record", "--pid", pid, "--duration", str(SECONDS), "--rate", "99",
             "--format", "raw", "--nonblocking", "-o", str(py_spy_file)],
            capture_output=True, text=True, check=False)
        assert reference.returncode == 0, reference.stderr
        _, errors = ours.communicate(timeout=60)
        assert ours.returncode == 0, errors
    finally:
        workload.send_signal(signal.SIGINT)
        truth_line, _ = workload.communicate(timeout=10)
    # The workload's own thread CPU time per function: a sanity check of both.
    truth = json.loads(truth_line)
    truth_total = truth["alpha"] + truth["beta"] + truth["delta"]

    ours_leaf, ours_inclusive = shares(read_stacks(ours_file, has_process=True))
    ref_leaf, ref_inclusive = shares(read_stacks(py_spy_file, has_process=False))
    report = (f"ours leaf {ours_leaf}, py-spy leaf {ref_leaf}; ours inclusive "
              f"{ours_inclusive}, py-spy inclusive {ref_inclusive}; truth {truth}")
    for function in FUNCTIONS:
        assert abs(ours_leaf[function] - ref_leaf[function]) <= TOLERANCE, report
        assert abs(ours_inclusive[function] - ref_inclusive[function]) <= TOLERANCE, report
    assert abs(ours_inclusive["beta"] - truth["beta"] / truth_total) <= TOLERANCE, report
    assert abs(ours_leaf["alpha"] - truth["alpha"] / truth_total) <= TOLERANCE, report
    print(report)
