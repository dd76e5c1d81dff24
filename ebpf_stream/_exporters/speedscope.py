"""The speedscope JSON format: one sampled profile per process.

Splitting by process (and pid) lets the viewer switch between programs
instead of blending them, while the shared frame table keeps the file small.
A Python frame's file is its source file, and it carries its line.
"""

from __future__ import annotations

import json
from typing import Any

from .._profile import Profile
from .folded import clean_name, frame_label

SCHEMA = "https://www.speedscope.app/file-format-schema.json"


def render_speedscope(profile: Profile) -> str:
    """The speedscope JSON of ``profile``; weights are CPU nanoseconds."""
    frames: dict[tuple[str, str, int], int] = {}  # (label, file, line) -> index
    by_process: dict[tuple[str, int], dict[tuple[int, ...], int]] = {}
    for s in profile:
        stack = tuple(
            frames.setdefault((frame_label(f), f.module, f.line), len(frames))
            for f in s.frames
        )
        weights = by_process.setdefault((clean_name(s.process), s.pid), {})
        weights[stack] = weights.get(stack, 0) + s.count * profile.period_ns
    profiles: list[dict[str, Any]] = []
    for (process, pid), weights in sorted(by_process.items()):
        stacks = sorted(weights)
        profiles.append({
            "type": "sampled",
            "name": f"{process} ({pid})",
            "unit": "nanoseconds",
            "startValue": 0,
            "endValue": sum(weights.values()),
            "samples": [list(stack) for stack in stacks],
            "weights": [weights[stack] for stack in stacks],
        })
    document = {
        "$schema": SCHEMA,
        "exporter": "ebpf-stream",
        "name": "ebpf-stream CPU profile",
        "activeProfileIndex": 0,
        "shared": {"frames": [{"name": name, "file": file} | ({"line": line} if line else {})
                              for name, file, line in frames]},
        "profiles": profiles,
    }
    return json.dumps(document, separators=(",", ":"))
