"""OTLP export: encode cost per sample, and samples per second delivered to a receiver.

Both measurements use one synthetic batch the size of the production
preset's largest (``max_samples``: 20,000 samples), shaped like a real one:
about 2,000 distinct stacks of 20 to 30 frames over 10 processes, native
frames from several shared objects with C++-length names, a kernel tail on
a third of the stacks, a skewed number of samples per stack, and one
timestamp per sample over a 10 s export interval.  The batch is built from a
fixed seed, so every run encodes the same data.

* **Encode**: each stage of the OTLP encoding, timed alone on one thread
  (``EventConverter.convert_batch``, protobuf serialization, gzip,
  ``encode_otlp_json``), and ``render_pprof`` on the same batch, in CPU ns
  per sample (median of the repeats).  The thread's CPU clock, not the wall
  clock, so other work on the machine does not count; it still shares the
  caches.
* **Delivery**: ``OtlpExporter`` exports N copies of the batch to a loopback
  receiver over gRPC or HTTP, gzip on or off, and the clock stops when
  ``aclose()`` returns: by then every request has been answered by the
  receiver (the sender awaits each response), and the exporter counted no
  loss.  The receiver (``tests/otlp_receivers.py``, which decodes every
  request as a collector would) runs in a separate process, so its CPU does
  not share the exporter's core and GIL.  It also counts the payload bytes
  it received, for the MB/s on the wire.  Throughput is wall-clock, so each
  run also reports the machine's CPU used by other processes meanwhile.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from ebpf_stream import EbpfConfig
from ebpf_stream._base.config import OverflowPolicy
from ebpf_stream._convert.converter import EventConverter
from ebpf_stream._convert.json import encode_otlp_json
from ebpf_stream._model.batch import Batch
from ebpf_stream._model.profile import Frame, FrameKind, ProcessInfo, Profile
from ebpf_stream._outputs.otlp.exporter import OtlpExporter
from ebpf_stream._outputs.pprof import render_pprof

from ._support import machine_percent, median, process_clock_ns

SAMPLES = EbpfConfig().max_samples  # the production preset's largest batch
STACKS = 2_000
PROCESSES = 10
INTERVAL_NS = 10 * 10**9
ENCODE_REPEATS = 15
DELIVERY_BATCHES = 20  # batches per timed delivery run
DELIVERY_REPEATS = 5
TRANSPORTS = [(protocol, compression) for protocol in ("grpc", "http/protobuf")
              for compression in ("none", "gzip")]

# -- the batch -----------------------------------------------------------------

_WORDS = ("Buffer", "Executor", "Planner", "Hash", "Join", "Scan", "Tuple", "Index", "Lock",
          "Manager", "Request", "Handler", "Stream", "Session", "Codec", "Frame", "Queue",
          "Worker", "Allocator", "Cache", "Table", "Node", "Parser", "Writer", "Reader")
_KERNEL_NAMES = (
    "entry_SYSCALL_64_after_hwframe", "do_syscall_64", "__x64_sys_read", "ksys_read",
    "vfs_read", "new_sync_read", "sock_read_iter", "tcp_recvmsg", "tcp_recvmsg_locked",
    "skb_copy_datagram_iter", "__x64_sys_futex", "do_futex", "futex_wait", "schedule",
    "__schedule", "asm_sysvec_apic_timer_interrupt", "sysvec_apic_timer_interrupt",
    "__sysvec_apic_timer_interrupt", "hrtimer_interrupt", "__hrtimer_run_queues",
    "tick_nohz_handler", "update_process_times", "asm_exc_page_fault", "exc_page_fault",
    "do_user_addr_fault", "handle_mm_fault", "__handle_mm_fault", "do_anonymous_page",
    "clear_page_erms", "copy_user_enhanced_fast_string", "__x64_sys_epoll_wait",
    "do_epoll_wait", "ep_poll", "__x64_sys_write", "ksys_write", "vfs_write",
    "ext4_file_write_iter", "generic_perform_write", "filemap_get_pages", "mutex_lock",
)
_PROGRAMS = (
    ("postgres", "/usr/lib/postgresql/16/bin/postgres", "-D /var/lib/postgresql/16/main"),
    ("nginx", "/usr/sbin/nginx", "-g daemon off;"),
    ("envoy", "/usr/local/bin/envoy", "-c /etc/envoy/envoy.yaml --concurrency 2"),
    ("redis-server", "/usr/bin/redis-server", "*:6379"),
    ("clickhouse-serv", "/usr/bin/clickhouse", "server --config-file=/etc/clickhouse.xml"),
    ("mysqld", "/usr/sbin/mysqld", "--defaults-file=/etc/mysql/my.cnf"),
    ("containerd", "/usr/bin/containerd", ""),
    ("haproxy", "/usr/sbin/haproxy", "-f /etc/haproxy/haproxy.cfg -Ws"),
    ("node", "/usr/bin/node", "/srv/app/server.js --port 8080"),
    ("memcached", "/usr/bin/memcached", "-m 1024 -p 11211 -u memcache"),
)
_LIBRARIES = ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
              "/usr/lib/x86_64-linux-gnu/libssl.so.3", "/usr/lib/x86_64-linux-gnu/libz.so.1")


def _cpp_name(rng: random.Random) -> str:
    """A demangled C++ name of typical length (about 30 to 130 characters)."""
    ns = rng.choice(("pg", "envoy", "http", "storage", "net", "absl", "DB", "std"))
    cls = "".join(rng.sample(_WORDS, 2))
    method = rng.choice(("process", "handle", "read", "write", "flush", "lookup", "insert"))
    method += rng.choice(_WORDS)
    args = ", ".join(rng.sample(("unsigned long", "std::string const&", "int",
                                 f"std::vector<{rng.choice(_WORDS)}, std::allocator<char> > const&",
                                 f"{rng.choice(_WORDS)}*", "bool"), rng.randint(1, 3)))
    return f"{ns}::{cls}::{method}({args})"


def _native_frames(rng: random.Random, executable: str) -> list[Frame]:
    """A process's call sites: 300 functions over the executable and its libraries."""
    frames = []
    for i in range(300):
        module = executable if i % 3 else rng.choice(_LIBRARIES)
        base = rng.randrange(0x1000, 0x2000000, 16)
        frames += [Frame(_cpp_name(rng), module, FrameKind.NATIVE, base + 4 * site)
                   for site in range(2)]  # two call sites per function
    return frames


def make_batch(samples: int = SAMPLES, stacks: int = STACKS, processes: int = PROCESSES,
               seed: int = 0) -> Batch:
    """A batch of ``samples`` samples over ``stacks`` distinct stacks (see the module doc)."""
    rng = random.Random(seed)
    start_ns = 1_790_000_000 * 10**9
    profile = Profile(period_ns=EbpfConfig().sample_period_ns, start_ns=start_ns,
                      end_ns=start_ns + INTERVAL_NS)
    kernel = [Frame(name, "[kernel.kallsyms]", FrameKind.KERNEL,
                    0xFFFFFFFF81000000 + rng.randrange(0, 0x1000000, 16))
              for name in _KERNEL_NAMES]
    pools = []
    for i in range(processes):
        name, executable, args = _PROGRAMS[i % len(_PROGRAMS)]
        pid = 1000 + 37 * i
        profile.processes[pid] = ProcessInfo(pid, name, executable, f"{executable} {args}".strip())
        natives = _native_frames(rng, executable)
        roots = tuple(natives[:4])  # _start, __libc_start_main, main, ... shared by every stack
        pools.append((pid, name, roots, natives[4:]))
    keys: list[tuple[int, str, tuple[Frame, ...]]] = []
    while len(keys) < stacks:
        pid, name, roots, natives = rng.choice(pools)
        depth = rng.randint(20, 30)
        tail = rng.sample(kernel, rng.randint(3, 8)) if rng.random() < 1 / 3 else []
        middle = rng.sample(natives, depth - len(roots) - len(tail))
        keys.append((pid, name, roots + tuple(middle) + tuple(tail)))
    # Every stack once, the rest skewed towards a few hot stacks, as real profiles are.
    counts = collections.Counter(range(len(keys)))
    counts.update(rng.choices(range(len(keys)), weights=[1 / (i + 1) for i in range(len(keys))],
                              k=samples - len(keys)))
    for i, (pid, name, frames) in enumerate(keys):
        profile.add(pid, name, frames, counts[i],
                    [start_ns + rng.randrange(INTERVAL_NS) for _ in range(counts[i])])
    return Batch(profile)


# -- encode cost ---------------------------------------------------------------


def encode_stages(batch: Batch) -> dict[str, Callable[[], object]]:
    """The operations timed, each on inputs prepared once (so each is timed alone)."""
    converter = EventConverter()
    requests = converter.convert_batch(batch)
    messages = (requests.profiles, requests.metrics)
    bodies = [m.SerializeToString() for m in messages]

    def otlp_total() -> None:
        converted = converter.convert_batch(batch)
        for m in (converted.profiles, converted.metrics):
            gzip.compress(m.SerializeToString(), compresslevel=6, mtime=0)

    return {
        "convert_batch (profiles + metrics)": lambda: converter.convert_batch(batch),
        "protobuf SerializeToString": lambda: [m.SerializeToString() for m in messages],
        "gzip (level 6, as the HTTP transport)": lambda: [
            gzip.compress(b, compresslevel=6, mtime=0) for b in bodies],
        "OTLP total: convert + serialize + gzip": otlp_total,
        "encode_otlp_json (OTLP/JSON)": lambda: [encode_otlp_json(m) for m in messages],
        "render_pprof (tables + serialize + gzip)": lambda: render_pprof(batch.profile),
    }


def encoded_sizes(batch: Batch) -> dict[str, int]:
    """Bytes each encoding of the batch takes (profiles + metrics requests for OTLP)."""
    requests = EventConverter().convert_batch(batch)
    messages = (requests.profiles, requests.metrics)
    protobuf = [m.SerializeToString() for m in messages]
    return {
        "OTLP protobuf": sum(map(len, protobuf)),
        "OTLP protobuf, gzip": sum(len(gzip.compress(b, compresslevel=6, mtime=0))
                                   for b in protobuf),
        "OTLP/JSON": sum(len(encode_otlp_json(m)) for m in messages),
        "pprof (gzip)": len(render_pprof(batch.profile)),
    }


@dataclasses.dataclass(frozen=True, slots=True)
class EncodeFigures:
    samples: int
    stacks: int
    repeats: int
    ns_per_sample: dict[str, float]  # CPU time, median over the repeats
    bytes_per_batch: dict[str, int]


def measure_encode(repeats: int = ENCODE_REPEATS, batch: Batch | None = None) -> EncodeFigures:
    """Time every stage ``repeats`` times, interleaved, after one untimed warm-up call."""
    batch = batch or make_batch()
    samples = batch.profile.sample_count
    stages = encode_stages(batch)
    times: dict[str, list[float]] = {name: [] for name in stages}
    for op in stages.values():
        op()
    for _ in range(repeats):
        for name, op in stages.items():
            t0 = time.thread_time_ns()
            op()
            times[name].append((time.thread_time_ns() - t0) / samples)
    return EncodeFigures(samples, len(batch.profile.stacks), repeats,
                         {name: median(t) for name, t in times.items()}, encoded_sizes(batch))


# -- delivery ------------------------------------------------------------------


def serve(protocol: str) -> None:
    """The receiver process: print the endpoint, then answer each stdin line with counters.

    Counters are cumulative: profiles calls received and payload bytes (as
    they came off the wire, compressed or not).  Exits when stdin closes.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import otlp_receivers

    counters = {"profiles": 0, "metrics": 0, "logs": 0, "payload_bytes": 0}
    decode = otlp_receivers._decode

    def counting_decode(signal: Any, body: bytes, gzipped: bool) -> Any:
        counters["payload_bytes"] += len(body)
        request = decode(signal, body, gzipped)
        counters[signal.name] += request is not None
        return request

    # Both receivers decode every body through this module function, so wrapping it
    # sees each body as it came off the wire.
    otlp_receivers._decode = counting_decode
    receiver_cm = (otlp_receivers.grpc_receiver if protocol == "grpc"
                   else otlp_receivers.http_receiver)

    async def main() -> None:
        async with receiver_cm() as receiver:
            # It keeps every decoded request for the tests; a run sends hundreds.
            receiver.calls = collections.deque(maxlen=1)  # type: ignore[assignment]
            print(receiver.endpoint, flush=True)
            while await anyio.to_thread.run_sync(sys.stdin.readline):
                print(json.dumps(counters), flush=True)

    anyio.run(main)


class ReceiverProcess:
    """A receiver running in its own process (see ``serve``)."""

    def __init__(self, protocol: str) -> None:
        package = __package__ or "benchmarks"
        bench = Path(__file__).resolve().parents[package.count(".") + 1]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(bench), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"{package}.bench_otlp", protocol], env=env, cwd=bench,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint:
            raise RuntimeError(f"the {protocol} receiver did not start ({self.proc.wait()})")

    def counters(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def cpu_ns(self) -> int:
        return process_clock_ns(self.proc.pid)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def receiver_process(protocol: str) -> Iterator[ReceiverProcess]:
    receiver = ReceiverProcess(protocol)
    try:
        yield receiver
    finally:
        receiver.close()


def machine_busy_ns() -> int:
    """CPU time every CPU of the machine spent busy since boot (``/proc/stat``, tick resolution)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields) - idle) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One timed run: ``batches`` batches exported and acknowledged."""

    samples: int
    wall_s: float
    exporter_cpu_ns: int  # the whole exporter process: event loop and worker threads
    receiver_cpu_ns: int
    payload_bytes: int  # request bodies as received, profiles + metrics
    others_cpu_ns: int  # the rest of the machine meanwhile: other work disturbs the timing

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s

    @property
    def payload_mb_per_s(self) -> float:
        return self.payload_bytes / self.wall_s / 1e6

    @property
    def others_cpu_percent(self) -> float:
        return machine_percent(max(0, self.others_cpu_ns), self.wall_s * 1e9)


async def _export(endpoint: str, protocol: str, compression: str, batch: Batch,
                  batches: int) -> None:
    # BLOCK: export() waits for queue space instead of dropping, so every batch is sent.
    async with OtlpExporter(endpoint, protocol=protocol, compression=compression, timeout_s=60,
                            overflow_policy=OverflowPolicy.BLOCK, environ={}) as otlp:
        for _ in range(batches):
            await otlp.export(batch)
        await otlp.aclose()  # returns once every queued request has been answered
        if otlp.stats.undelivered or otlp.stats.export_errors:
            raise RuntimeError(f"lost samples: {otlp.stats}")


def deliver(receiver: ReceiverProcess, protocol: str, compression: str, batch: Batch,
            batches: int) -> Delivery:
    """Export ``batches`` copies of ``batch`` through a new exporter, on uvloop as the CLI."""
    before = receiver.counters()
    busy0, cpu0, rcpu0 = machine_busy_ns(), time.process_time_ns(), receiver.cpu_ns()
    t0 = time.perf_counter()
    anyio.run(_export, receiver.endpoint, protocol, compression, batch, batches,
              backend_options={"use_uvloop": True})
    wall = time.perf_counter() - t0
    cpu, rcpu = time.process_time_ns() - cpu0, receiver.cpu_ns() - rcpu0
    busy = machine_busy_ns() - busy0
    after = receiver.counters()
    if after["profiles"] - before["profiles"] != batches:
        raise RuntimeError(f"the receiver got {after['profiles'] - before['profiles']} "
                           f"profiles requests of {batches}")
    return Delivery(batches * batch.profile.sample_count, wall, cpu, rcpu,
                    after["payload_bytes"] - before["payload_bytes"], busy - cpu - rcpu)


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryFigures:
    """Medians over ``repeats`` runs of ``batches`` batches, per (protocol, compression)."""

    batches: int
    repeats: int
    samples_per_batch: int
    rows: list[dict[str, Any]]


def measure_delivery(batches: int = DELIVERY_BATCHES, repeats: int = DELIVERY_REPEATS,
                     batch: Batch | None = None) -> DeliveryFigures:
    """Every transport ``repeats`` times; compression settings interleave on one receiver."""
    batch = batch or make_batch()
    rows = []
    for protocol in dict.fromkeys(p for p, _ in TRANSPORTS):
        compressions = [c for p, c in TRANSPORTS if p == protocol]
        runs: dict[str, list[Delivery]] = {c: [] for c in compressions}
        with receiver_process(protocol) as receiver:
            for c in compressions:  # warm-up: imports, channel code paths, first connections
                deliver(receiver, protocol, c, batch, 2)
            for _ in range(repeats):
                for c in compressions:
                    runs[c].append(deliver(receiver, protocol, c, batch, batches))
        for c, done in runs.items():
            rows.append({
                "protocol": protocol, "compression": c,
                "samples_per_s": median(d.samples_per_s for d in done),
                "min_samples_per_s": min(d.samples_per_s for d in done),
                "max_samples_per_s": max(d.samples_per_s for d in done),
                "payload_mb_per_s": median(d.payload_mb_per_s for d in done),
                "payload_bytes_per_batch": median(d.payload_bytes / batches for d in done),
                "exporter_cpu_ns_per_sample": median(d.exporter_cpu_ns / d.samples for d in done),
                "receiver_cpu_ns_per_sample": median(d.receiver_cpu_ns / d.samples for d in done),
                "others_cpu_percent": median(d.others_cpu_percent for d in done),
            })
    return DeliveryFigures(batches, repeats, batch.profile.sample_count, rows)


# -- asv -----------------------------------------------------------------------


class EncodeSuite:
    """asv: one call of each encoding stage on the production-sized batch."""

    def setup(self) -> None:
        self.stages = encode_stages(make_batch())

    def time_convert_batch(self) -> None:
        self.stages["convert_batch (profiles + metrics)"]()

    def time_serialize(self) -> None:
        self.stages["protobuf SerializeToString"]()

    def time_gzip(self) -> None:
        self.stages["gzip (level 6, as the HTTP transport)"]()

    def time_otlp_total(self) -> None:
        self.stages["OTLP total: convert + serialize + gzip"]()

    def time_encode_otlp_json(self) -> None:
        self.stages["encode_otlp_json (OTLP/JSON)"]()

    def time_render_pprof(self) -> None:
        self.stages["render_pprof (tables + serialize + gzip)"]()


class DeliverySuite:
    """asv: delivered samples/s per transport, all from one measurement."""

    timeout = 600

    def setup_cache(self) -> DeliveryFigures:
        return measure_delivery(batches=10, repeats=3)

    @staticmethod
    def _rate(figures: DeliveryFigures, protocol: str, compression: str) -> float:
        return float(next(r["samples_per_s"] for r in figures.rows
                          if (r["protocol"], r["compression"]) == (protocol, compression)))

    def track_grpc_samples_per_s(self, figures: DeliveryFigures) -> float:
        return self._rate(figures, "grpc", "none")

    def track_grpc_gzip_samples_per_s(self, figures: DeliveryFigures) -> float:
        return self._rate(figures, "grpc", "gzip")

    def track_http_samples_per_s(self, figures: DeliveryFigures) -> float:
        return self._rate(figures, "http/protobuf", "none")

    def track_http_gzip_samples_per_s(self, figures: DeliveryFigures) -> float:
        return self._rate(figures, "http/protobuf", "gzip")

    for _track in (track_grpc_samples_per_s, track_grpc_gzip_samples_per_s,
                   track_http_samples_per_s, track_http_gzip_samples_per_s):
        _track.unit = "samples/s"  # type: ignore[attr-defined]


if __name__ == "__main__":
    serve(sys.argv[1])
