"""The speedscope format."""

from __future__ import annotations

import json
from typing import Any

from sample_frames import PERIOD
from sample_profiles import empty_profile, python_profile, request_profile, sample_profile

from ebpf_stream._outputs.speedscope import SCHEMA, render_speedscope


def test_speedscope_structure_and_weights() -> None:
    doc = json.loads(render_speedscope(sample_profile()))
    assert doc["$schema"] == SCHEMA
    frames = doc["shared"]["frames"]
    names = [f["name"] for f in frames]
    assert "vfs_read_[k]" in names
    assert {"name": "ext4_file_read_iter_[k]", "file": "ext4"} in frames
    assert len(names) == len(set(zip(names, [f["file"] for f in frames], strict=True)))

    profiles = {p["name"]: p for p in doc["profiles"]}
    assert list(profiles) == ["app (10)", "app (11)", "db (20)"]
    for p in profiles.values():
        assert (p["type"], p["unit"], p["startValue"]) == ("sampled", "nanoseconds", 0)
        assert p["endValue"] == sum(p["weights"])
        assert len(p["samples"]) == len(p["weights"])

    def stacks(p: dict[str, Any]) -> dict[tuple[str, ...], int]:
        return {tuple(names[i] for i in sample): weight
                for sample, weight in zip(p["samples"], p["weights"], strict=True)}

    assert stacks(profiles["app (10)"]) == {
        ("main", "work", "vfs_read_[k]", "ext4_file_read_iter_[k]"): 3 * PERIOD,
        ("main", "work"): 4 * PERIOD,
    }
    assert stacks(profiles["app (11)"]) == {
        ("main", "work", "vfs_read_[k]", "ext4_file_read_iter_[k]"): 2 * PERIOD,
    }


def test_speedscope_empty_profile_is_valid_json() -> None:
    doc = json.loads(render_speedscope(empty_profile()))
    assert doc["profiles"] == []
    assert doc["shared"]["frames"] == []


def test_speedscope_python_frames_carry_their_source_file_and_line() -> None:
    frames = json.loads(render_speedscope(python_profile()))["shared"]["frames"]
    assert {"name": "handler (app.py:3)", "file": "/srv/app.py", "line": 3} in frames
    assert {"name": "handler (app.py:4)", "file": "/srv/app.py", "line": 4} in frames
    assert {"name": "Handle._run (asyncio/events.py:80)",
            "file": "/usr/lib/python3.11/asyncio/events.py", "line": 80} in frames
    assert {"name": "main", "file": "/usr/bin/app"} in frames  # native: no line
    assert len(frames) == 6


def test_speedscope_by_route_roots_each_sample_at_its_endpoint() -> None:
    doc = json.loads(render_speedscope(request_profile(), by_route=True))
    frames = doc["shared"]["frames"]
    assert {"name": "GET /items/{id}"} in frames  # no file: an endpoint is no code
    names = [f["name"] for f in frames]
    (profile,) = doc["profiles"]
    weights: dict[tuple[str, ...], int] = {}
    for sample, weight in zip(profile["samples"], profile["weights"], strict=True):
        stack = tuple(names[i] for i in sample)
        weights[stack] = weights.get(stack, 0) + weight
    assert weights == {
        ("GET /items/{id}", "main", "work"): 5 * PERIOD,
        ("POST /checkout", "main", "work", "vfs_read_[k]"): 4 * PERIOD,
        ("[no route]", "main", "work"): PERIOD,
        ("/health", "main"): 2 * PERIOD,
    }
