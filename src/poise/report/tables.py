"""Terminal tables (rich, imported when printing): the selections' per-task comparison (`print_summary`),
a run's comparison and downstream tables (`print_run_summary`), and one evaluation's scores
(`print_scores`, what `poise evaluate` prints). The numbers come from `comparison.py` and `downstream.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from poise.matrix import AttributionMatrix
from poise.report.comparison import display_names, summary_rows
from poise.report.downstream import downstream_table, downstream_tables, print_downstream, print_table, worst_task
from poise.report.html import DASH, format_ratio
from poise.selection import Selection


def _console(console: Any) -> Any:
    if console is None:
        from rich.console import Console

        console = Console()
    return console


def print_summary(matrix: AttributionMatrix, selections: Sequence[Selection], console: Any = None) -> None:
    """Print the summary as two rich tables, one row per selection and one column per task:
    the THI share (where the picks' influence goes) and the mean normalised influence (how much)."""
    from rich.table import Table

    rows = summary_rows(matrix, selections)
    task_rows, macro = rows[:-1], rows[-1]
    names = display_names(selections)
    tasks = [row["task"] for row in task_rows]
    console = _console(console)

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
        print_table(table, console)


def print_run_summary(
    matrix: AttributionMatrix | None,
    selections: Sequence[Selection],
    evaluations: Sequence[dict[str, Any]] = (),
    metric: str = "nll",
    console: Any = None,
) -> None:
    """Print a run's comparison with rich: the selections' per-task tables (THI share and mean
    normalised influence; `print_summary`) when there are a matrix and selections, then the downstream
    tables of `evaluations` (the contents of `scores.json` files, `downstream.read_evaluation`; the
    `metric` table first, then exact match when reported), each with its one-sentence reading."""
    console = _console(console)
    if matrix is not None and selections:
        print_summary(matrix, selections, console=console)
    if evaluations:
        for table in downstream_tables(evaluations, metric=metric):
            print_downstream(table, console)


def _value(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return DASH
    stderr = entry.get("stderr")
    return f"{entry['value']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def print_scores(scores: dict[str, Any], console: Any = None) -> None:
    """One evaluation (a `scores.json`'s contents) as a table: one row per task with every metric it reports
    (value ± stderr), then per metric the macro-average and the worst task, as the downstream table computes
    them over the tasks that report the metric (worst follows the metric's direction; a dash where a task's
    value is missing)."""
    from rich.table import Table

    per_task: dict[str, dict[str, Any]] = scores["scores"]
    metrics = list(dict.fromkeys(m for values in per_task.values() for m in values))
    table = Table(title=f"{scores.get('label')}: {scores.get('model')}")
    table.add_column("task")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for task, values in per_task.items():
        table.add_row(task, *[_value(values.get(m)) for m in metrics])
    macro_cells, worst_cells = [], []
    for metric in metrics:
        reported = {"scores": {task: {metric: values[metric]} for task, values in per_task.items() if metric in values}}
        summary = downstream_table([reported], metric)
        macro, worst = summary.values[0][-2], summary.values[0][-1]
        macro_cells.append(DASH if macro is None else f"{macro:.4f}")
        worst_cells.append(DASH if worst is None else f"{worst:.4f} ({worst_task(summary, 0)})")
    table.add_row("macro-average", *macro_cells, style="bold")
    table.add_row("worst", *worst_cells, style="bold")
    print_table(table, _console(console))
