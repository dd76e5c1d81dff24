"""Python threads waiting in named functions, in known proportions.

The event loop's thread, in coroutine ``rounds``, calls each round:
``in_sleep`` (``time.sleep``), ``in_lock`` (a ``threading.Lock`` another
thread holds), ``in_pipe_read`` (a pipe another thread writes late) and
``in_socket_read`` (a TCP socket another thread sends to late): blocking
calls inside the loop, as careless coroutines make them.  Then it awaits
``asyncio.to_thread(in_worker)``, whose worker thread sleeps, while the
loop itself waits in epoll, idle.

    python waits.py SECONDS

Prints ``ready``, waits for a line on stdin (so that a profiler can attach
first), runs for SECONDS, then prints one line per function: its name and
the wall time spent in it, in nanoseconds.
"""

import asyncio
import os
import socket
import sys
import threading
import time

SPENT = {}


def timed(function):
    def run(*args):
        start = time.monotonic_ns()
        try:
            return function(*args)
        finally:
            SPENT[function.__name__] = SPENT.get(function.__name__, 0) + (
                time.monotonic_ns() - start)
    return run


def later(seconds, action):
    """Run ``action`` on another thread ``seconds`` from now."""
    threading.Timer(seconds, action).start()


@timed
def in_sleep():
    time.sleep(0.004)


@timed
def in_lock(lock, held):
    def hold():
        with lock:
            held.set()
            time.sleep(0.006)
    held.clear()
    threading.Thread(target=hold).start()
    held.wait()
    with lock:
        pass


@timed
def in_pipe_read(read_fd, write_fd):
    later(0.008, lambda: os.write(write_fd, b"x"))
    os.read(read_fd, 1)


@timed
def in_socket_read(receiver, sender):
    later(0.002, lambda: sender.send(b"x"))
    receiver.recv(1)


@timed
def in_worker():
    time.sleep(0.005)


async def rounds(seconds):
    lock, held = threading.Lock(), threading.Event()
    read_fd, write_fd = os.pipe()
    listener = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    print("ready", flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        in_sleep()
        in_lock(lock, held)
        in_pipe_read(read_fd, write_fd)
        in_socket_read(receiver, sender)
        await asyncio.to_thread(in_worker)


def main():
    asyncio.run(rounds(float(sys.argv[1])))
    for name, ns in SPENT.items():
        print(name, ns)


if __name__ == "__main__":
    main()
