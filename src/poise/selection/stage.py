"""The `poise select` stage: read the matrix (and pool), select, write the selection folder.

The folder is opened through poise.provenance: one made with other settings is refused (unless `overwrite`),
and a complete one with the same settings is reused. Outputs: `selection.json` (with the settings and the
folder recorded, for the report), `selected.jsonl` with a pool, and provenance's `arguments.json`.
With `stratify`, the strata (the value of that pool field in each row) are read from the pool and the random
draw takes equal shares per value.
"""

from __future__ import annotations

from poise.config import SelectConfig
from poise.errors import PoiseError
from poise.matrix import load_matrix
from poise.provenance import mark_complete, open_folder
from poise.selection import Selection, match_pool, pool_strata, read_selection, select, write_selection
from poise.selection.registry import METHODS, get_method


def check_stratify(config: SelectConfig) -> None:
    """`stratify` needs a method that draws at random (random) and a pool to read the field from."""
    if config.stratify is None:
        return
    if not config.stratify.strip():
        raise PoiseError("--stratify: expected the name of a pool field (e.g. dataset), got an empty name")
    if get_method(config.method).uses_scores:
        drawn = ", ".join(name for name, method in METHODS.items() if not method.uses_scores)
        raise PoiseError(f"--stratify {config.stratify}: only with a method that draws at random (--method "
                         f"{drawn}), not --method {config.method}")
    if not config.pool:
        raise PoiseError(f"--stratify {config.stratify}: needs --pool (the pool JSONL whose rows hold the field)")


def run_select(config: SelectConfig, progress=None) -> tuple[Selection, bool]:
    """Run the select stage. Returns (selection, reused) where reused means it was already complete."""
    check_stratify(config)
    matrix = load_matrix(config)  # the inputs first: an error in them leaves no folder behind
    pool_lines, numbers = match_pool(config.pool, matrix) if config.pool else (None, None)
    strata = pool_strata(config.pool, pool_lines, config.stratify, numbers) \
        if config.stratify and config.pool and pool_lines is not None else None
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
        strata=strata,
        stratify=config.stratify,
    )
    selection.arguments["settings"] = {**opened.settings, "out": str(out.resolve())}
    write_selection(selection, out, pool_lines)
    mark_complete(out)
    return selection, False
