"""The compile cache: keys, trust, damage, concurrent starts, and real loads from it."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ebpf_stream._base.cache_dir import cache_dir
from ebpf_stream._bpf.compile_cache import ObjectCache, cache_key
from ebpf_stream._bpf.compiler import Compiler
from ebpf_stream._bpf.headers import Headers
from ebpf_stream._bpf.loader import LoadedProgram

SOURCE = """\
BPF_ARRAY(hits, u64, 2);
BPF_HASH(seen, u32, u64, 64);
int on_getppid(void *ctx) {
    int zero = 0;
    u64 *n = hits.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    u64 one = 1;
    seen.update(&pid, &one);
    return 0;
}
"""
PROGRAMS = {"on_getppid": "TRACEPOINT"}
MAPS = ["hits", "seen"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("EBPF_STREAM_CACHE", str(directory))
    return directory


def compiler(version: str = "0.26.0") -> Compiler:
    return Compiler(Path("/usr/bin/python3"), Path("/usr/lib/python3/dist-packages/bcc"),
                    version)


def test_every_input_of_a_compile_changes_the_key(tmp_path: Path) -> None:
    headers = Headers(tmp_path, False, "")
    base = ("text", ["-DX=1"], PROGRAMS, MAPS)
    key = cache_key(*base, compiler(), headers)
    assert key == cache_key(*base, compiler(), headers)
    assert key != cache_key("text2", *base[1:], compiler(), headers)
    assert key != cache_key("text", ["-DX=2"], *base[2:], compiler(), headers)
    assert key != cache_key(*base[:2], {"on_getppid": "PERF_EVENT"}, MAPS, compiler(), headers)
    assert key != cache_key(*base[:3], ["hits"], compiler(), headers)
    assert key != cache_key(*base, compiler("0.29.1"), headers)
    assert key != cache_key(*base, compiler(), Headers(tmp_path / "other", False, ""))


def test_the_cache_lives_where_this_user_may_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EBPF_STREAM_CACHE", raising=False)
    monkeypatch.setattr("ebpf_stream._base.cache_dir.SYSTEM_CACHE", tmp_path / "file" / "cache")
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ebpf-stream"
    # A directory others may write to is not trusted with what the kernel loads.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("EBPF_STREAM_CACHE", str(shared))
    assert cache_dir() is None
    monkeypatch.setenv("EBPF_STREAM_CACHE", str(tmp_path / "file" / "below"))
    assert cache_dir() is None, "an explicit cache that cannot be made means no cache"


def test_an_unwritable_cache_is_no_error(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the directory should be")
    ObjectCache(blocked / "objects").put("k", b"{}")
    assert ObjectCache(blocked / "objects").get("k") is None
    with ObjectCache(blocked / "objects").compiling("k"):
        pass


def entry(directory: Path, key: str, image: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.json"
    path.write_bytes(hashlib.sha256(image).hexdigest().encode() + b"\n" + image)
    return path


def test_a_damaged_or_foreign_entry_is_never_used(tmp_path: Path) -> None:
    objects = ObjectCache(tmp_path / "objects")
    path = entry(tmp_path / "objects", "bad-sum", b'{"license": "GPL"}')
    path.write_bytes(path.read_bytes().replace(b"GPL", b"MIT"))
    assert objects.get("bad-sum") is None and not path.exists(), "damaged: removed"
    entry(tmp_path / "objects", "bad-shape", b'{"license": 3}')
    assert objects.get("bad-shape") is None
    foreign = entry(tmp_path / "objects", "foreign", b"{}")
    foreign.chmod(0o666)
    assert objects.get("foreign") is None and foreign.exists(), "untrusted: left alone"


# -- real loads -----------------------------------------------------------------

@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "hits.bpf.c"
    path.write_text(SOURCE)
    return path


def load(source: Path) -> LoadedProgram:
    from ebpf_stream._bpf.loader import _load

    return _load(source, PROGRAMS, MAPS, [])


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def only_entry(cache: Path) -> Path:
    (path,) = (cache / "objects").glob("*.json")
    return path


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_a_second_load_comes_from_the_cache_and_is_the_same_program(
        source: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ebpf_stream._bpf.syscalls import program_tag

    caplog.set_level(logging.INFO, "ebpf_stream")
    first = load(source)
    second = load(source)
    try:
        said = messages(caplog)
        assert any(m.startswith("compiled hits.bpf.c") for m in said), said
        assert "loaded hits.bpf.c from the compile cache" in said
        assert program_tag(first.program_fd("on_getppid")) == program_tag(
            second.program_fd("on_getppid"))
        # The cached program runs and writes its own maps, not the first load's.
        second.attach_tracepoint("on_getppid", "syscalls", "sys_enter_getppid")
        os.getppid()
        assert second.map("hits").lookup_u64_sum(0) >= 1
        assert first.map("hits").lookup_u64_sum(0) == 0
        me = os.getpid().to_bytes(4, "little")
        assert second.map("seen").lookup(me) is not None
    finally:
        first.close()
        second.close()


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_an_entry_the_kernel_refuses_is_compiled_again(
        source: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    load(source).close()
    path = only_entry(cache)
    image = json.loads(path.read_bytes().partition(b"\n")[2])
    insns = bytearray(base64.b64decode(image["programs"]["on_getppid"]["insns"]))
    insns[-8:] = b"\x85\x00\x00\x00\xff\xff\x00\x00"  # ends in a call to no helper
    image["programs"]["on_getppid"]["insns"] = base64.b64encode(bytes(insns)).decode()
    entry(path.parent, path.stem, json.dumps(image).encode())
    caplog.set_level(logging.INFO, "ebpf_stream")
    load(source).close()
    said = messages(caplog)
    assert any("did not load" in m for m in said), said
    assert any(m.startswith("compiled hits.bpf.c") for m in said), said
    assert json.loads(path.read_bytes().partition(b"\n")[2]) != image, "rebuilt"


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_processes_starting_together_compile_once(source: Path, cache: Path) -> None:
    """A pre-fork server's workers start at once: one compiles, the others load its object."""
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        from pathlib import Path
        from ebpf_stream._bpf.loader import _load
        _load(Path({str(source)!r}), {PROGRAMS!r}, {MAPS!r}, []).close()
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True) for _ in range(3)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    compiled = [o for o in outputs if "compiled hits.bpf.c" in o]
    cached = [o for o in outputs if "loaded hits.bpf.c from the compile cache" in o]
    assert (len(compiled), len(cached)) == (1, 2), outputs
