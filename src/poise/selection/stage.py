"""The `poise select` stage: read the matrix (and pool), select, write the selection folder.

The folder is opened through poise.provenance: one made with other settings is refused (unless `overwrite`),
and a complete one with the same settings is reused. Outputs: `selection.json` (with the settings and the
folder recorded, for the report), `selected.jsonl` with a pool, and provenance's `arguments.json`.
"""

from __future__ import annotations

from poise.config import SelectConfig
from poise.matrix import load_matrix
from poise.provenance import mark_complete, open_folder
from poise.selection import Selection, check_pool, read_selection, select, write_selection


def run_select(config: SelectConfig, progress=None) -> tuple[Selection, bool]:
    """Run the select stage. Returns (selection, reused) where reused means it was already complete."""
    matrix = load_matrix(config)  # the inputs first: an error in them leaves no folder behind
    pool_lines = check_pool(config.pool, matrix) if config.pool else None
    opened = open_folder(config.out, "select", config)
    out = opened.folder
    if opened.complete:
        return read_selection(out), True
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
    selection.arguments["settings"] = {**opened.settings, "out": str(out.resolve())}
    write_selection(selection, out, pool_lines)
    mark_complete(out)
    return selection, False
