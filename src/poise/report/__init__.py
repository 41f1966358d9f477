"""Reports on selections: PNG figures, one self-contained HTML page, and a terminal summary table.

`build_report(matrix, selections, out_dir)` writes, for every selection, its normalised AID per task
(`aid_<slug>.png`) and its task-wise and instance-wise THI (`thi_<slug>.png`); across selections
`aid_comparison.png`, `thi_comparison.png`, `coverage.png` and, for two or more, `overlap.png`; and
`report.html`, which shows them with a per-task summary table and the selections' settings.
`print_summary` prints the same per-task table to a terminal with rich.

The numbers come from `poise.analysis` (BIDS paper Sections 3 and 6.2); this package only lays them
out. matplotlib is imported when a report is built, not by `print_summary`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poise import __version__
from poise.analysis import aid_by_task, coverage, overlap, profile, task_summary
from poise.attribution import AttributionMatrix, load_matrix
from poise.errors import PoiseError
from poise.io import atomic_write_bytes, atomic_write_text
from poise.selection import Selection, read_selection

if TYPE_CHECKING:
    from poise.config import ReportConfig

__all__ = [
    "REPORT_FILE", "build_report", "display_names", "print_summary", "run_report", "slugs", "summary_rows",
]

REPORT_FILE = "report.html"
#: Slugs that would make a per-selection file collide with a comparison figure (aid_comparison.png).
_RESERVED_SLUGS = frozenset({"comparison"})
_SLUG_MAX = 48


# ----------------------------------------------------------------------------------------- names
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
    """Each selection's label, made unique by appending ` #2`, ` #3`, ... to repeats."""
    return _unique([s.label for s in selections], set(), " #%d")


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:_SLUG_MAX].strip("-")
    return slug or "selection"


def slugs(names: Sequence[str]) -> list[str]:
    """Filesystem-safe ([a-z0-9-], lower case), unique file stems for the given names."""
    return _unique([_slug(name) for name in names], set(_RESERVED_SLUGS), "-%d")


# ------------------------------------------------------------------------------------- summaries
def _check(matrix: AttributionMatrix, selections: Sequence[Selection]) -> None:
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


def _rows_from(tasks: Sequence[str], summaries: Sequence[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
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
    _check(matrix, selections)
    return _rows_from(matrix.task_names, [task_summary(matrix, s) for s in selections])


def print_summary(matrix: AttributionMatrix, selections: Sequence[Selection], console: Any = None) -> None:
    """Print the summary as two rich tables, one row per selection and one column per task:
    the THI share (where the picks' influence goes) and the mean normalised influence (how much)."""
    from rich.console import Console
    from rich.table import Table

    from poise.report.html import format_ratio

    rows = summary_rows(matrix, selections)
    task_rows, macro = rows[:-1], rows[-1]
    names = display_names(selections)
    tasks = [row["task"] for row in task_rows]
    if console is None:
        console = Console()

    thi = Table(title="THI share: % of picks whose most influenced validation example is in the task",
                caption="balance = largest / smallest task share (1.00x = perfectly balanced)")
    infl = Table(title="Mean normalised influence of the selection on each task's validation examples")
    for table in (thi, infl):
        table.add_column("selection", style="bold", no_wrap=True)
        for task in tasks:
            table.add_column(task, justify="right")
    thi.add_column("balance", justify="right", style="bold")
    infl.add_column("macro", justify="right", style="bold")
    for k, name in enumerate(names):
        thi.add_row(name, *(f"{100 * row['thi'][k]:.0f}%" for row in task_rows), format_ratio(macro["thi"][k]))
        infl.add_row(name, *(f"{row['influence'][k]:.2f}" for row in task_rows), f"{macro['influence'][k]:.2f}")
    for table in (thi, infl):
        width: int | None = None
        if not console.is_terminal:
            # a pipe or log file has no width limit: print whole cells rather than squeeze them to 80 columns
            natural = sum(
                max([len(str(c.header))] + [len(str(cell)) for cell in c._cells]) + 3 for c in table.columns
            )
            width = max(console.width, natural + 1, len(str(table.title or "")))
        previous = console.width
        if width is not None:
            console.width = width  # console.print(width=...) cannot exceed the console's own width
        try:
            console.print(table)
        finally:
            console.width = previous


# ---------------------------------------------------------------------------------------- report
def _selection_row(name: str, slug: str, selection: Selection) -> list[str]:
    picks = len(selection.indices)
    tasks = selection.arguments.get("tasks")
    return [
        name,
        selection.method,
        str(selection.budget),
        f"{picks:,}",
        f"{selection.n_pool:,}",
        f"{100 * picks / max(1, selection.n_pool):.1f}%",
        "yes" if selection.normalize else "no",
        str(selection.arguments.get("seed", "")),
        ", ".join(map(str, tasks)) if tasks else "all",
        slug,
    ]


def build_report(
    matrix: AttributionMatrix,
    selections: list[Selection],
    out_dir: str | os.PathLike,
    title: str = "poise selection report",
    embed_images: bool = False,
) -> Path:
    """Write the figures and `report.html` for `selections` of `matrix` into `out_dir`; return the page.

    The PNGs are always written; with `embed_images` the page carries them as base64 data URIs
    (a single file to share) instead of referring to them by name. Files are written atomically.
    Files of an earlier report in `out_dir` that this one does not produce are left in place.
    """
    from poise.report import plots
    from poise.report.html import (
        AID_CAPTION,
        COVERAGE_CAPTION,
        OVERLAP_CAPTION,
        THI_CAPTION,
        Image,
        Section,
        render_page,
    )

    _check(matrix, selections)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = display_names(selections)
    stems = slugs(names)

    aids, thi_task, thi_instance, coverages, summaries = [], [], [], [], []
    for selection in selections:  # two passes over each selection's rows: profile, then coverage
        prof = profile(matrix, selection.indices, normalized=True)
        aids.append(aid_by_task(matrix, prof.aid))
        thi_task.append(prof.thi_task)
        thi_instance.append(prof.thi_instance)
        summaries.append(prof.summary(matrix))
        coverages.append(coverage(matrix, selection.indices, normalized=True))

    def image(filename: str, png: bytes, alt: str, caption: str = "") -> Image:
        atomic_write_bytes(out / filename, png)
        return Image(filename=filename, png=png, alt=alt, caption=caption)

    aid_images = [image("aid_comparison.png", plots.aid_comparison_plot(names, aids),
                        "normalised AID per task for every selection",
                        "Normalised AID per task, all selections side by side.")]
    thi_images = [image("thi_comparison.png", plots.thi_comparison_plot(names, thi_task, thi_instance),
                        "THI share per task for every selection",
                        "Share of picks per task, instance-wise (top) and task-wise (bottom).")]
    for name, stem, aid_s, task_s, inst_s in zip(names, stems, aids, thi_task, thi_instance, strict=True):
        aid_images.append(image(f"aid_{stem}.png", plots.aid_plot(aid_s, f"Normalised AID: {name}"),
                                f"normalised AID per task: {name}", f"{name}: normalised AID per task."))
        thi_images.append(image(f"thi_{stem}.png", plots.thi_plot(task_s, inst_s, f"THI: {name}"),
                                f"THI per task: {name}",
                                f"{name}: picks per top task (labels: share of all picks)."))
    sections = [
        Section("Average Influence Distribution (AID)", AID_CAPTION, aid_images),
        Section("Task frequency with Highest Influence (THI)", THI_CAPTION, thi_images),
        Section("Coverage as the selection grows", COVERAGE_CAPTION,
                [image("coverage.png", plots.coverage_plot(names, coverages),
                       "instance-wise THI share per task against the number of picks")]),
    ]
    if len(selections) >= 2:
        sections.append(
            Section("Overlap between selections", OVERLAP_CAPTION,
                    [image("overlap.png", plots.overlap_plot(names, overlap([s.indices for s in selections])),
                           "Jaccard similarity between the selections")])
        )

    meta = [
        ("matrix", matrix.source or "in memory"),
        ("shape", f"{matrix.n_rows:,} pool rows × {matrix.n_columns:,} validation examples"),
        ("kind", matrix.kind or "unknown"),
        ("tasks", f"{len(matrix.task_names)}"),
        ("poise", __version__),
    ]
    header = ["selection", "method", "budget", "picks", "pool", "of pool", "normalised", "seed", "tasks",
              "file stem"]
    page = render_page(
        title=title,
        meta=meta,
        selection_header=header,
        selection_rows=[_selection_row(n, s, sel) for n, s, sel in zip(names, stems, selections, strict=True)],
        names=names,
        summary=_rows_from(matrix.task_names, summaries),
        sections=sections,
        embed_images=embed_images,
    )
    path = out / REPORT_FILE
    atomic_write_text(path, page)
    return path


def _matrix_of(selection: Selection, config: ReportConfig) -> ReportConfig:
    """The report config completed with the matrix recorded in a selection's settings."""
    import dataclasses

    settings = selection.arguments.get("settings") or {}
    if not (settings.get("attribution") or settings.get("scores")):
        raise PoiseError(
            "the selection does not record its matrix; give --attribution DIR or --scores FILE --columns FILE"
        )
    if settings.get("method") == "rds":
        raise PoiseError(
            "the first selection was made on an RDS similarity matrix; give the influence matrix to report "
            "on with --attribution DIR or --scores FILE --columns FILE"
        )
    return dataclasses.replace(
        config, **{key: settings.get(key) for key in ("attribution", "scores", "columns", "rows")}
    )


def run_report(config: ReportConfig, console: Any = None) -> Path:
    """The `poise report` stage: load the matrix and the selection folders, build the report, and
    print the summary tables to `console` when one is given."""
    if not config.out:
        raise PoiseError("--out DIR is required")
    if not config.selections:
        raise PoiseError("name at least one selection folder written by `poise select`")
    selections = [read_selection(path) for path in config.selections]
    if not (config.attribution or config.scores):
        config = _matrix_of(selections[0], config)
    matrix = load_matrix(config)
    path = build_report(matrix, selections, config.out, title=config.title, embed_images=config.embed_images)
    if console is not None:
        print_summary(matrix, selections, console=console)
    return path
