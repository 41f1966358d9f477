"""The per-task comparison of selections as numbers: which matrix they are compared on, each selection's
name, and per task its THI share and mean normalised influence (BIDS paper Sections 3 and 6.2, computed by
`poise.analysis`). The page (`page.py`) and the terminal tables (`tables.py`) both lay out these rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from poise.analysis import task_summary
from poise.errors import PoiseError
from poise.matrix import AttributionMatrix
from poise.selection import Selection


def _unique(bases: Sequence[str], taken: set[str], suffix: str) -> list[str]:
    """Each base, made unique against `taken` and earlier results by appending suffix % k (k = 2, 3...)."""
    out: list[str] = []
    for base in bases:
        name, k = base, 1
        while name in taken:
            k += 1
            name = base + suffix % k
        taken.add(name)
        out.append(name)
    return out


def display_names(selections: Sequence[Selection]) -> list[str]:
    """Each selection's label; where a label repeats, what tells its selections apart (the number of picks, the
    seed of a random draw) is added, e.g. `task-max (40 picks)`, `random (60 picks, seed 2)`, and what is still
    alike is made unique by appending ` #2`, ` #3`, ..."""
    labels = [s.label for s in selections]
    bases = []
    for selection, label in zip(selections, labels, strict=True):
        alike = [t for t, other in zip(selections, labels, strict=True) if other == label]
        parts = []
        if len({len(t.indices) for t in alike}) > 1:
            parts.append(f"{len(selection.indices)} picks")
        if len({t.arguments.get("seed") for t in alike}) > 1 and selection.arguments.get("seed") is not None:
            parts.append(f"seed {selection.arguments['seed']}")
        bases.append(f"{label} ({', '.join(parts)})" if parts else label)
    return _unique(bases, set(), " #%d")


def check_selections(matrix: AttributionMatrix, selections: Sequence[Selection]) -> None:
    """Some selections, each with picks, each made on a pool of the matrix's size."""
    if not selections:
        raise PoiseError("no selections to report on")
    for name, selection in zip(display_names(selections), selections, strict=True):
        if selection.n_pool != matrix.n_rows:
            raise PoiseError(
                f"selection {name!r} was made on a pool of {selection.n_pool} rows, "
                f"but the matrix has {matrix.n_rows} rows"
            )
        if len(selection.indices) == 0:
            raise PoiseError(f"selection {name!r} has no picks")


def rows_from(tasks: Sequence[str], summaries: Sequence[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """`summary_rows` from each selection's `task_summary` (or `Profile.summary`)."""
    rows: list[dict[str, Any]] = [
        {
            "task": task,
            "macro": False,
            "influence": [s[task]["mean_normalized_influence"] for s in summaries],
            "thi": [s[task]["thi_share"] for s in summaries],
        }
        for task in tasks
    ]
    ratios = []
    for s in summaries:
        shares = [s[task]["thi_share"] for task in tasks]
        low, high = min(shares), max(shares)
        ratios.append(high / low if low > 0 else math.inf)
    rows.append(
        {
            "task": "macro",
            "macro": True,
            "influence": [float(np.mean([s[task]["mean_normalized_influence"] for task in tasks]))
                          for s in summaries],
            "thi": ratios,
        }
    )
    return rows


def summary_rows(matrix: AttributionMatrix, selections: Sequence[Selection]) -> list[dict[str, Any]]:
    """The per-task summary table as data: one dict per task, then one "macro" dict.

    Each dict has "task", "macro" (bool), "influence" and "thi", the last two one value per selection
    (in the given order). For a task: mean normalised influence of the picks on its validation
    columns, and its instance-wise THI share (0..1). For the macro row: the mean of the task
    influences, and the largest task THI share divided by the smallest (1.0 = perfectly balanced,
    inf when some task is never the top task).
    """
    check_selections(matrix, selections)
    return rows_from(matrix.task_names, [task_summary(matrix, s) for s in selections])


def with_recorded_matrix(selection: Selection, config: Any) -> Any:
    """`config` (a `MatrixConfig`) completed with the matrix recorded in a selection's settings."""
    settings = selection.arguments.get("settings") or {}
    if not (settings.get("attribution") or settings.get("scores")):
        raise PoiseError(
            "the selection does not record its matrix; give --attribution DIR or --scores FILE --columns FILE"
        )
    if settings.get("method") in ("rds", "rds+"):
        raise PoiseError(
            "the first selection was made on an RDS similarity matrix; give the influence matrix to report "
            "on with --attribution DIR or --scores FILE --columns FILE"
        )
    return dataclasses.replace(
        config, **{key: settings.get(key) for key in ("attribution", "scores", "columns", "rows")}
    )
