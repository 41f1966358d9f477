"""The downstream comparison: one row per evaluated run, one column per task, then the macro-average and
the worst task, in the layout of the BIDS paper's Table 2.

It reads `scores.json` files written by `poise evaluate` (per task and metric: value, stderr, direction) and
knows nothing of models or lm-eval. Per task one metric is shown: `metric` when the task has it, else the
task's first metric. The best run of each column is bold (and the second underlined in HTML); "best" follows
the metric's direction (lower for `nll`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.evaluate import LOWER_IS_BETTER
from poise.io import read_json

SCORES_FILE = "scores.json"


@dataclass
class DownstreamTable:
    """Rows (runs) x columns (tasks, then macro-average and worst); None where a run lacks a task."""

    runs: list[str]
    columns: list[str]  # "task (metric)", then "macro-average", "worst"
    values: list[list[float | None]]
    higher_is_better: list[bool | None]  # per column; None when a summary mixes directions


def is_evaluation(folder: str | Path) -> bool:
    return (Path(folder) / SCORES_FILE).is_file()


def read_evaluation(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / SCORES_FILE
    if not path.is_file():
        raise PoiseError(f"{folder}: not an evaluation folder (no {SCORES_FILE}; written by poise evaluate)")
    data = read_json(path)
    if not isinstance(data.get("scores"), dict) or not data["scores"]:
        raise PoiseError(f"{path}: no scores")
    return data


def downstream_table(evaluations: Sequence[dict[str, Any]], metric: str = "nll",
                     labels: Sequence[str] | None = None) -> DownstreamTable:
    """The comparison table of several `scores.json` contents (tasks in order of first appearance)."""
    tasks = list(dict.fromkeys(task for e in evaluations for task in e["scores"]))
    chosen: dict[str, str] = {}
    for task in tasks:
        metrics = list(dict.fromkeys(m for e in evaluations for m in e["scores"].get(task, {})))
        chosen[task] = metric if metric in metrics else metrics[0]
    runs = list(labels) if labels else [str(e.get("label") or f"run {k + 1}") for k, e in enumerate(evaluations)]
    directions: list[bool | None] = []
    for task in tasks:
        flags = {e["scores"][task][chosen[task]].get("higher_is_better", chosen[task] not in LOWER_IS_BETTER)
                 for e in evaluations if chosen[task] in e["scores"].get(task, {})}
        directions.append(flags.pop() if len(flags) == 1 else None)
    summary_direction = directions[0] if len(set(directions)) == 1 else None
    values = []
    for e in evaluations:
        row = [(e["scores"].get(task, {}).get(chosen[task]) or {}).get("value") for task in tasks]
        present = [v for v in row if v is not None]
        complete = len(present) == len(row) and summary_direction is not None
        macro = sum(present) / len(present) if complete else None
        worst = (min(present) if summary_direction else max(present)) if complete else None
        values.append([*row, macro, worst])
    columns = [f"{task} ({chosen[task]})" for task in tasks] + ["macro-average", "worst"]
    return DownstreamTable(runs, columns, values, [*directions, summary_direction, summary_direction])


def ranks(table: DownstreamTable) -> list[list[int | None]]:
    """Per cell: 1 for the best run of its column, 2 for the second, else None (ties share a rank)."""
    out: list[list[int | None]] = [[None] * len(table.columns) for _ in table.runs]
    for j, higher in enumerate(table.higher_is_better):
        column = [row[j] for row in table.values]
        distinct = sorted({v for v in column if v is not None}, reverse=bool(higher))
        if higher is None or len(table.runs) < 2:
            continue
        for i, value in enumerate(column):
            if value is not None and value in distinct[:2]:
                out[i][j] = distinct.index(value) + 1
    return out


def print_downstream(table: DownstreamTable, console: Any) -> None:
    from rich.table import Table

    grid = Table(title="Downstream: one row per run (best per column in bold; nll: lower is better)")
    grid.add_column("run")
    for column in table.columns:
        grid.add_column(column, justify="right")
    marks = ranks(table)
    for run, row, mark in zip(table.runs, table.values, marks, strict=True):
        cells = ["–" if v is None else (f"[bold]{v:.4f}[/bold]" if m == 1 else f"{v:.4f}")
                 for v, m in zip(row, mark, strict=True)]
        grid.add_row(run, *cells)
    console.print(grid)


def downstream_html(table: DownstreamTable) -> str:
    """The table as HTML: best per column bold, second underlined."""
    from poise.report.html import esc

    marks = ranks(table)
    head = "".join(f"<th>{esc(c)}</th>" for c in ["run", *table.columns])
    body = []
    for run, row, mark in zip(table.runs, table.values, marks, strict=True):
        cells = []
        for value, rank in zip(row, mark, strict=True):
            text = "–" if value is None else f"{value:.4f}"
            if rank == 1:
                text = f"<b>{text}</b>"
            elif rank == 2:
                text = f"<u>{text}</u>"
            cells.append(f'<td class="num">{text}</td>')
        body.append(f"<tr><td>{esc(run)}</td>{''.join(cells)}</tr>")
    return f'<table class="downstream"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


DOWNSTREAM_CAPTION = ("One row per evaluated run, one column per task (its metric in brackets), then the mean over "
                      "tasks and the worst task. Best per column in bold, second underlined; for nll lower is better.")


def downstream_page(title: str, table: DownstreamTable) -> str:
    """A whole HTML page holding only the downstream table (a report on evaluations alone)."""
    from poise.report.html import _CSS, esc

    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><main><h1>{esc(title)}</h1><h2>Downstream results</h2>"
            f'<p class="caption">{esc(DOWNSTREAM_CAPTION)}</p>{downstream_html(table)}</main></body></html>')
