"""The compile worker: builds a BPF object with bcc and hands its fds back.

Run as ``PYTHON -I .../_compile_worker.py SOCKET_FD`` with a JSON request on
stdin, under whichever interpreter has bcc (Debian's ``python3-bpfcc``
belongs to the system's Python, not the host's).  It therefore imports
nothing but the standard library and bcc, and runs on any Python 3.9+.

It loads the requested programs and sends one JSON reply with the program
and map fds attached (SCM_RIGHTS), then exits; the fds stay valid in the
receiving process.  The reply also describes the object as the kernel got
it (each program's instructions, each map's attributes, the BTF the maps
were created with), so the host can load it again later without bcc.
Compiler diagnostics go to stderr.
"""

from __future__ import annotations

import array
import base64
import ctypes
import json
import os
import socket
import struct
import sys
from typing import Any

_SYS_BPF = 321  # x86-64
_BPF_PROG_LOAD, _BPF_OBJ_GET_INFO_BY_FD, _BPF_BTF_GET_FD_BY_ID = 5, 15, 19
_BPF_PROG_TYPE_TRACING, _BPF_TRACE_RAW_TP = 26, 23
_MAP_INFO = struct.Struct("<IIIIII16sIIQQIIIIQ")  # struct bpf_map_info, 88 bytes
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _object_info(fd: int, info: ctypes.Array[ctypes.c_char]) -> None:
    attr = struct.pack("<IIQ", fd, len(info), ctypes.addressof(info))
    buf = ctypes.create_string_buffer(attr, len(attr))
    if _libc.syscall(_SYS_BPF, _BPF_OBJ_GET_INFO_BY_FD, buf, len(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_OBJ_GET_INFO_BY_FD: {os.strerror(err)}")


def _map_info(fd: int) -> dict[str, int]:
    info = ctypes.create_string_buffer(_MAP_INFO.size)
    _object_info(fd, info)
    (map_type, _id, key_size, value_size, max_entries, flags, _name, _ifindex,
     vmlinux_value_type, _dev, _ino, btf_id, btf_key_type, btf_value_type, _pad,
     extra) = _MAP_INFO.unpack(info.raw)
    return {"type": map_type, "key_size": key_size, "value_size": value_size,
            "max_entries": max_entries, "flags": flags, "btf_id": btf_id,
            "btf_key_type": btf_key_type, "btf_value_type": btf_value_type,
            "btf_vmlinux_value_type": vmlinux_value_type, "extra": extra}


def _btf_bytes(btf_id: int) -> bytes:
    """The raw BTF the kernel holds under ``btf_id`` (what bcc loaded for the maps)."""
    attr = ctypes.create_string_buffer(struct.pack("<I", btf_id), 16)
    fd = _libc.syscall(_SYS_BPF, _BPF_BTF_GET_FD_BY_ID, attr, 16)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_BTF_GET_FD_BY_ID: {os.strerror(err)}")
    try:
        header = ctypes.create_string_buffer(32)  # struct bpf_btf_info: btf, btf_size, ...
        _object_info(fd, header)
        (size,) = struct.unpack_from("<I", header.raw, 8)
        data = ctypes.create_string_buffer(size)
        info = ctypes.create_string_buffer(struct.pack("<QI", ctypes.addressof(data), size), 32)
        _object_info(fd, info)
        return data.raw
    finally:
        os.close(fd)


def _load_tp_btf(bpf: Any, function: str, license: str) -> tuple[int, int]:
    """Load ``tp_btf__NAME`` as a BTF tracepoint program on tracepoint NAME:
    (its fd, the BTF id of the tracepoint's type).

    bcc loads tracing programs only on kernel functions, so this takes its
    instructions and loads them as libbpf would a ``tp_btf/NAME`` section.
    """
    libbpf = ctypes.CDLL("libbpf.so.1")
    libbpf.libbpf_find_vmlinux_btf_id.argtypes = [ctypes.c_char_p, ctypes.c_int]
    tracepoint = function.partition("__")[2]
    btf_id = libbpf.libbpf_find_vmlinux_btf_id(tracepoint.encode(), _BPF_TRACE_RAW_TP)
    if btf_id < 0:
        raise OSError(-btf_id, f"{function}: the kernel's BTF has no tracepoint {tracepoint}")
    fd = _load(bpf.dump_func(function.encode()), license, _BPF_PROG_TYPE_TRACING,
               _BPF_TRACE_RAW_TP, btf_id, function)
    return fd, btf_id


def _load(insns: bytes, license: str, prog_type: int, attach_type: int, btf_id: int,
          name: str) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    licence = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(1 << 20)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, prog_type, len(insns) // 8, ctypes.addressof(code),
                     ctypes.addressof(licence), 1, len(log), ctypes.addressof(log))
    struct.pack_into("16s", attr, 48, name.encode()[:15])
    struct.pack_into("<I", attr, 68, attach_type)
    struct.pack_into("<I", attr, 108, btf_id)
    fd = _libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        # The verifier's reason, before its closing statistics.
        lines = [line for line in log.value.decode(errors="replace").strip().splitlines()
                 if not line.startswith(("processed ", "verification time"))]
        raise OSError(err, f"loading {name}: {os.strerror(err)}"
                      + (f": {lines[-1]}" if lines else ""))
    return int(fd)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _image(bpf: Any, lib: Any, programs: dict[str, int],
           attach_btf_ids: dict[str, int]) -> dict[str, Any]:
    """What loading the object again takes: instructions, maps and BTF, by name."""
    module = bpf.module
    # bcc's Python binding leaves these two undeclared.
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    maps = {}
    for i in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, i)
        fd = lib.bpf_table_fd(module, name)
        maps[name.decode()] = dict(_map_info(fd), fd=fd)
    btf_ids = {m["btf_id"] for m in maps.values() if m["btf_id"]}
    if len(btf_ids) > 1:
        raise ValueError(f"maps carry {len(btf_ids)} BTF objects; expected one")
    return {
        "license": lib.bpf_module_license(module).decode(),
        "kern_version": lib.bpf_module_kern_version(module),
        "btf": _b64(_btf_bytes(btf_ids.pop())) if btf_ids else "",
        "maps": maps,
        "programs": {name: {"type": prog_type, "insns": _b64(bpf.dump_func(name.encode())),
                            "attach_type": _BPF_TRACE_RAW_TP if name in attach_btf_ids else 0,
                            "attach_btf_id": attach_btf_ids.get(name, 0)}
                     for name, prog_type in programs.items()},
    }


def main() -> int:
    request = json.load(sys.stdin)
    sock = socket.socket(fileno=int(sys.argv[1]))
    from bcc import BPF
    from bcc.libbcc import lib

    btf_ids: dict[str, int] = {}
    tp_btf: dict[str, int] = {}
    try:
        bpf = BPF(text=request["source"].encode(), cflags=request["cflags"])
        for name, prog_type in request["programs"].items():
            if name.startswith("tp_btf__"):
                tp_btf[name], btf_ids[name] = _load_tp_btf(
                    bpf, name, lib.bpf_module_license(bpf.module).decode())
            else:
                bpf.load_func(name.encode(), getattr(BPF, prog_type))
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # TRACEPOINT_PROBE and RAW_TRACEPOINT_PROBE functions were loaded (and
    # attached here) by bcc itself; the attachment ends with this process,
    # the program does not.
    types = {fn: _autoload_type(fn) for fn in (f.decode() for f in bpf.funcs)}
    types.update(request["programs"])
    programs = {fn.name.decode(): fn.fd for fn in bpf.funcs.values()} | tp_btf
    maps = {name: bpf[name.encode()].map_fd for name in request["maps"]}
    try:
        image = _image(bpf, lib, {name: getattr(BPF, types[name]) for name in programs},
                       btf_ids)
    except Exception as exc:  # the object is loaded; only the cache goes without it
        print(f"warning: cannot describe the object for the cache: {exc}", file=sys.stderr)
        image = None
    fds = [*programs.values(), *maps.values()]
    names = json.dumps({"programs": list(programs), "maps": list(maps)}).encode()
    sock.sendmsg([names], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    # The image can outgrow a datagram; stdout has no such limit.
    json.dump(image, sys.stdout)
    return 0


def _autoload_type(function: str) -> str:
    """The program type bcc gave a function it loaded by its name's prefix."""
    prefix = function.partition("__")[0]
    return {"tracepoint": "TRACEPOINT", "raw_tracepoint": "RAW_TRACEPOINT"}.get(prefix, "")


if __name__ == "__main__":
    sys.exit(main())
