"""asyncio round trips with an echo process: the event loop waits in epoll and
the scheduler switches tasks on every one.

    python ping_pong.py ROUNDS

Prints ``ready``, waits for a line on stdin (so that a profiler can attach
first), makes ROUNDS one-byte round trips over a socketpair with a forked
echo process, then prints the wall time they took in ns.
"""

import asyncio
import os
import socket
import sys
import time


def echo(sock):
    while data := sock.recv(64):
        sock.sendall(data)


async def round_trips(sock, rounds):
    loop = asyncio.get_running_loop()
    start = time.monotonic_ns()
    for _ in range(rounds):
        await loop.sock_sendall(sock, b"x")
        await loop.sock_recv(sock, 64)
    return time.monotonic_ns() - start


if __name__ == "__main__":
    rounds = int(sys.argv[1])
    ours, theirs = socket.socketpair()
    peer = os.fork()
    if peer == 0:
        ours.close()
        echo(theirs)
        os._exit(0)
    theirs.close()
    ours.setblocking(False)
    print("ready", flush=True)
    sys.stdin.readline()
    elapsed = asyncio.run(round_trips(ours, rounds))
    ours.close()
    os.waitpid(peer, 0)
    print(elapsed, flush=True)
