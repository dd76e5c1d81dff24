"""A compiled BPF object as the kernel was given it, and loading it again without bcc.

bcc turns C into instructions, creates the maps and rewrites every map
reference into an instruction that carries the map's fd.  The image keeps
what that produced: each program's instructions and type, each map's
attributes and the fd its references carry, and the BTF the maps were made
with.  Loading it again is plain ``bpf(2)``: create the maps, point each
reference at the new map, and let the kernel verify the programs.  No
compiler runs, so nothing of LLVM enters the process.

An image comes from a file, so nothing in it is taken on trust: it is
decoded against its schema, every map reference must name a map of the
image, and the kernel verifies every program as it would any other.
"""

from __future__ import annotations

import base64
import os
from array import array

import msgspec

from .syscalls import create_map, load_btf, load_program

_LD_IMM64 = 0x18
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2  # src_reg of an ld_imm64 naming a map


class MapSpec(msgspec.Struct, frozen=True):
    fd: int  # the fd the instructions name this map by
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    btf_id: int
    btf_key_type: int
    btf_value_type: int
    btf_vmlinux_value_type: int
    extra: int


class ProgramSpec(msgspec.Struct, frozen=True):
    type: int
    insns: str  # base64
    # A BTF tracepoint program's expected attach type and the BTF id of its
    # tracepoint (the kernel build is part of the cache key).
    attach_type: int = 0
    attach_btf_id: int = 0


class ObjectImage(msgspec.Struct, frozen=True):
    license: str
    kern_version: int
    btf: str  # base64; empty when no map has BTF
    maps: dict[str, MapSpec]
    programs: dict[str, ProgramSpec]


def decode_image(data: bytes) -> ObjectImage:
    """The image in ``data``; raises ``msgspec.ValidationError`` (a ``ValueError``)
    when it does not have the image's shape."""
    return msgspec.json.decode(data, type=ObjectImage)


def _relocate(insns: bytes, fds: dict[int, int]) -> bytes:
    """``insns`` with each map reference pointing at the new fd of its map."""
    if len(insns) % 8:
        raise ValueError("instructions are not whole")
    words = array("I", insns)  # each instruction is two u32: code/regs/offset, then imm
    for i in range(0, len(words), 2):
        first = words[i]
        if first & 0xFF == _LD_IMM64 and (first >> 12) & 0xF in (_PSEUDO_MAP_FD,
                                                                 _PSEUDO_MAP_VALUE):
            old = words[i + 1]
            if old not in fds:
                raise ValueError(f"an instruction names map fd {old}, which the image lacks")
            words[i + 1] = fds[old]
    return words.tobytes()


class ImageLoader:
    """An image being loaded: its maps are created at once, its programs verified
    when asked for.

    The kernel's verifier takes most of a load, up to hundreds of
    milliseconds a program, so a caller loads first the programs it needs
    first.  Every map is kept open until every program is loaded, since
    programs reference maps the caller never reads; ``release`` then closes
    those.  Nothing is left open if creating the maps fails.
    """

    def __init__(self, image: ObjectImage) -> None:
        self._image = image
        self._map_fds: dict[str, int] = {}
        btf = load_btf(base64.b64decode(image.btf)) if image.btf else 0
        try:
            for name, m in image.maps.items():
                with_btf = btf if m.btf_id else 0
                self._map_fds[name] = create_map(
                    name, m.type, m.key_size, m.value_size, m.max_entries, m.flags, with_btf,
                    m.btf_key_type if with_btf else 0, m.btf_value_type if with_btf else 0,
                    m.btf_vmlinux_value_type, m.extra)
        except BaseException:
            self.close()
            raise
        finally:
            if btf:
                os.close(btf)  # each map holds its own reference
        self._relocations = {m.fd: self._map_fds[name] for name, m in image.maps.items()}

    def program_names(self) -> list[str]:
        return list(self._image.programs)

    def map_fd(self, name: str) -> int:
        """The fd of map ``name``, which the caller now owns: ``release`` leaves it open."""
        return self._map_fds.pop(name)

    def load(self, name: str) -> int:
        """Verify and load program ``name``; returns its fd."""
        p = self._image.programs[name]
        insns = _relocate(base64.b64decode(p.insns), self._relocations)
        return load_program(name, p.type, insns, self._image.license, self._image.kern_version,
                            attach_type=p.attach_type, attach_btf_id=p.attach_btf_id)

    def close(self) -> None:
        """Close the maps no caller took."""
        for fd in self._map_fds.values():
            os.close(fd)
        self._map_fds = {}
