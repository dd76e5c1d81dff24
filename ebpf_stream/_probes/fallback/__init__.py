"""Profiling without BPF: the host process samples itself (see ``probe``)."""

from __future__ import annotations

from .probe import FallbackProbe

__all__ = ["FallbackProbe"]
