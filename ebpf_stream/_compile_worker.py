"""The compile worker: builds a BPF object with bcc and hands its fds back.

Run as ``python -m ebpf_stream._compile_worker SOCKET_FD`` with a JSON
request on stdin.  It loads the requested programs, sends one JSON reply
with the program and map fds attached (SCM_RIGHTS) and exits; the fds stay
valid in the receiving process.  Compiler diagnostics go to stderr.
"""

from __future__ import annotations

import array
import json
import socket
import sys


def main() -> int:
    request = json.load(sys.stdin)
    sock = socket.socket(fileno=int(sys.argv[1]))
    from bcc import BPF

    try:
        bpf = BPF(text=request["source"].encode(), cflags=request["cflags"])
        for name, prog_type in request["programs"].items():
            bpf.load_func(name.encode(), getattr(BPF, prog_type))
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # TRACEPOINT_PROBE functions were loaded (and attached here) by bcc
    # itself; the attachment ends with this process, the program does not.
    programs = {fn.name.decode(): fn.fd for fn in bpf.funcs.values()}
    maps = {name: bpf[name.encode()].map_fd for name in request["maps"]}
    fds = [*programs.values(), *maps.values()]
    reply = json.dumps({"programs": list(programs), "maps": list(maps)}).encode()
    sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
