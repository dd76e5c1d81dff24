"""The package's shape: no module reaches into another package's private names.

(The direction of imports between stages is ``lint-imports``' contract, in
pyproject.toml.)
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ebpf_stream"


def private_imports() -> list[str]:
    """Each ``from X import _name`` where X lies in another package than the importer."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts or path.name == "pprof_pb2.py":
            continue
        here = path.parent.relative_to(PACKAGE).parts
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = list(here[: len(here) - (node.level - 1)])
            target = base + (node.module.split(".") if node.module else [])
            target_package = target if (PACKAGE.joinpath(*target)).is_dir() else target[:-1]
            if target_package == list(here):
                continue
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {alias.name}"
                      for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_touches_another_packages_private_names() -> None:
    assert private_imports() == []
