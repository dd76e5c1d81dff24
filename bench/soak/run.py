"""The node agent left running under churn, with a collector that goes down and comes back.

Starts a collector (``receiver.py``: OTLP/HTTP on loopback, counting what
it takes), ``ebpf-stream agent`` with a config file pointing at it and a
stats file, and the churn of ``churn.py`` (short-lived processes, Python
processes, threads).  At ``--down-at`` the collector goes down for
``--down-for``, then comes back on the same port.  At the end the churn
stops, the agent gets SIGTERM, and the figures come from the agent's stats
file (one JSON line per ``--stats-interval``: RSS, open fds, CPU seconds,
BPF map entries, the sample counters) and from the collector's counts.

Checked, and printed as a table (``--json`` writes everything):

* RSS after warm-up stays within 10% of its level at ``--baseline-at``;
* open fds and every map's entries stay bounded (and under its capacity);
* everything exported and not counted as undelivered reached the
  collector (exactly: exported = collector's count + undelivered), nothing
  is counted as undelivered before the collector first went down, and the
  count stops growing once it is back;
* the agent's CPU, as a share of the machine, per window.

    sudo .venv/bin/python bench/soak/run.py                       # 30 minutes
    sudo .venv/bin/python bench/soak/run.py --minutes 3 --baseline-at 1 --down-at 1.5 \\
        --down-for 0.4 --stats-interval 2 --json /tmp/soak.json    # the suite's short soak
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
_AGENT_STOP_S = 90.0  # the agent's flush at SIGTERM is bounded by the OTLP timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Collector:
    """One life of ``receiver.py``; ``stop()`` takes it down and returns its counts."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "receiver.py"), str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.endpoint = self._line().strip()
        if not self.endpoint:
            raise RuntimeError(f"the collector did not start ({self.proc.wait()})")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def counts(self) -> dict[str, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._line()))

    def stop(self) -> dict[str, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        final = dict(json.loads(self._line()))
        self.proc.wait(timeout=30)
        return final


def agent_command() -> list[str]:
    return [sys.executable, "-m", "ebpf_stream._cli", "agent"]


def write_config(path: Path, endpoint: str, args: argparse.Namespace, stats: Path) -> None:
    path.write_text(
        f'sample_rate = {args.rate}\n'
        f'stats_interval = {args.stats_interval}\n'
        f'stats_file = "{stats}"\n'
        f'export_interval = {args.export_interval}\n'
        '\n[otlp]\n'
        f'endpoint = "{endpoint}"\n'
        'protocol = "http/protobuf"\n')


def read_stats(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


@contextlib.contextmanager
def churning(args: argparse.Namespace) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "churn.py"), "--spawn-rate", str(args.spawn_rate),
         "--python-every", str(args.python_every), "--thread-rate", str(args.thread_rate)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_churn(proc: subprocess.Popen[str]) -> dict[str, int]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    counts = dict(json.loads(proc.stdout.readline() or "{}"))
    proc.wait(timeout=60)
    return counts


def at(stats: list[dict[str, Any]], start: float, seconds: float) -> dict[str, Any]:
    """The report nearest ``seconds`` after ``start``."""
    return min(stats, key=lambda s: abs(s["time"] - start - seconds))


def cpu_windows(stats: list[dict[str, Any]], after: float, window_s: float) -> list[float]:
    """The agent's CPU as a % of the machine, over consecutive windows from ``after``."""
    cpus = os.cpu_count() or 1
    points = [s for s in stats if s["time"] >= after]
    shares = []
    i = 0
    for j in range(1, len(points)):
        dt = points[j]["time"] - points[i]["time"]
        if dt >= window_s:
            shares.append(100 * (points[j]["cpu_s"] - points[i]["cpu_s"]) / (dt * cpus))
            i = j
    return shares


def figures(stats: list[dict[str, Any]], start: float, stopping: float,
            args: argparse.Namespace, down: tuple[float, float], collected: dict[str, int],
            exit_code: int | None, churn: dict[str, int]) -> dict[str, Any]:
    baseline = at(stats, start, args.baseline_at * 60)
    # RSS while it runs: the report it writes as it exits comes after its caches went.
    later = [s for s in stats if baseline["time"] <= s["time"] < stopping]
    final = stats[-1]
    maps: dict[str, list[int]] = {}
    for s in stats:
        for name, (entries, capacity) in s["maps"].items():
            seen = maps.setdefault(name, [0, capacity])
            seen[0] = max(seen[0], entries)
    before_down = [s for s in stats if s["time"] <= down[0]]
    settled = [s for s in stats if s["time"] >= down[1] + args.retry_s + 2 * args.export_interval]
    delivered = collected["samples"] + collected["records"]
    cpu = cpu_windows(stats, baseline["time"], args.cpu_window_s)
    return {
        "minutes": args.minutes, "rate_hz": args.rate, "reports": len(stats),
        "rss_tolerance": args.rss_tolerance,
        "agent_exit": exit_code, "churn": churn,
        "rss_baseline": baseline["rss_bytes"], "rss_max_after": max(s["rss_bytes"] for s in later),
        "rss_min_after": min(s["rss_bytes"] for s in later),
        "rss_series_mib": [round(s["rss_bytes"] / 2**20, 1) for s in stats],
        "fds_baseline": baseline["open_fds"], "fds_max": max(s["open_fds"] for s in stats),
        "fds_final": final["open_fds"], "maps": maps,
        "final_maps": final["maps"],
        "counters": {k: final[k] for k in ("received", "dropped_kernel", "dropped_user",
                                           "exported", "lost_stacks", "export_errors",
                                           "undelivered", "rejected")},
        "collector": collected, "collector_got": delivered,
        "undelivered_before_down": before_down[-1]["undelivered"] if before_down else None,
        "undelivered_settled": settled[0]["undelivered"] if settled else None,
        "cpu_percent_windows": [round(c, 3) for c in cpu],
        "cpu_percent_median": round(statistics.median(cpu), 3) if cpu else None,
        "cpu_ns_per_sample": (round(final["cpu_s"] * 1e9 / final["received"])
                              if final["received"] else None),
        "down": [round(down[0] - start, 1), round(down[1] - start, 1)],
    }


def checks(f: dict[str, Any]) -> dict[str, bool]:
    c = f["counters"]
    return {
        "agent exited 0": f["agent_exit"] == 0,
        f"RSS within {f['rss_tolerance']:.0%} of its level at the baseline":
            f["rss_max_after"] <= (1 + f["rss_tolerance"]) * f["rss_baseline"]
            and f["rss_min_after"] >= (1 - f["rss_tolerance"]) * f["rss_baseline"],
        # One fd per live Python process's memory, and /proc files open for a moment.
        "open fds bounded": f["fds_max"] <= f["fds_baseline"] + 16,
        "maps under capacity": all(e < cap for e, cap in f["maps"].values()),
        "exported = collector's count + undelivered":
            c["exported"] == f["collector_got"] + c["undelivered"],
        "nothing undelivered before the collector went down": f["undelivered_before_down"] == 0,
        "undelivered stops growing once the collector is back":
            f["undelivered_settled"] in (None, c["undelivered"]),
    }


def report(f: dict[str, Any]) -> str:
    c = f["counters"]
    mib = 2**20
    lines = [
        f"Soak: {f['minutes']:g} min at {f['rate_hz']} Hz, collector down "
        f"{f['down'][0]:.0f}-{f['down'][1]:.0f} s; churn {json.dumps(f['churn'])}",
        "",
        "| figure | value |", "| --- | ---: |",
        f"| RSS at baseline / max / min after (MiB) | {f['rss_baseline'] / mib:.1f} / "
        f"{f['rss_max_after'] / mib:.1f} / {f['rss_min_after'] / mib:.1f} |",
        f"| open fds at baseline / max / final | {f['fds_baseline']} / {f['fds_max']} / "
        f"{f['fds_final']} |",
        f"| samples received / exported / dropped (kernel, user) | {c['received']:,} / "
        f"{c['exported']:,} / {c['dropped_kernel']:,}, {c['dropped_user']:,} |",
        f"| reached the collector / undelivered / export errors | {f['collector_got']:,} / "
        f"{c['undelivered']:,} / {c['export_errors']:,} |",
        f"| agent CPU % of the machine, median [min-max] of "
        f"{len(f['cpu_percent_windows'])} windows | {f['cpu_percent_median']} "
        f"[{min(f['cpu_percent_windows'], default=0)}-"
        f"{max(f['cpu_percent_windows'], default=0)}] |",
        f"| agent CPU per sample received (ns) | {f['cpu_ns_per_sample']:,} |",
    ]
    lines += [f"| map `{name}` max entries / capacity | {e:,} / {cap:,} |"
              for name, (e, cap) in sorted(f["maps"].items())]
    lines += ["", "| check | |", "| --- | --- |"]
    lines += [f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in checks(f).items()]
    return "\n".join(lines)


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = free_port()
    stats_path = work / "stats.jsonl"
    collected = {"samples": 0, "records": 0}
    first = Collector(port)
    collector: Collector | None = first
    config = work / "agent.toml"
    write_config(config, first.endpoint, args, stats_path)
    log: IO[str] = (work / "agent.log").open("w")
    # Started outside the checkout: ``-m`` puts the working directory first on sys.path,
    # which would shadow the ebpf_stream PYTHONPATH names.
    agent = subprocess.Popen([*agent_command(), "--config", str(config)], cwd=work,
                             stdout=log, stderr=subprocess.STDOUT, text=True)
    start = time.time()
    down = (start + args.down_at * 60, start + (args.down_at + args.down_for) * 60)
    exit_code: int | None = None
    stopping = math.inf
    try:
        with churning(args) as churn:
            while time.time() < start + args.minutes * 60:
                if agent.poll() is not None:
                    raise RuntimeError(f"the agent exited ({agent.returncode}): "
                                       f"{(work / 'agent.log').read_text()[-2000:]}")
                now = time.time()
                if collector is not None and down[0] <= now < down[1]:
                    for key, value in collector.stop().items():
                        collected[key] = collected.get(key, 0) + value
                    collector = None
                elif collector is None and now >= down[1]:
                    collector = Collector(port)
                time.sleep(0.5)
            churned = stop_churn(churn)
        stopping = time.time()
        agent.send_signal(signal.SIGTERM)
        exit_code = agent.wait(timeout=_AGENT_STOP_S)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if collector is not None:
            for key, value in collector.stop().items():
                collected[key] = collected.get(key, 0) + value
        log.close()
    stats = read_stats(stats_path)
    if not stats:
        raise RuntimeError(f"the agent wrote no stats: {(work / 'agent.log').read_text()[-2000:]}")
    result = figures(stats, start, stopping, args, down, collected, exit_code, churned)
    result["checks"] = checks(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--baseline-at", type=float, default=5.0,
                        help="minutes: the RSS and fds every later report is held to")
    parser.add_argument("--down-at", type=float, default=12.0, help="minutes")
    parser.add_argument("--down-for", type=float, default=2.0, help="minutes")
    parser.add_argument("--rss-tolerance", type=float, default=0.10,
                        help="how far RSS may stray from its baseline level, as a fraction")
    parser.add_argument("--rate", type=int, default=19)
    parser.add_argument("--stats-interval", type=float, default=10.0)
    parser.add_argument("--export-interval", type=float, default=10.0)
    parser.add_argument("--retry-s", type=float, default=60.0,
                        help="the exporter's retry budget per batch (OtlpExporter's retry_for_s)")
    parser.add_argument("--cpu-window-s", type=float, default=60.0)
    parser.add_argument("--spawn-rate", type=float, default=20.0)
    parser.add_argument("--python-every", type=float, default=2.0)
    parser.add_argument("--thread-rate", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the agent's config, log and stats here")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = soak(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="ebpf-stream-soak-") as work:
            result = soak(args, Path(work))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(report(result))
    sys.exit(0 if all(result["checks"].values()) else 1)


if __name__ == "__main__":
    main()
