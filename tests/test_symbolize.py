"""Symbolization against real processes, real ELF files and the real kallsyms."""

from __future__ import annotations

import bisect
import ctypes
import itertools
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebpf_stream._binaries import process
from ebpf_stream._binaries.debug_files import Origin
from ebpf_stream._binaries.elf import ElfHeaders, Reader
from ebpf_stream._binaries.process import MAPS_REFRESH_S
from ebpf_stream._binaries.ranges import Ranges, one_per_address
from ebpf_stream._binaries.symbol_table import ElfImage
from ebpf_stream._model.profile import FrameKind
from ebpf_stream._symbols import KernelSymbols, Symbolizer
from ebpf_stream._symbols import kallsyms as kallsyms_module
from ebpf_stream._symbols.kallsyms import KallsymsTable

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: real kallsyms addresses and /proc/PID/map_files")

PROGRAM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) long hot_leaf(long n) {
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += i * i;
    return sum;
}

__attribute__((noinline)) long middle(long n) { return hot_leaf(n) + 1; }

int main(void) {
    printf("%p %p %p\n", (void *)&hot_leaf, (void *)&middle, (void *)&write);
    fflush(stdout);
    char line[16];
    if (fgets(line, sizeof line, stdin)) {  /* any line: dlopen libm, print frexp */
        void *libm = dlopen("libm.so.6", RTLD_NOW);
        printf("%p\n", libm ? dlsym(libm, "frexp") : NULL);
        fflush(stdout);
    }
    pause();
    return (int)middle(3);
}
"""
CFLAGS = ("-O0", "-fno-omit-frame-pointer", "-g")


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test program built a few ways, keyed by variant."""
    root = Path(os.path.realpath(tmp_path_factory.mktemp("symbolize")))
    source = root / "prog.c"
    source.write_text(PROGRAM)
    variants = {
        "prog": ["-Wl,--build-id=sha1"],
        "noid": ["-Wl,--build-id=none"],
        # A PIE whose code segment's vaddr differs from its file offset.
        "shifted": ["-pie", "-fPIE", "-Wl,--section-start=.text=0x5000"],
    }
    built = {}
    for name, flags in variants.items():
        built[name] = root / name
        subprocess.run(["gcc", *CFLAGS, *flags, "-o", str(built[name]), str(source)], check=True)
    built["stripped"] = root / "stripped"
    shutil.copy(built["prog"], built["stripped"])
    subprocess.run(["strip", str(built["stripped"])], check=True)
    built["debug"] = root / "prog.debug"  # the separate debug file of "stripped"
    subprocess.run(["objcopy", "--only-keep-debug", str(built["prog"]), str(built["debug"])],
                   check=True)
    return built


@dataclass
class Target:
    process: subprocess.Popen[str]
    hot_leaf: int
    middle: int
    write: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def spawn() -> Iterator[Callable[[Path], Target]]:
    """Start the test program; it prints its function addresses and waits."""
    started: list[Target] = []

    def start(binary: Path) -> Target:
        process = subprocess.Popen([str(binary)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        hot_leaf, middle, write = (int(word, 16) for word in process.stdout.readline().split())
        started.append(Target(process, hot_leaf, middle, write))
        return started[-1]

    yield start
    for target in started:
        target.stop()


def symbols(binary: Path) -> dict[str, tuple[int, int]]:
    """(value, size) of each defined symbol, as nm reads them."""
    out = subprocess.run(["nm", "-S", "--defined-only", str(binary)], check=True,
                         capture_output=True, text=True).stdout
    return {f[3]: (int(f[0], 16), int(f[1], 16)) for f in map(str.split, out.splitlines())
            if len(f) == 4}


@needs_root
def test_native_frames_name_the_functions_of_the_binary(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["prog"])
    frames = Symbolizer().user_frames(target.pid, [target.hot_leaf + 5, target.middle + 8])
    assert [f.name for f in frames] == ["hot_leaf", "middle"]
    assert {f.module for f in frames} == {str(binaries["prog"])}
    assert {f.kind for f in frames} == {FrameKind.NATIVE}
    nm = symbols(binaries["prog"])
    assert [f.address for f in frames] == [nm["hot_leaf"][0] + 5, nm["middle"][0] + 8]


@needs_root
def test_return_address_is_looked_up_one_byte_back(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["prog"])
    value, size = symbols(binaries["prog"])["hot_leaf"]
    end = target.hot_leaf + size  # past hot_leaf's last byte: a call there returns here
    leaf, caller = Symbolizer().user_frames(target.pid, [end, end])
    assert leaf.name != "hot_leaf"
    assert caller.name == "hot_leaf"
    assert caller.address == value + size  # reported unadjusted


@needs_root
def test_libc_function(binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["prog"])
    (frame,) = Symbolizer().user_frames(target.pid, [target.write + 3])
    assert frame.name == "write"  # not its alias __write
    assert os.path.basename(frame.module).startswith("libc")


@needs_root
def test_stripped_binary_falls_back_to_module_offset(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["stripped"])
    (frame,) = Symbolizer().user_frames(target.pid, [target.hot_leaf + 5])
    vaddr = symbols(binaries["prog"])["hot_leaf"][0] + 5
    assert (frame.name, frame.module, frame.address) == (
        f"stripped+0x{vaddr:x}", str(binaries["stripped"]), vaddr)


@needs_root
def test_pie_code_segment_offset_is_mapped_to_its_vaddr(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["shifted"])
    (frame,) = Symbolizer().user_frames(target.pid, [target.hot_leaf + 5])
    vaddr = symbols(binaries["shifted"])["hot_leaf"][0] + 5
    assert (frame.name, frame.address) == ("hot_leaf", vaddr)
    with open(f"/proc/{target.pid}/maps") as maps:
        start, offset = next(
            (int(fields[0].split("-")[0], 16), int(fields[2], 16))
            for fields in map(str.split, maps)
            if int(fields[0].split("-")[0], 16) <= target.hot_leaf
            < int(fields[0].split("-")[1], 16))
    # The layout really exercises the PT_LOAD translation: vaddr != file offset.
    assert target.hot_leaf + 5 - start + offset != vaddr


@needs_root
def test_address_outside_every_mapping_is_unknown(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["prog"])
    (frame,) = Symbolizer().user_frames(target.pid, [0x10])
    assert (frame.name, frame.module, frame.address) == ("[unknown]+0x10", "[unknown]", 0x10)


def test_process_never_seen_alive_is_unknown() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    symbolizer = Symbolizer()
    (frame,) = symbolizer.user_frames(gone.pid, [0x401000])
    assert (frame.name, frame.module) == ("[unknown]+0x401000", "[unknown]")
    assert symbolizer.process_info(gone.pid) is None


@needs_root
def test_resolves_after_exit_with_maps_read_while_alive(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["prog"])
    symbolizer = Symbolizer()
    alive = symbolizer.user_frames(target.pid, [target.hot_leaf + 5])
    target.stop()
    # libc was never opened while alive: it is found by path, checked by inode.
    after = symbolizer.user_frames(target.pid, [target.hot_leaf + 5, target.write + 3])
    assert after[0] == alive[0]
    assert after[1].name in {"write", "__write", "__libc_write"}
    info = symbolizer.process_info(target.pid)
    assert info is not None
    assert (info.name, info.executable) == ("prog", "prog")
    assert info.command_line.startswith(str(binaries["prog"]))
    symbolizer.forget(target.pid)
    assert symbolizer.user_frames(target.pid, [target.hot_leaf + 5])[0].module == "[unknown]"


@needs_root
def test_an_exited_process_is_forgotten_at_the_second_look_after_its_exit(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["prog"])
    symbolizer = Symbolizer()
    alive = symbolizer.user_frames(target.pid, [target.hot_leaf + 5])
    symbolizer.forget_exited()  # alive: kept
    target.stop()
    symbolizer.forget_exited()  # gone: its last samples may still be on their way
    assert symbolizer.user_frames(target.pid, [target.hot_leaf + 5]) == alive
    symbolizer.forget_exited()
    assert symbolizer.process_info(target.pid) is None


@needs_root
def test_deleted_binary_is_read_through_map_files(
        binaries: dict[str, Path], spawn: Callable[[Path], Target], tmp_path: Path) -> None:
    doomed = tmp_path / "doomed"
    shutil.copy(binaries["prog"], doomed)
    target = spawn(doomed)
    doomed.unlink()
    (frame,) = Symbolizer().user_frames(target.pid, [target.hot_leaf + 5])
    assert (frame.name, frame.module) == ("hot_leaf", str(doomed))


@needs_root
def test_elf_cache_is_shared_by_build_id(
        binaries: dict[str, Path], spawn: Callable[[Path], Target], tmp_path: Path) -> None:
    copies = []
    for name in ("a", "b"):  # two files, two inodes, one build id
        (tmp_path / name).mkdir()
        copies.append(Path(shutil.copy(binaries["prog"], tmp_path / name / "prog")))
    symbolizer = Symbolizer()
    for copy in copies:
        target = spawn(copy)
        (frame,) = symbolizer.user_frames(target.pid, [target.hot_leaf + 5])
        assert (frame.name, frame.module) == ("hot_leaf", str(copy))
    assert symbolizer.elf_parses == 1


@needs_root
def test_without_build_id_the_cache_is_per_file(
        binaries: dict[str, Path], spawn: Callable[[Path], Target], tmp_path: Path) -> None:
    copy = Path(shutil.copy(binaries["noid"], tmp_path / "noid"))
    symbolizer = Symbolizer()
    for binary in (binaries["noid"], binaries["noid"], copy):
        target = spawn(binary)
        (frame,) = symbolizer.user_frames(target.pid, [target.hot_leaf + 5])
        assert frame.name == "hot_leaf"
    assert symbolizer.elf_parses == 2


@needs_root
def test_maps_are_reread_after_dlopen(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["prog"])
    symbolizer = Symbolizer()
    symbolizer.user_frames(target.pid, [target.hot_leaf + 5])
    process = target.process
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("load\n")
    process.stdin.flush()
    frexp = int(process.stdout.readline(), 16)
    time.sleep(MAPS_REFRESH_S)
    (frame,) = symbolizer.user_frames(target.pid, [frexp + 2])
    assert frame.name == "frexp"  # of its aliases (frexpf64...), the plainest
    assert os.path.basename(frame.module).startswith("libm")


@needs_root
def test_maps_that_do_not_change_are_reread_less_and_less_often(
        binaries: dict[str, Path], spawn: Callable[[Path], Target],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A word that is no code address (an interpreter without frame pointers
    leaves many) must not cost a read of the maps every half second."""
    target = spawn(binaries["prog"])
    now = [1000.0]
    reads: list[float] = []
    read_mappings = process.read_mappings
    monkeypatch.setattr(process.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(process, "read_mappings",
                        lambda pid: reads.append(now[0]) or read_mappings(pid))
    symbolizer = Symbolizer()
    for _ in range(300):  # a stray word every 0.1 s for 30 s
        (frame,) = symbolizer.user_frames(target.pid, [0x10])
        assert frame.module == "[unknown]"
        now[0] += 0.1
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(reads)]
    assert gaps[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and set(gaps[4:]) == {8.0}, gaps


@needs_root
def test_process_cache_is_bounded(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    first, second = spawn(binaries["prog"]), spawn(binaries["prog"])
    symbolizer = Symbolizer(max_processes=1)
    assert symbolizer.process_info(first.pid) is not None
    symbolizer.user_frames(second.pid, [second.hot_leaf])  # evicts the first
    first.stop()
    assert symbolizer.user_frames(first.pid, [first.hot_leaf])[0].module == "[unknown]"


@needs_root
def test_vdso_symbols(tmp_path: Path) -> None:
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    base = libc.getauxval(33)  # AT_SYSINFO_EHDR
    with open("/proc/self/maps") as maps:
        end = next(int(line.split("-")[1].split()[0], 16) for line in maps
                   if line.startswith(f"{base:x}-"))
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        image = os.pread(mem.fileno(), end - base, base)
    dump = tmp_path / "vdso.so"
    dump.write_bytes(image)
    out = subprocess.run(["nm", "-D", "--defined-only", str(dump)], check=True,
                         capture_output=True, text=True).stdout
    entries = [(int(f[0], 16), f[2].split("@")[0]) for f in map(str.split, out.splitlines())]
    value = next(v for v, name in entries if name == "clock_gettime")
    (frame,) = Symbolizer().user_frames(os.getpid(), [base + value + 1])
    aliases = {name for v, name in entries if v == value}
    assert (frame.name in aliases, frame.module, frame.address) == (True, "[vdso]", value + 1)


@needs_root
def test_kernel_symbol_from_kallsyms() -> None:
    with open("/proc/kallsyms") as f:
        table = [line.split() for line in f]
    address = next(int(f[0], 16) for f in table if f[2] == "vfs_read" and len(f) == 3)
    aliases = {f[2] for f in table if int(f[0], 16) == address and f[1] in "tTwW"}
    leaf, caller = Symbolizer().kernel_frames([address + 1, address + 1])
    assert leaf.name in aliases and caller.name in aliases
    assert (leaf.module, leaf.kind, leaf.address) == (
        "[kernel.kallsyms]", FrameKind.KERNEL, address + 1)
    # A return address at a function's first byte belongs to the code before it.
    assert Symbolizer().kernel_frames([address, address])[1].name not in aliases


@needs_root
def test_address_outside_the_kernel_is_unknown() -> None:
    (frame,) = Symbolizer().kernel_frames([0x1000])
    assert (frame.name, frame.module, frame.kind) == (
        "[kernel.kallsyms]+0x1000", "[kernel.kallsyms]", FrameKind.KERNEL)


def test_kallsyms_parsing(tmp_path: Path) -> None:
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81000000 t __alias\n"
        "ffffffff81000000 T start_kernel\n"
        "ffffffff81000100 T after\n"
        "ffffffff81000200 D some_data\n"
        "0000000000000000 T hidden\n"
        "ffffffffc0001000 t mod_func\t[nf_tables]\n"
        "ffffffffc0001040 d mod_data\t[nf_tables]\n")
    names = [(f.name, f.module) for f in KernelSymbols(str(kallsyms)).resolve(
        [0xffffffff81000010, 0xffffffff81000101, 0xffffffff81000208, 0xffffffffc0001011,
         0xffffffffc0001048, 0x10])]
    assert names == [
        ("start_kernel", "[kernel.kallsyms]"),  # global over local, then fewest underscores
        ("after", "[kernel.kallsyms]"),  # a return address: looked up one byte back
        ("[kernel.kallsyms]+0xffffffff81000208", "[kernel.kallsyms]"),  # data, not "after"
        ("mod_func", "[nf_tables]"),
        ("[kernel.kallsyms]+0xffffffffc0001048", "[kernel.kallsyms]"),
        ("[kernel.kallsyms]+0x10", "[kernel.kallsyms]"),  # not "hidden" at address 0
    ]


def reference_kallsyms(text: str) -> Callable[[int], tuple[str, str] | None]:
    """(name, module) that an address resolves to in kallsyms ``text``, by a
    plain reading of the rules that the block-wise parser implements."""
    symbols = [(int(line[:16], 16), line[17], *line[19:].partition("\t")[::2])
               for line in text.split("\n") if len(line) > 19 and line[16] == line[18] == " "]
    # Per address the code symbol that is global, then has the fewest leading
    # underscores (of two), then the shortest name, then comes first.
    chosen: dict[int, tuple[bool, int, int, int, str, str]] = {}
    for order, (start, kind, name, module) in enumerate(symbols):
        candidate = (kind.islower(), len(name[:2]) - len(name[:2].lstrip("_")), len(name), order,
                     name, module or "[kernel.kallsyms]")
        if kind in "tTwW" and start and (start not in chosen or candidate < chosen[start]):
            chosen[start] = candidate
    starts = sorted(chosen)
    boundaries = sorted({start for start, *_ in symbols if start})

    def resolve(address: int) -> tuple[str, str] | None:
        index = bisect.bisect_right(starts, address) - 1
        if index < 0:
            return None
        start = starts[index]
        following = bisect.bisect_right(boundaries, start)
        end = min(boundaries[following] if following < len(boundaries) else 1 << 64,
                  start + (1 << 16))
        *_, name, module = chosen[start]
        return (name, module) if address < end else None

    return resolve


def synthetic_kallsyms(rng: random.Random, count: int) -> str:
    """kallsyms text with the cases of a real one (call padding, aliases, data,
    modules, hidden addresses) and some that no kernel writes."""
    lines, address = [], 0xffffffff81000000
    for i in range(count):
        address += rng.choice([0, 0, 8, 16, 16, 64, 0x20000])
        name = rng.choice(["f", "_f", "__f", "___f", "f_", "", "a_function_name", "x" * 16])
        name += str(i % 5)
        kind = rng.choice("tTtTwWdDrbA")
        module = rng.choice(["", "", "", "\t[nf_tables]", "\t[bpf]", "\t"])
        if rng.random() < 0.3:  # padding before its function, or before another
            for depth in range(rng.choice([1, 1, 1, 2]), 0, -1):
                lines.append(f"{address:016x} {kind} {'__pfx_' * depth}{name}{module}")
                address += 16
            if rng.random() < 0.2:
                at = rng.randrange(len(name))
                name = name[:at] + "Z" + name[at + 1:]
        if i and rng.random() < 0.02:
            lines.append(rng.choice(["", "garbage", f"{address:016x}  x", f"{address:016x} T"]))
        lines.append(f"{0 if rng.random() < 0.02 else address:016x} {kind} {name}{module}")
    return "\n".join(lines) + rng.choice(["", "\n"])


@pytest.mark.parametrize("block", [64, 1000, 1 << 18])
def test_kallsyms_matches_its_plain_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    monkeypatch.setattr(kallsyms_module, "BLOCK_SIZE", block)  # lines split too
    rng = random.Random(block)
    for trial in range(20):
        text = synthetic_kallsyms(rng, rng.randrange(1, 300))
        kallsyms = tmp_path / f"kallsyms{trial}"
        kallsyms.write_text(text)
        expected, symbols = reference_kallsyms(text), KernelSymbols(str(kallsyms))
        starts = [int(line[:16], 16) for line in text.split("\n") if len(line) > 19]
        for address in sorted({a + d for a in starts for d in (-1, 0, 1, 9, 17, 1 << 16)
                               if 0 < a + d < 1 << 64}):
            (frame,) = symbols.resolve([address])  # a leaf: looked up as it is
            unknown = (f"[kernel.kallsyms]+0x{address:x}", "[kernel.kallsyms]")
            assert (frame.name, frame.module) == (expected(address) or unknown), hex(address)


def retained_bytes(table: KallsymsTable | Ranges) -> int:
    """What a parsed table keeps: its arrays, its bytes and lists of them."""
    total = 0
    for slot in type(table).__slots__:
        value = getattr(table, slot)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, array):
                total += len(item) * item.itemsize
            elif isinstance(item, bytes):
                total += len(item)
            elif isinstance(item, Ranges):
                total += retained_bytes(item)
    return total


def test_one_per_address_matches_a_plain_sort() -> None:
    """Sorted prefixes with tails below, among and above them, as kallsyms has
    (modules after the core kernel) and ELF symbol tables have (no order)."""
    rng = random.Random(7)
    for _ in range(500):
        size = rng.randrange(0, 200)
        prefix = sorted(rng.randrange(1000) for _ in range(rng.randrange(size + 1)))
        tail = [rng.choice([rng.randrange(1000), rng.randrange(2**64 - 1000, 2**64)])
                for _ in range(size - len(prefix))]
        values = array("Q", prefix + tail)
        preference = [(rng.randrange(3),) for _ in values]
        kept, starts = one_per_address(values, preference.__getitem__)
        best: dict[int, int] = {}
        for index in sorted(range(len(values)), key=values.__getitem__):
            value = values[index]
            if value not in best or preference[index] < preference[best[value]]:
                best[value] = index
        assert list(starts) == sorted(best)
        assert list(kept) == [best[value] for value in sorted(best)]


def test_symbolization_loads_no_numpy() -> None:
    """numpy would cost the host over 11 MiB; the symbolizer is stdlib only."""
    code = ("import sys\n"
            "from ebpf_stream._symbols import KernelSymbols, Symbolizer\n"
            "import ebpf_stream._python.code, ebpf_stream._python.runtime\n"
            "KernelSymbols().load()\n"
            "Symbolizer().user_frames(__import__('os').getpid(), [0x10])\n"
            "print('numpy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.split() == ["False"]


def test_kallsyms_table_is_compact(tmp_path: Path) -> None:
    # Like a distro kernel's: 150k lines, half of them call padding.
    lines, address = [], 0xffffffff81000000
    for i in range(75_000):
        name = f"{['vfs', 'tcp', 'ext4', '__x64_sys'][i % 4]}_handle_thing_{i}"
        module = "\t[nf_tables]" if i % 10 == 0 else ""
        lines += [f"{address:016x} t __pfx_{name}{module}",
                  f"{address + 16:016x} {'Td'[i % 100 == 0]} {name}{module}"]
        address += 0x70
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    try:
        with kallsyms.open("rb") as f:
            table = KallsymsTable(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert retained_bytes(table) < 3 << 20  # 2.4 MB; the text is 7.2 MB
    assert peak < 12 << 20  # Python's allocations, not RSS
    base = 0xffffffff81000000
    frames = KernelSymbols(str(kallsyms)).resolve(
        [base + 0x70 * 20 + 5, base + 0x70 * 21 + 20, base + 0x70 * 100 + 20])
    assert [(f.name, f.module) for f in frames] == [
        ("__pfx_vfs_handle_thing_20", "[nf_tables]"),  # sharing "vfs_handle_thing_20"
        ("tcp_handle_thing_21", "[kernel.kallsyms]"),  # a return address: looked up 1 byte back
        (f"[kernel.kallsyms]+0x{base + 0x70 * 100 + 20:x}", "[kernel.kallsyms]")]  # data


def build_id(elf: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(elf)], check=True, capture_output=True,
                         text=True).stdout
    found = re.search(r"Build ID: ([0-9a-f]+)", out)
    assert found, f"{elf} has no build id"
    return found[1]


def image_name(elf: Path, vaddr: int, root: str = "") -> str | None:
    """The name ``vaddr`` resolves to in ``elf`` mapped by a process with root ``root``."""
    reader = Reader.of_bytes(elf.read_bytes())
    image = ElfImage(("test",), reader, ElfHeaders(reader), Origin((root,), str(elf)))
    return image.symbols.name(vaddr)


def test_debug_file_by_build_id_under_the_process_root(
        binaries: dict[str, Path], tmp_path: Path) -> None:
    vaddr = symbols(binaries["prog"])["hot_leaf"][0] + 5
    hex_id = build_id(binaries["stripped"])
    debug = tmp_path / f"usr/lib/debug/.build-id/{hex_id[:2]}/{hex_id[2:]}.debug"
    debug.parent.mkdir(parents=True)
    shutil.copy(binaries["debug"], debug)
    assert image_name(binaries["stripped"], vaddr, str(tmp_path)) == "hot_leaf"
    # A file of another build at that path would name the wrong functions.
    subprocess.run(["objcopy", "--only-keep-debug", str(binaries["noid"]), str(debug)],
                   check=True)
    assert image_name(binaries["stripped"], vaddr, str(tmp_path)) is None


def test_debuglink_file_must_match_its_crc(binaries: dict[str, Path], tmp_path: Path) -> None:
    vaddr = symbols(binaries["prog"])["hot_leaf"][0] + 5
    debug = tmp_path / ".debug" / "prog.debug"
    debug.parent.mkdir()
    shutil.copy(binaries["debug"], debug)
    linked = tmp_path / "linked"
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(binaries["stripped"]),
                    str(linked)], check=True)
    assert image_name(linked, vaddr) == "hot_leaf"
    with debug.open("ab") as f:  # still a valid ELF file, but not the one linked
        f.write(b"\0")
    assert image_name(linked, vaddr) is None


def test_gnu_debugdata_symbols(binaries: dict[str, Path], tmp_path: Path) -> None:
    vaddr = symbols(binaries["prog"])["hot_leaf"][0] + 5
    mini = tmp_path / "mini.xz"
    mini.write_bytes(lzma.compress(binaries["debug"].read_bytes()))
    minidebug = tmp_path / "minidebug"
    subprocess.run(["objcopy", f"--add-section=.gnu_debugdata={mini}",
                    str(binaries["stripped"]), str(minidebug)], check=True)
    assert image_name(minidebug, vaddr) == "hot_leaf"


@needs_root
def test_stripped_libc_resolves_local_functions_through_its_debug_file(
        binaries: dict[str, Path], spawn: Callable[[Path], Target]) -> None:
    target = spawn(binaries["prog"])
    with open(f"/proc/{target.pid}/maps") as maps:
        libc = next(Path(f[5]) for f in map(str.split, maps)
                    if len(f) == 6 and os.path.basename(f[5]).startswith("libc.so"))
    hex_id = build_id(libc)
    debug = Path(f"/usr/lib/debug/.build-id/{hex_id[:2]}/{hex_id[2:]}.debug")
    if not debug.exists():
        pytest.skip(f"no debug file for the running libc at {debug}: install libc6-dbg")
    start_call_main, size = symbols(debug)["__libc_start_call_main"]
    assert "__libc_start_call_main" not in symbols(libc)  # only the debug file names it
    out = subprocess.run(["nm", "-D", "--defined-only", str(libc)], check=True,
                         capture_output=True, text=True).stdout
    write = next(int(f[0], 16) for f in map(str.split, out.splitlines())
                 if f[2].split("@")[0] == "write")
    inside = target.write - write + start_call_main + size // 2  # as a return address
    leaf, caller = Symbolizer().user_frames(target.pid, [target.write + 3, inside])
    assert (leaf.name, caller.name, caller.module) == (
        "write", "__libc_start_call_main", str(libc))
