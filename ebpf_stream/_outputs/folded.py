"""The folded (collapsed stacks) format.

One line per stack: ``process;root;...;leaf count``, each frame named by
:func:`~ebpf_stream._model.labels.frame_label`.  By route, each stack's
endpoint is its root frame (``app;GET /items/{id};main;... 3``), so a flame
graph of the file reads per endpoint.
"""

from __future__ import annotations

from .._model.labels import clean_name, frame_label, shown_frames
from .._model.profile import Profile


def collapse(profile: Profile, *, by_route: bool = False) -> dict[tuple[str, ...], int]:
    """Sample counts by ``(process, root label, ..., leaf label)``; by route, the
    root is the endpoint.

    Pids are dropped on purpose: the workers of one program usually share a
    name and a code path, and are most useful summed.
    """
    stacks: dict[tuple[str, ...], int] = {}
    for s in profile:
        key = (clean_name(s.process), *map(frame_label, shown_frames(s, by_route=by_route)))
        stacks[key] = stacks.get(key, 0) + s.count
    return stacks


def render_folded(profile: Profile, *, by_route: bool = False) -> str:
    """The folded text of ``profile``, lines sorted so equal profiles give equal files."""
    lines = sorted(f"{';'.join(path)} {count}"
                   for path, count in collapse(profile, by_route=by_route).items())
    return "".join(line + "\n" for line in lines)
