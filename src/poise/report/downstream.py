"""The downstream comparison: one row per evaluated run, one column per task, then the macro-average and
the worst task, in the layout of the BIDS paper's Table 2, with one sentence that says what the numbers show.

It reads `scores.json` files written by `poise evaluate` (per task and metric: value, stderr, direction) and
knows nothing of models or lm-eval. Per task one metric is shown: `metric` when the task has it, else the
task's first metric; `downstream_tables` adds a table for `nll` or `exact_match` when the evaluations report
that one too (poise's local tasks score both the answer's NLL and a greedy generation's exact match). The best run
of each column is bold (and the second underlined in HTML); "best" follows the metric's direction (lower for
`nll`). `describe` turns a table into one plain sentence computed from its numbers: which run has the best
macro-average and worst-capability score, where another run does better, and whether the top runs are tied
or apart by less than their standard error or 1%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.evaluate import LOWER_IS_BETTER
from poise.files import EVAL_SCORES_FILE as SCORES_FILE
from poise.io import read_json

#: Besides the chosen metric, a table is shown for each of these that the evaluations report (poise's
#: local tasks score the gold answer's NLL and a greedy generation's exact match).
PAIRED_METRICS = ("nll", "exact_match")
#: Two values equal at this many decimals (the table's precision) are a tie.
TIE_DECIMALS = 4
#: A gap below this fraction of the values is called small.
SMALL_GAP = 0.01
#: Per-capability exceptions named one by one up to this many; beyond, they are counted.
NAMED_EXCEPTIONS = 3
METRIC_NAMES = {"nll": "NLL", "exact_match": "exact match", "acc": "accuracy", "acc_norm": "accuracy (norm)"}


@dataclass
class DownstreamTable:
    """Rows (runs) x columns (tasks, then macro-average and worst); None where a run lacks a task."""

    runs: list[str]
    columns: list[str]  # "task (metric)", then "macro-average", "worst"
    values: list[list[float | None]]
    higher_is_better: list[bool | None]  # per column; None when a summary mixes directions
    tasks: list[str] = field(default_factory=list)  # the task of each task column
    metrics: list[str] = field(default_factory=list)  # the metric shown for each task column
    stderrs: list[list[float | None]] = field(default_factory=list)  # like values; None where unknown
    metric: str = ""  # the metric asked for


def is_evaluation(folder: str | Path) -> bool:
    return (Path(folder) / SCORES_FILE).is_file()


def read_evaluation(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / SCORES_FILE
    if not path.is_file():
        raise PoiseError(f"{folder}: not an evaluation folder (no {SCORES_FILE}; written by poise evaluate)")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict) or not data["scores"]:
        raise PoiseError(f"{path}: no scores")
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def macro_and_worst(values: Sequence[float], higher_is_better: bool) -> tuple[float, float]:
    """The mean over tasks and the worst task's value (the lowest when higher is better, else the highest)."""
    return sum(values) / len(values), (min(values) if higher_is_better else max(values))


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
    values, stderrs = [], []
    for e in evaluations:
        cells = [e["scores"].get(task, {}).get(chosen[task]) or {} for task in tasks]
        row = [_number(c.get("value")) for c in cells]
        errors = [_number(c.get("stderr")) for c in cells]
        present = [v for v in row if v is not None]
        complete = len(present) == len(row) and summary_direction is not None
        macro, worst = macro_and_worst(present, bool(summary_direction)) if complete else (None, None)
        macro_se = worst_se = None
        if complete:
            if all(s is not None for s in errors):
                macro_se = math.sqrt(sum(s * s for s in errors)) / len(errors)  # type: ignore[operator]
            worst_se = errors[row.index(worst)]
        values.append([*row, macro, worst])
        stderrs.append([*errors, macro_se, worst_se])
    columns = [f"{task} ({chosen[task]})" for task in tasks] + ["macro-average", "worst"]
    return DownstreamTable(runs, columns, values, [*directions, summary_direction, summary_direction],
                           tasks=tasks, metrics=[chosen[t] for t in tasks], stderrs=stderrs, metric=metric)


def downstream_tables(evaluations: Sequence[dict[str, Any]], metric: str = "nll",
                      labels: Sequence[str] | None = None) -> list[DownstreamTable]:
    """The table of `metric`, then one per other metric of `PAIRED_METRICS` ("nll", "exact_match") that
    some task reports and whose table shows other columns than the tables before it."""
    tables = [downstream_table(evaluations, metric, labels)]
    for other in PAIRED_METRICS:
        if other == metric or not any(other in e["scores"].get(t, {}) for e in evaluations for t in tables[0].tasks):
            continue
        table = downstream_table(evaluations, other, labels)
        if all(table.columns != t.columns for t in tables):
            tables.append(table)
    return tables


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


# ------------------------------------------------------------------------------------ the sentence
def metric_label(table: DownstreamTable) -> str:
    """What the task columns measure: "NLL", "exact match", ... or "score" when the tasks differ."""
    metrics = set(table.metrics) or {table.metric}
    if len(metrics) != 1:
        return "score"
    name = metrics.pop()
    return METRIC_NAMES.get(name, name)


def direction_text(higher: bool | None) -> str:
    return {True: "higher is better", False: "lower is better"}.get(higher, "the tasks' directions differ")  # type: ignore[arg-type]


def _same(a: float, b: float) -> bool:
    return round(a, TIE_DECIMALS) == round(b, TIE_DECIMALS)


def _leaders(values: Sequence[float | None], higher: bool) -> list[int]:
    """The indices of the best value (all of them when tied at the table's precision)."""
    present = [v for v in values if v is not None]
    if not present:
        return []
    best = max(present) if higher else min(present)
    return [i for i, v in enumerate(values) if v is not None and _same(v, best)]


def _fmt(*values: float) -> list[str]:
    """The values with 3 decimals, or 4 where 3 would show two of them as equal."""
    texts = [f"{v:.3f}" for v in values]
    if len(set(texts)) < len(texts):
        texts = [f"{v:.4f}" for v in values]
    return texts


#: Beyond this many runs a sentence names the first few and the count (a 52-run study ties everywhere on 0).
MAX_NAMES = 5


def _names(names: Sequence[str]) -> str:
    names = list(names)
    if len(names) > MAX_NAMES:
        return f"{len(names)} runs ({', '.join(names[:3])}, ...)"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _verb(names: Sequence[str]) -> str:
    return "has" if len(names) == 1 else "have"


def describe(table: DownstreamTable) -> str:
    """One plain sentence on what the table shows, computed from its numbers only.

    Which run has the best macro-average (against the next best), whether it also has the best
    worst-capability score, and on which capabilities another run does better; the top runs are
    called tied when equal at the table's precision, and a gap smaller than the standard error or
    than 1% is said to be so. "Best" follows the metric's direction.
    """
    runs, n_tasks = table.runs, len(table.columns) - 2
    tasks = table.tasks or [c.rsplit(" (", 1)[0] for c in table.columns[:n_tasks]]
    if not runs or n_tasks <= 0:
        return ""
    higher = table.higher_is_better[-2]
    label = metric_label(table)
    if higher is None:
        per_task = _per_task(table, tasks, range(len(runs)))
        return (f"The capabilities' metrics point in different directions, so there is no macro-average; "
                f"the best run per capability: {per_task}.")
    macro = [row[-2] for row in table.values]
    worst = [row[-1] for row in table.values]
    valid = [i for i, v in enumerate(macro) if v is not None]
    if not valid:
        return "No run has a score on every capability, so there is no macro-average to compare."
    left_out = [runs[i] for i in range(len(runs)) if i not in valid]
    note = (f"; {_names(left_out)} {'lacks' if len(left_out) == 1 else 'lack'} some capabilities and "
            f"{'is' if len(left_out) == 1 else 'are'} left out of the averages") if left_out else ""
    direction = direction_text(higher)
    if len(valid) == 1:
        i = valid[0]
        w_task = _worst_task(table, i, tasks)
        who = f"Only {runs[i]} has a score on every capability" if left_out else f"Only {runs[i]} was evaluated"
        return (f"{who}: macro-average {label} {_fmt(macro[i])[0]} ({direction}), "
                f"worst capability {w_task} ({_fmt(worst[i])[0]}).")

    order = sorted(valid, key=lambda i: macro[i], reverse=higher)  # type: ignore[arg-type,return-value]
    top = [i for i in order if _same(macro[i], macro[order[0]])]  # type: ignore[arg-type]
    worst_top = _leaders([worst[i] if i in valid else None for i in range(len(runs))], higher)
    if len(top) > 1:
        rest = [i for i in order if i not in top]
        sentence = f"{_names([runs[i] for i in top])} tie on the macro-average ({label} {_fmt(macro[top[0]])[0]}"
        if rest:
            sentence += f" vs {_fmt(macro[rest[0]])[0]} for {runs[rest[0]]}"
        sentence += f"; {direction})"
        sentence += f"; {_names([runs[i] for i in worst_top])} {_verb(worst_top)} the best worst-capability score " \
                    f"({_fmt(worst[worst_top[0]])[0]}{_worst_where(table, worst_top, tasks)})"
        if n_tasks > 1:
            sentence += f"; the best run per capability: {_per_task(table, tasks, valid)}"
        return "The ranking is tied: " + sentence + note + "."

    best, second = order[0], order[1]
    a, b = _fmt(macro[best], macro[second])  # type: ignore[arg-type]
    sentence = f"{runs[best]} has the best macro-average ({label} {a} vs {b} for {runs[second]}; {direction})"
    gap = abs(macro[best] - macro[second])  # type: ignore[operator]
    se_best, se_second = table.stderrs[best][-2] if table.stderrs else None, \
        table.stderrs[second][-2] if table.stderrs else None
    close = False
    if se_best is not None and se_second is not None and gap < math.hypot(se_best, se_second):
        sentence += (f", but the gap ({gap:.3g}) is smaller than their combined standard error "
                     f"(±{math.hypot(se_best, se_second):.2g}), so it may be noise")
        close = True
    elif gap < SMALL_GAP * max(abs(macro[best]), abs(macro[second])):  # type: ignore[arg-type]
        sentence += f", but the gap is small (under {100 * SMALL_GAP:.0f}%)"
        close = True

    mixed = False
    w_best = _worst_task(table, best, tasks)
    stated = None
    if best in worst_top:
        others = [runs[i] for i in worst_top if i != best]
        tied = f", tied with {_names(others)}" if others else ""
        sentence += "; it also has" if close else " and"
        sentence += f" the best worst-capability score ({_fmt(worst[best])[0]} on {w_best}{tied})"  # type: ignore[arg-type]
    else:
        x, y = _fmt(worst[worst_top[0]], worst[best])  # type: ignore[arg-type]
        sentence += "; " if close else ", but "
        sentence += (f"{_names([runs[i] for i in worst_top])} {_verb(worst_top)} the best worst-capability score "
                     f"({x}{_worst_where(table, worst_top, tasks)} vs {y} on {w_best} for {runs[best]})")
        stated = {(_worst_task(table, i, tasks), i) for i in worst_top}
        mixed = True

    exceptions, tied_tasks = [], 0
    for j, task in enumerate(tasks):
        column = [row[j] for row in table.values]
        leaders = _leaders(column, higher)
        if leaders and best not in leaders and column[best] is not None:
            exceptions.append((task, leaders, column))
        elif len(leaders) > 1:
            tied_tasks += 1
    unsaid = [e for e in exceptions if not (stated and all((e[0], i) in stated for i in e[1]))]
    if n_tasks > 1 and not exceptions:
        sentence += f"; it is {'best or tied' if tied_tasks else 'best'} on every capability"
    elif len(unsaid) <= NAMED_EXCEPTIONS:
        parts = []
        for task, leaders, column in unsaid:
            x, y = _fmt(column[leaders[0]], column[best])  # type: ignore[arg-type]
            parts.append(f"on {task} {_names([runs[i] for i in leaders])} {'is' if len(leaders) == 1 else 'are'} "
                         f"better ({x} vs {y})")
        if parts:
            sentence += "; " + ", ".join(parts)
    else:
        sentence += (f"; other runs are better on {len(exceptions)} of {n_tasks} capabilities "
                     f"({', '.join(task for task, _, _ in exceptions)})")
    if 2 * len(exceptions) > n_tasks:
        mixed = True
    return ("The ranking is mixed: " if mixed else "") + sentence + note + "."


def _worst_where(table: DownstreamTable, runs: Sequence[int], tasks: Sequence[str]) -> str:
    """" on <task>" when the runs' worst capability is the same task, else " on " per run."""
    where = [_worst_task(table, i, tasks) for i in runs]
    if len(set(where)) == 1:
        return f" on {where[0]}"
    return ": " + ", ".join(f"{table.runs[i]} on {task}" for i, task in zip(runs, where, strict=True))


def worst_task(table: DownstreamTable, run: int) -> str:
    """The task of the run's worst-capability value ("?" when it has none)."""
    return _worst_task(table, run, table.tasks or [c.rsplit(" (", 1)[0] for c in table.columns[:-2]])


def _worst_task(table: DownstreamTable, i: int, tasks: Sequence[str]) -> str:
    """The task of run i's worst-capability value."""
    n = len(tasks)
    row = table.values[i]
    for j in range(n):
        if row[j] is not None and row[-1] is not None and row[j] == row[-1]:
            return tasks[j]
    return "?"


def _per_task(table: DownstreamTable, tasks: Sequence[str], runs: Sequence[int]) -> str:
    parts = []
    for j, task in enumerate(tasks):
        higher = table.higher_is_better[j]
        column = [table.values[i][j] if i in runs else None for i in range(len(table.runs))]
        leaders = _leaders(column, bool(higher)) if higher is not None else []
        parts.append(f"{_names([table.runs[i] for i in leaders])} on {task}" if leaders else f"none on {task}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------- output
def table_title(table: DownstreamTable) -> str:
    return f"{metric_label(table)} ({direction_text(table.higher_is_better[-2])})"


def print_downstream(table: DownstreamTable, console: Any) -> None:
    """The table with rich (best per column in bold), then its sentence."""
    from rich.table import Table

    grid = Table(title=f"Downstream, {table_title(table)}: one row per run, best per column in bold")
    grid.add_column("run")
    for column in table.columns:
        grid.add_column(column, justify="right")
    marks = ranks(table)
    for run, row, mark in zip(table.runs, table.values, marks, strict=True):
        cells = ["–" if v is None else (f"[bold]{v:.4f}[/bold]" if m == 1 else f"{v:.4f}")
                 for v, m in zip(row, mark, strict=True)]
        grid.add_row(run, *cells)
    print_table(grid, console)
    sentence = describe(table)
    if sentence:
        console.print(sentence, markup=False, highlight=False)


def print_table(table: Any, console: Any) -> None:
    """Print a rich table; to a pipe or log file (no width limit) whole cells rather than cells squeezed
    to the console's 80 columns."""
    width: int | None = None
    if not console.is_terminal:
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


def downstream_html(table: DownstreamTable) -> str:
    """The table as HTML: best per column bold, second underlined."""
    from poise.report.html import esc

    marks = ranks(table)
    head = '<th class="name">run</th>' + "".join(f"<th>{esc(c)}</th>" for c in table.columns)
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
        body.append(f'<tr><td class="name">{esc(run)}</td>{"".join(cells)}</tr>')
    return f'<table class="downstream"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


DOWNSTREAM_CAPTION = ("One row per evaluated run, one column per task (its metric in brackets), then the mean over "
                      "tasks and the worst task. Best per column in bold, second underlined; for nll lower is better, "
                      "for exact match and accuracy higher. The sentence above each table is computed from its "
                      "numbers; a gap smaller than the standard error (lm-eval's, of each score) or than 1% is "
                      "called so.")


def downstream_section(tables: DownstreamTable | Sequence[DownstreamTable]) -> str:
    """The page's "Downstream results" section: per table, its metric, its sentence and the table."""
    from poise.report.html import esc

    tables = [tables] if isinstance(tables, DownstreamTable) else list(tables)
    parts = ['<section class="downstream"><h2>Downstream results</h2>']
    for table in tables:
        if len(tables) > 1:
            parts.append(f"<h3>{esc(table_title(table))}</h3>")
        sentence = describe(table)
        if sentence:
            parts.append(f'<p class="finding">{esc(sentence)}</p>')
        parts.append(downstream_html(table))
    parts.append(f'<p class="caption">{esc(DOWNSTREAM_CAPTION)}</p></section>')
    return "".join(parts)


def downstream_page(title: str, tables: DownstreamTable | Sequence[DownstreamTable],
                    facts: Sequence[tuple[str, str]] = ()) -> str:
    """A whole HTML page holding only the downstream tables (a report on evaluations alone), under the
    header `facts` (what was run, `poise.report.rundir.run_facts`) when given."""
    from poise.report.html import _CSS, esc, facts_table

    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><main><h1>{esc(title)}</h1>{facts_table(facts)}"
            f"{downstream_section(tables)}</main></body></html>")
