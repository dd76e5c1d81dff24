"""Real servers for the tests: uvicorn, gunicorn and aiohttp on 127.0.0.1, driven by wrk.

A test writes its apps as ``app_fastapi.py`` (an ``app``) and
``app_aiohttp.py`` (an ``app``, and a ``__main__`` that serves it on the
port given) into a directory, and starts a ``Service`` of a kind in it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gunicorn_options(port: int) -> list[str]:
    options = ["-b", f"127.0.0.1:{port}", "-w", "2", "--graceful-timeout", "30"]
    # Newer gunicorns listen on a control socket in ~/.gunicorn, shared by every run.
    config = importlib.util.find_spec("gunicorn.config")
    if config is not None and config.origin is not None and (
            "--no-control-socket" in Path(config.origin).read_text()):
        options.append("--no-control-socket")
    return options


def server_command(kind: str, port: int, python: str = sys.executable) -> list[str]:
    """How each server is started, serving its app on 127.0.0.1:``port``."""
    bind = gunicorn_options(port) if kind.startswith("gunicorn") else []
    return {
        "uvicorn": [python, "-m", "uvicorn", "app_fastapi:app", "--host", "127.0.0.1",
                    "--port", str(port), "--no-access-log"],
        "uvicorn --workers 2": [python, "-m", "uvicorn", "app_fastapi:app", "--host",
                                "127.0.0.1", "--port", str(port), "--no-access-log",
                                "--workers", "2"],
        "aiohttp": [python, "app_aiohttp.py", str(port)],
        "gunicorn UvicornWorker": [python, "-m", "gunicorn", "app_fastapi:app", *bind,
                                   "-k", "uvicorn.workers.UvicornWorker"],
        # --preload: the app is made in the arbiter, before the fork; the lifespan still
        # runs in each worker.
        "gunicorn GunicornWebWorker": [python, "-m", "gunicorn", "app_aiohttp:app", *bind,
                                       "-k", "aiohttp.GunicornWebWorker", "--preload"],
    }[kind]


# What stops each server cleanly: uvicorn re-raises a SIGTERM after shutting down (its
# exit status is then -15), and turns a SIGINT into exit status 0.
STOP = {"uvicorn": signal.SIGINT, "uvicorn --workers 2": signal.SIGINT,
        "aiohttp": signal.SIGINT, "gunicorn UvicornWorker": signal.SIGTERM,
        "gunicorn GunicornWebWorker": signal.SIGTERM}


# A wrk script: each thread sends the paths in turn.
_ROUND_ROBIN = """
local paths, n = {%s}, 0
request = function()
    n = n + 1
    return wrk.format("GET", paths[(n %% #paths) + 1])
end
"""


class Service:
    """A server process, its log in a file (a pipe could fill up under load)."""

    def __init__(self, kind: str, cwd: Path, env: dict[str, str],
                 prefix: list[str] | None = None, python: str = sys.executable) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, name = tempfile.mkstemp(prefix="ebpf-stream-service-", suffix=".log")
        self._log = Path(name)
        try:
            self.proc = subprocess.Popen(
                [*(prefix or []), *server_command(kind, self.port, python)], cwd=cwd, env=env,
                stdout=subprocess.DEVNULL, stderr=fd)
        finally:
            os.close(fd)
        self.returncode: int | None = None

    def get(self, path: str) -> dict[str, object] | None:
        """The JSON answer to GET ``path`` on a new connection, or None if none came."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return dict(json.load(response))
        except OSError:
            return None

    def first_answer(self, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr
            answer = self.get("/mode")
            if answer is not None:
                return answer
            time.sleep(0.01)
        raise AssertionError(f"{self.kind} never answered:\n{self.stderr}")

    def modes(self, workers: int, mode: str = "bpf", timeout: float = 90) -> dict[int, str]:
        """Each worker's profiler mode, once ``workers`` workers report ``mode``.

        Each request is a new connection, which any worker may accept.
        """
        seen: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr
            answer = self.get("/mode")
            if answer is not None:
                seen[int(answer["pid"])] = str(answer["mode"])  # type: ignore[call-overload]
                if len(seen) == workers and set(seen.values()) == {mode}:
                    return seen
            time.sleep(0.02)
        raise AssertionError(f"workers seen: {seen}\n{self.stderr}")

    def load(self, seconds: int = 3, connections: int = 4,
             paths: Sequence[str] = ("/busy",)) -> str:
        """wrk on ``paths`` (each connection takes them in turn); its report."""
        wrk = shutil.which("wrk")
        if wrk is None:
            pytest.skip("wrk is not installed (./run test installs it)")
        with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
            script.write(_ROUND_ROBIN % ", ".join(json.dumps(p) for p in paths))
            script.flush()
            done = subprocess.run([wrk, "-t2", f"-c{connections}", f"-d{seconds}s",
                                   "-s", script.name, self.url], capture_output=True, text=True,
                                  timeout=seconds + 30)
        assert done.returncode == 0, done.stderr
        match = re.search(r"(\d+) requests in", done.stdout)
        assert match is not None and int(match.group(1)) > 0, done.stdout
        assert "Non-2xx" not in done.stdout and "Socket errors" not in done.stdout, done.stdout
        return done.stdout

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(STOP[self.kind])
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def close(self) -> None:
        """Kill the server if it still runs, and drop its output."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.unlink(missing_ok=True)

    @property
    def stderr(self) -> str:
        return self._log.read_text(errors="replace")

    @property
    def ours(self) -> list[str]:
        """Our log lines."""
        return [line for line in self.stderr.splitlines() if line.startswith("ebpf-stream: ")]


def clean_environment(**variables: str) -> dict[str, str]:
    """This environment without any OTEL_* or EBPF_STREAM_* setting (the compile
    cache's aside), sampling at 99 Hz, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EBPF_STREAM_"))
           or k == "EBPF_STREAM_CACHE"}
    return {**env, "EBPF_STREAM_SAMPLE_RATE": "99", **variables}


@contextmanager
def app_directory(apps: dict[str, str], *subdirectories: str) -> Iterator[Path]:
    """A directory any uid may write to, holding ``apps`` (file name -> source) and
    the empty ``subdirectories``; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ebpf-stream-service-"))
    try:
        path.chmod(0o777)
        for name, source in apps.items():
            (path / name).write_text(source)
        for name in subdirectories:
            (path / name).mkdir()
            (path / name).chmod(0o777)
        yield path
    finally:
        shutil.rmtree(path)
