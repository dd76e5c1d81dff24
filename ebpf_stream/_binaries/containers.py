"""Which container a process runs in, and its pid there, as the host reads them.

Container runtimes name a container's cgroup after its 64-hex id, each in
its own way: ``/docker/<id>`` or ``docker-<id>.scope`` (Docker),
``cri-containerd-<id>.scope`` or ``/kubepods/.../pod<uid>/<id>``
(containerd), ``crio-<id>.scope`` (CRI-O), ``libpod-<id>.scope`` (podman).
A Kubernetes pod's cgroup is named after its uid, with ``-`` or, under
systemd, ``_``.  A backend groups profiles by those (``container.id``,
``k8s.pod.uid``).  CRI-O's ``crio-conmon-<id>`` is the container's monitor,
not the container.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

_CONTAINER = re.compile(r"(?:docker-|cri-containerd-|crio-|libpod-)?([0-9a-f]{64})(?:\.scope)?")
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


class Container(NamedTuple):
    id: str
    pod_uid: str  # empty outside Kubernetes


def parse_cgroups(text: str) -> Container | None:
    """The container a ``/proc/PID/cgroup`` names, None for none (cgroup v1 or v2)."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        for segment in reversed(path.split("/")):
            found = _CONTAINER.fullmatch(segment)
            if found:
                pod = _POD.search(path)
                return Container(found[1], pod[1].replace("_", "-") if pod else "")
    return None


def container_of(pid: int) -> Container | None:
    """``pid``'s container; None outside any, or once it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            return parse_cgroups(f.read())
    except OSError:
        return None


def namespace_pid(pid: int) -> int:
    """``pid`` as its own pid namespace numbers it (the last of ``NSpid``); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return 0


def pid_namespace(pid: int) -> tuple[int, int]:
    """(device, inode) of ``pid``'s pid namespace where it is not ours, else (0, 0):
    how the kernel is told to ask for a thread's id there."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/pid")
        ours = os.stat("/proc/self/ns/pid")
    except OSError:
        return 0, 0
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return 0, 0
    return theirs.st_dev, theirs.st_ino
