"""The layers of docs/design.md §7, enforced: a module imports only modules of its own layer or below.

The imports are read from the source (ast, every `import` and `from ... import`, function-level ones too), so
the next upward import fails here. Nothing inside the package imports the package root (`poise`), whose
`__init__` only re-exports the public API.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "poise"

LAYERS: list[set[str]] = [
    {"version", "files", "options", "errors", "io", "config", "distributed", "progress", "provenance", "faults"},
    {"data", "matrix"},
    {"model", "lora"},
    {"losses", "checkpoint"},
    {"train", "warmup", "hf_import", "features"},
    {"attribution"},
    {"selection"},
    {"analysis", "synthetic"},
    {"evaluate"},
    {"report"},
    {"pipeline", "demo"},
    {"cli", "__main__"},
]
"""Lowest first. A package (data/, features/, selection/, report/) is one unit: its modules share its layer."""


def layer_of(module: str) -> int:
    """The layer of `poise.<unit>...` (the unit is the first name after `poise`)."""
    unit = module.split(".")[1]
    for level, names in enumerate(LAYERS):
        if unit in names:
            return level
    raise AssertionError(f"poise.{unit} is in no layer of tests/test_layers.py (add it where docs/design.md says)")


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, imported poise module) for every import in the file; `from poise import x` is `poise.x`."""
    found = []
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "poise"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base == "poise":
                found += [(node.lineno, f"poise.{alias.name}") for alias in node.names]
            elif base.startswith("poise."):
                found.append((node.lineno, base))
    return found


def violations(root: Path = SRC) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        if name == "poise":
            continue  # the package root: the public API, may import anything
        own = layer_of(name)
        for line, target in imports(path, root):
            if target == "poise":
                out.append(f"{path.relative_to(root.parent)}:{line}: imports the package root")
            elif layer_of(target) > own:
                out.append(f"{path.relative_to(root.parent)}:{line}: {name} (layer {own}) imports {target} "
                           f"(layer {layer_of(target)})")
    return out


def test_no_module_imports_a_higher_layer() -> None:
    assert sum(len(imports(p)) for p in SRC.rglob("*.py")) > 100  # the reader sees the imports
    assert violations() == []


def test_the_check_fails_on_an_upward_import(tmp_path) -> None:
    """A copy of the package with one upward import (selection importing the pipeline) is caught."""
    import shutil

    copy = tmp_path / "poise"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    rules = copy / "selection" / "rules.py"
    rules.write_text(rules.read_text() + "\n\ndef _oops():\n    from poise.pipeline import run\n    return run\n")
    found = violations(copy)
    assert len(found) == 1 and "poise.selection.rules (layer 6) imports poise.pipeline (layer 10)" in found[0]
