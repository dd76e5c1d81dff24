"""Environment checks and the kernel-header fallback, on fake header trees."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ebpf_stream import EnvironmentCheckError
from ebpf_stream._bpf.environment import environment_checks, require_environment
from ebpf_stream._bpf.headers import find_headers


def fake_headers(src: Path, version: str) -> None:
    """Lay out Debian's split header packages: -common has kconfig.h, -amd64 the config."""
    common = src / f"linux-headers-{version}-common"
    arch = src / f"linux-headers-{version}-amd64"
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("/* common */\n")
    (common / "arch/x86/include/asm").mkdir(parents=True)
    (common / "arch/x86/include/asm/ptrace.h").write_text("/* asm */\n")
    (arch / "include/generated").mkdir(parents=True)
    (arch / "include/generated/autoconf.h").write_text(f"/* {version} */\n")
    (arch / "arch/x86/include/generated").mkdir(parents=True)
    (arch / ".config").write_text("CONFIG_BPF=y\n")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EBPF_STREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_falls_back_to_nearest_older_headers_and_merges_both_halves(
        tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "src"
    for version in ("5.10.0-30", "6.1.0-56", "6.12.0-1"):
        fake_headers(src, version)
    headers = find_headers("6.6.0-custom", src)
    assert not headers.exact
    assert "linux-headers-6.1.0-56-amd64 with linux-headers-6.1.0-56-common" in (
        headers.description)
    tree = headers.path
    assert (tree / "include/linux/kconfig.h").read_text() == "/* common */\n"
    assert (tree / "include/generated/autoconf.h").read_text() == "/* 6.1.0-56 */\n"
    assert (tree / "arch/x86/include/asm/ptrace.h").exists()
    assert (tree / "arch/x86/include/generated").is_dir()
    assert (tree / ".config").exists()
    assert tree.is_relative_to(cache)


def test_a_kernel_older_than_every_header_uses_the_oldest(tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "src"
    for version in ("6.1.0-56", "6.12.0-1"):
        fake_headers(src, version)
    assert "6.1.0-56" in find_headers("4.19.0", src).description


def test_the_merged_tree_is_reused_and_rebuilt_when_broken(tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "src"
    fake_headers(src, "6.1.0-56")
    first = find_headers("6.18.0", src).path
    assert find_headers("6.18.0", src).path == first
    link = first / "include/linux"
    assert link.is_symlink(), "only directories in both halves are real directories"
    link.unlink()
    assert (find_headers("6.18.0", src).path / "include/linux/kconfig.h").exists()


def test_no_headers_is_an_actionable_error(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(EnvironmentCheckError, match="install linux-headers-amd64"):
        find_headers("6.18.0-none", tmp_path / "empty")


def test_headers_without_their_common_half_are_ignored(tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "src"
    fake_headers(src, "6.1.0-56")
    shutil.rmtree(src / "linux-headers-6.1.0-56-common")
    with pytest.raises(EnvironmentCheckError):
        find_headers("6.18.0", src)


def test_environment_checks_each_carry_a_fix_when_failing() -> None:
    checks = environment_checks()
    assert [c.name for c in checks] == [
        "architecture", "CAP_BPF", "CAP_PERFMON", "kernel", "btf", "tracefs", "bcc",
        "kernel headers", "compile cache"]
    for c in checks:
        assert c.ok or c.fix, c


def test_a_check_that_breaks_fails_instead_of_crashing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise PermissionError(13, "Permission denied", "/sys/kernel/btf/vmlinux")

    monkeypatch.setattr("ebpf_stream._bpf.environment.check_btf", broken)
    (btf,) = [c for c in environment_checks() if c.name == "btf"]
    assert not btf.ok and "Permission denied" in btf.detail and btf.fix


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_compile_error_is_one_line_pointing_at_the_source(tmp_path: Path) -> None:
    from ebpf_stream import ProbeError
    from ebpf_stream._bpf.loader import _load

    source = tmp_path / "broken.bpf.c"
    source.write_text("int on_sample(void *ctx) { return undefined_thing; }\n")
    with pytest.raises(ProbeError) as error:
        _load(source, {"on_sample": "PERF_EVENT"}, [], [])
    message = str(error.value)
    assert "\n" not in message
    assert f"{source}:1:" in message and "undefined_thing" in message


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_the_worker_hands_over_programs_and_maps(tmp_path: Path) -> None:
    from ebpf_stream._bpf.loader import _compile, _with_local_includes

    source = tmp_path / "ok.bpf.c"
    source.write_text("BPF_ARRAY(numbers, u64, 4);\n"
                      "int on_sample(struct bpf_perf_event_data *ctx) { return 0; }\n")
    program, image = _compile(source, _with_local_includes(source), {"on_sample": "PERF_EVENT"},
                              ["numbers"], [], require_environment())
    assert image
    try:
        assert len(program.program_fds()) == 1
        numbers = program.map("numbers")
        assert (numbers.key_size, numbers.value_size, numbers.max_entries) == (4, 8, 4)
        fds = program.program_fds() + program.map_fds()
    finally:
        program.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_local_headers_raw_tracepoints_and_cookies(tmp_path: Path) -> None:
    """A shared header is part of the program (bcc rewrites its map calls), raw
    tracepoint programs attach by name, and a cookie tells attachments apart."""
    from ebpf_stream._bpf.loader import _load

    (tmp_path / "shared.h").write_text("BPF_ARRAY(hits, u64, 2);\n"
                                       "static __always_inline void hit(int i) {\n"
                                       "    u64 *n = hits.lookup(&i);\n"
                                       "    if (n) __sync_fetch_and_add(n, 1);\n"
                                       "}\n")
    source = tmp_path / "hooks.bpf.c"
    source.write_text('#include "shared.h"\n'
                      "RAW_TRACEPOINT_PROBE(sys_enter) { hit(0); return 0; }\n"
                      "BPF_ARRAY(cookies, u64, 1);\n"
                      "int on_getppid(void *ctx) {\n"
                      "    int zero = 0;\n"
                      "    u64 cookie = bpf_get_attach_cookie(ctx);\n"
                      "    cookies.update(&zero, &cookie);\n"
                      "    return 0;\n"
                      "}\n")
    program = _load(source, {"on_getppid": "TRACEPOINT"}, ["hits", "cookies"], [])
    try:
        program.attach_tracepoints()
        program.attach_tracepoint("on_getppid", "syscalls", "sys_enter_getppid", 0xC0FFEE)
        os.getppid()
        assert int.from_bytes(program.map("hits").lookup(b"\0" * 4) or b"", "little") > 0
        cookie = program.map("cookies").lookup(b"\0" * 4) or b""
        assert int.from_bytes(cookie, "little") == 0xC0FFEE
    finally:
        program.close()


def test_an_interpreter_without_bcc_fails_the_bcc_check_with_its_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBPF_STREAM_COMPILE_PYTHON", "/usr/bin/false")
    (bcc,) = [c for c in environment_checks() if c.name == "bcc"]
    assert not bcc.ok
    assert bcc.detail == "EBPF_STREAM_COMPILE_PYTHON=/usr/bin/false cannot import bcc"
    assert bcc.fix.startswith("apt-get install python3-bpfcc")
    with pytest.raises(EnvironmentCheckError, match=r"^bcc: .* cannot import bcc; fix: apt-get"):
        require_environment()
