"""Kernel headers for bcc to compile against.

bcc compiles C at run time against kernel headers.  Hosts with a custom
kernel (no headers package) are common, so when the running kernel has no
headers we point bcc at the nearest installed Debian headers, merged from
their ``-common`` and per-architecture halves, and say so.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .._base.cache_dir import cache_dir
from .._base.errors import EnvironmentCheckError


@dataclasses.dataclass(frozen=True, slots=True)
class Headers:
    """Where bcc should look for kernel headers, and whether that is an exact match."""

    path: Path
    exact: bool
    description: str


def _release_version(name: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?(?:-(\d+))?", name)
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def _installed_header_pairs(src: Path) -> Iterator[tuple[Path, Path]]:
    """Yield (arch, common) pairs of Debian header directories under ``src``."""
    if not src.is_dir():
        return
    for arch in sorted(src.glob("linux-headers-*")):
        if arch.name.endswith("-common") or not (arch / "include").is_dir():
            continue
        stem = re.sub(r"-[a-z0-9_]+$", "", arch.name)  # drop the flavour (-amd64)
        common = src / f"{stem}-common"
        if common.is_dir():
            yield arch, common


def _merge_tree(dst: Path, sources: list[Path]) -> None:
    """Overlay ``sources`` into ``dst`` as symlinks; later sources win on files.

    Only directories present in several sources become real directories, so
    the merged tree costs a few hundred inodes, not a copy of the headers.
    """
    dst.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[Path]] = {}
    for s in sources:
        for child in s.iterdir():
            entries.setdefault(child.name, []).append(child)
    for name, paths in entries.items():
        dirs = [p for p in paths if p.is_dir()]
        if len(dirs) > 1:
            _merge_tree(dst / name, dirs)
        else:
            (dst / name).symlink_to(paths[-1])


_private_dir: Path | None = None


def _merged_headers_dir() -> Path:
    """Where merged header trees go: the cache, or with none a directory of this process's."""
    global _private_dir
    base = cache_dir()
    if base is not None:
        return base / "kernel-headers"
    if _private_dir is None:
        _private_dir = Path(tempfile.mkdtemp(prefix="ebpf-stream-headers-"))
    return _private_dir


def _is_merged(tree: Path) -> bool:
    return (tree / "include/linux/kconfig.h").exists()


def find_headers(release: str | None = None, src: Path = Path("/usr/src")) -> Headers:
    """Find kernel headers for ``release`` (default: the running kernel)."""
    release = release or platform.release()
    build = Path("/lib/modules") / release / "build"
    if (build / "include/linux/kconfig.h").exists() or (
        (build / "include").is_dir() and (build.parent / "source/include/linux/kconfig.h").exists()
    ):
        return Headers(build, True, f"{build} (matches the running kernel)")
    pairs = list(_installed_header_pairs(src))
    if not pairs:
        raise EnvironmentCheckError(
            f"no kernel headers found for Linux {release}: install linux-headers-amd64 "
            "(or the headers of your kernel) with apt-get, or run ./run setup"
        )
    want = _release_version(release)
    # Nearest: the newest headers not newer than the kernel, else the oldest newer ones.
    older = [p for p in pairs if _release_version(p[0].name) <= want]
    arch, common = max(older, key=lambda p: _release_version(p[0].name)) if older else min(
        pairs, key=lambda p: _release_version(p[0].name))
    merged = _merged_headers_dir() / arch.name
    if not _is_merged(merged):
        merged.parent.mkdir(parents=True, exist_ok=True)
        # Probes open concurrently: each thread builds its own tree, the first rename wins.
        tmp = Path(tempfile.mkdtemp(prefix=f".{merged.name}.", dir=merged.parent))
        _merge_tree(tmp, [common, arch])
        if merged.exists() and not _is_merged(merged):
            shutil.rmtree(merged, ignore_errors=True)  # left from headers since removed
        try:
            tmp.rename(merged)
        except OSError:  # another thread or process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return Headers(merged, False,
                   f"no headers for Linux {release}; using {arch.name} with {common.name}")


def identity(headers: Headers) -> str:
    """What tells these headers from others of the same name: the configuration and
    version files bcc's compile reads, by size and modification time."""
    parts = [str(headers.path.resolve())]
    for name in ("include/generated/autoconf.h", "include/generated/uapi/linux/version.h",
                 "include/config/kernel.release"):
        try:
            st = (headers.path / name).stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:-")
    return "\n".join(parts)
