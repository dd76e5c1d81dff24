"""Public names that load their module on first use.

A host imports ``ebpf_stream`` at startup, often only to configure it; the
modules behind the names pull in numpy, protobuf and friends, which cost tens
of MiB and should load only when something uses them.  A package's
``__getattr__`` (PEP 562) resolves each name once and then caches it in the
package, so later lookups cost nothing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]) -> Callable[[str], object]:
    """The ``__getattr__`` of ``package`` that imports each module of ``modules`` on demand.

    ``modules`` maps a module name, relative to ``package``, to the names it exports.
    """
    owner = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        module = owner.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
