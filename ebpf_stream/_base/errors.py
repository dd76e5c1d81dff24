"""Exceptions the library raises.

Every exception carries one sentence a user can act on: the CLI prints
``str(exc)`` and exits non-zero, so the message must stand on its own.
"""

from __future__ import annotations


class EbpfStreamError(Exception):
    """Base class of every error ebpf-stream raises on purpose."""


class ConfigError(EbpfStreamError, ValueError):
    """A configuration value is outside its allowed range."""


class EnvironmentCheckError(EbpfStreamError):
    """The machine lacks something BPF needs (privileges, headers, tracefs...)."""


class ProbeError(EbpfStreamError):
    """A BPF program failed to compile, load or attach."""


class TargetError(EbpfStreamError):
    """A process to profile does not exist or a command cannot be started."""


class ExportError(EbpfStreamError):
    """An exporter could not deliver or write what was collected."""
