"""The speedscope JSON format: one sampled profile per process, in time order.

speedscope's "Time Order" view draws a sampled profile's samples in the
order the file lists them, so each process's samples are listed by their
timestamps, and consecutive samples of one stack form one entry weighted by
their CPU time: the view then shows what ran when, while "Left Heavy" and
"Sandwich" sum the entries as before.  Splitting by process (and pid) lets the
viewer switch between programs instead of interleaving them, while the
shared frame table keeps the file small.  A Python frame's file is its source
file, and it carries its line.  By route, each sample's endpoint is its root
frame, a frame of no file.

Samples without a timestamp (from a profile merged without them) follow the
timed samples of their profile.
"""

from __future__ import annotations

import array
import json
from typing import Any

from .._model.labels import clean_name, frame_label, shown_frames
from .._model.profile import Frame, Profile

SCHEMA = "https://www.speedscope.app/file-format-schema.json"


class _Runs:
    """One process's samples as runs: a stack index and the CPU nanoseconds it ran."""

    def __init__(self) -> None:
        # Arrays, not lists of ints: a long recording holds one run per change of stack.
        self.stacks = array.array("L")
        self.weights = array.array("Q")

    def append(self, stack: int, weight: int) -> None:
        if self.stacks and self.stacks[-1] == stack:
            self.weights[-1] += weight
        else:
            self.stacks.append(stack)
            self.weights.append(weight)


class SpeedscopeTimeline:
    """Every process's samples so far, in time order, ready to render as speedscope JSON.

    Profiles must be added in the order they were collected; the samples of
    each are sorted by timestamp.  ``by_route`` roots each stack at its
    endpoint.
    """

    def __init__(self, *, by_route: bool = False) -> None:
        self.by_route = by_route
        self._frames: dict[tuple[str, str, int], int] = {}  # (label, file, line) -> index
        self._stack_index: dict[tuple[Frame, ...], int] = {}
        self._stacks: list[list[int]] = []  # frame indices, root first
        self._runs: dict[tuple[str, int], _Runs] = {}  # by (process, pid)

    def add(self, profile: Profile) -> None:
        samples: dict[tuple[str, int], list[tuple[int, int, int]]] = {}  # (time, stack, count)
        for s in profile:
            stack = self._stack(shown_frames(s, by_route=self.by_route))
            timed = samples.setdefault((clean_name(s.process), s.pid), [])
            timed.extend((t, stack, 1) for t in s.timestamps_ns)
            if s.count > len(s.timestamps_ns):
                timed.append((profile.end_ns, stack, s.count - len(s.timestamps_ns)))
        for process, timed in samples.items():
            runs = self._runs.setdefault(process, _Runs())
            for _, stack, count in sorted(timed):
                runs.append(stack, count * profile.period_ns)

    def _stack(self, frames: tuple[Frame, ...]) -> int:
        index = self._stack_index.get(frames)
        if index is None:
            index = self._stack_index[frames] = len(self._stacks)
            self._stacks.append([
                self._frames.setdefault((frame_label(f), f.module, f.line), len(self._frames))
                for f in frames])
        return index

    def render(self) -> str:
        """The speedscope JSON document; weights are CPU nanoseconds."""
        profiles: list[dict[str, Any]] = []
        for (process, pid), runs in sorted(self._runs.items()):
            weights = runs.weights.tolist()
            profiles.append({
                "type": "sampled",
                "name": f"{process} ({pid})",
                "unit": "nanoseconds",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": [self._stacks[i] for i in runs.stacks],
                "weights": weights,
            })
        document = {
            "$schema": SCHEMA,
            "exporter": "ebpf-stream",
            "name": "ebpf-stream CPU profile",
            "activeProfileIndex": 0,
            "shared": {"frames": [{"name": name} | ({"file": file} if file else {})
                                  | ({"line": line} if line else {})
                                  for name, file, line in self._frames]},
            "profiles": profiles,
        }
        return json.dumps(document, separators=(",", ":"))


def render_speedscope(profile: Profile, *, by_route: bool = False) -> str:
    """The speedscope JSON of ``profile``; weights are CPU nanoseconds."""
    timeline = SpeedscopeTimeline(by_route=by_route)
    timeline.add(profile)
    return timeline.render()
