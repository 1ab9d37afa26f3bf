"""The README's layout block matches the tree: every file or folder it names exists where it says, and every
module and package of the library and the application layer is named there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_entries() -> dict[str, str]:
    """Path (relative to the repository) -> its line, for every name in the README's layout block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    parents: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent >= 8:  # a description's continuation
            continue
        depth = indent // 2
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split()
        parents = parents[:depth]
        for name in names:
            entries["/".join([*parents, name]).rstrip("/")] = line
        if len(names) == 1 and names[0].endswith("/"):
            parents.append(names[0].rstrip("/"))
    return entries


def test_every_named_path_exists():
    missing = [f"{path}  ({line.strip()})" for path, line in layout_entries().items() if not (ROOT / path).exists()]
    assert not missing, "README layout names what the tree lacks:\n" + "\n".join(missing)


def test_every_library_and_application_module_is_named():
    named = set(layout_entries())
    unnamed = []
    for folder in ("mergeflow", "mergeflow/families", "mergeflow_app"):
        for child in sorted((ROOT / folder).iterdir()):
            if child.name.startswith(("_", ".")) or child.suffix not in ("", ".py") or child.name == "base.py":
                continue
            if child.is_dir() and not (child / "__init__.py").exists():
                continue
            if f"{folder}/{child.name}" not in named:
                unnamed.append(f"{folder}/{child.name}")
    assert not unnamed, "modules missing from the README layout:\n" + "\n".join(unnamed)


def test_no_module_outside_tests_exceeds_400_lines():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for folder in ("mergeflow", "mergeflow_app", "tasks", "flows")
            for path in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > 400]
    assert not long, "\n".join(long)
