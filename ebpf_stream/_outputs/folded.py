"""The folded (collapsed stacks) format.

One line per stack: ``process;root;...;leaf count``, each frame named by
:func:`~ebpf_stream._model.labels.frame_label`.
"""

from __future__ import annotations

from .._model.labels import clean_name, frame_label
from .._model.profile import Profile


def collapse(profile: Profile) -> dict[tuple[str, ...], int]:
    """Sample counts by ``(process, root label, ..., leaf label)``.

    Pids are dropped on purpose: the workers of one program usually share a
    name and a code path, and are most useful summed.
    """
    stacks: dict[tuple[str, ...], int] = {}
    for s in profile:
        key = (clean_name(s.process), *map(frame_label, s.frames))
        stacks[key] = stacks.get(key, 0) + s.count
    return stacks


def render_folded(profile: Profile) -> str:
    """The folded text of ``profile``, lines sorted so equal profiles give equal files."""
    lines = sorted(f"{';'.join(path)} {count}" for path, count in collapse(profile).items())
    return "".join(line + "\n" for line in lines)
