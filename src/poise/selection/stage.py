"""The `poise select` stage: read the matrix (and pool), select, write the selection folder.

A folder written with other settings is refused (unless `overwrite`); the same settings again reuse
the existing result. Outputs: `selection.json`, `arguments.json`, and `selected.jsonl` with a pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from poise.attribution import load_matrix
from poise.config import SelectConfig, to_dict
from poise.errors import PoiseError
from poise.io import atomic_write_json, read_json
from poise.selection import (
    SELECTED_FILE,
    SELECTION_FILE,
    Selection,
    check_pool,
    read_selection,
    select,
    write_selection,
)

ARGUMENTS_FILE = "arguments.json"


def _settings(config: SelectConfig) -> dict[str, Any]:
    """The settings that determine the result, with paths made absolute."""
    settings = to_dict(config)
    settings.pop("overwrite")
    for key in ("attribution", "scores", "columns", "rows", "pool", "out"):
        if settings[key]:
            settings[key] = str(Path(settings[key]).resolve())
    return settings


def run_select(config: SelectConfig, progress=None) -> tuple[Selection, bool]:
    """Run the select stage. Returns (selection, reused) where reused means it was already complete."""
    if not config.out:
        raise PoiseError("--out DIR is required")
    out = Path(config.out)
    settings = _settings(config)
    if (out / SELECTION_FILE).exists() and not config.overwrite:
        previous = read_json(out / SELECTION_FILE).get("arguments", {}).get("settings")
        if previous != settings:
            differing = sorted(
                k for k in set(settings) | set(previous or {}) if (previous or {}).get(k) != settings.get(k)
            )
            raise PoiseError(
                f"{out}: already holds a selection made with other settings "
                f"({', '.join(differing) or 'unknown'}); choose another --out or pass --overwrite"
            )
        if not config.pool or (out / SELECTED_FILE).exists():
            return read_selection(out), True
    matrix = load_matrix(config)
    pool_lines = check_pool(config.pool, matrix) if config.pool else None
    selection = select(
        matrix,
        method=config.method,
        budget=config.budget,
        seed=config.seed,
        normalize=config.normalize,
        tasks=config.tasks,
        progress=progress,
        label=config.label,
    )
    selection.arguments["settings"] = settings
    write_selection(selection, out, pool_lines)
    atomic_write_json(out / ARGUMENTS_FILE, selection.arguments)
    return selection, False
