"""What `poise run` prints at the end, read from the run directory alone: what was done and in how long, the
seconds per stage, the selections' per-task comparison, the downstream tables and where the report is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from poise.config import MatrixConfig
from poise.errors import PoiseError
from poise.files import EVAL_SCORES_FILE, REPORT_FILE, SELECTION_FILE
from poise.matrix import AttributionMatrix, load_matrix
from poise.report.comparison import with_recorded_matrix
from poise.report.downstream import read_evaluation
from poise.report.rundir import format_seconds, read_run
from poise.report.tables import print_run_summary
from poise.selection import Selection, read_selection


def summarize_run(run_dir: Path, actions: dict[str, str], seconds: float, console: Any) -> None:
    """Print a run's outcome to a rich `console`: the units per action (`actions`: unit -> ran, resumed,
    skipped, not reached, ...) and the `seconds` the run took; the seconds per stage (`pipeline.json`); the
    selections' comparison (THI share and mean normalised influence per task, on the matrix the selections
    record) and the downstream tables (runs x capabilities + macro-average + worst, in the metric of the
    run's report section); and the report's path when it was written. What the run has not made yet is left
    out."""
    from rich.markup import escape

    run_dir = Path(run_dir)
    record = read_run(run_dir, required=False)
    counts: dict[str, int] = {}
    for action in actions.values():
        counts[action] = counts.get(action, 0) + 1
    console.print(f"[bold]poise run[/] {escape(str(run_dir))}: " + ", ".join(f"{n} {a}" for a, n in counts.items())
                  + f" in {seconds:.0f}s")
    spent = record.stage_seconds()
    if spent:
        console.print("time per stage (when it last ran): " +
                      ", ".join(f"{stage} {format_seconds(s)}" for stage, s in spent), highlight=False)
    selections = [read_selection(folder) for folder in record.folders("select", SELECTION_FILE)]
    evaluations = [read_evaluation(folder) for folder in record.folders("evaluate", EVAL_SCORES_FILE)]
    metric = str(record.section("report").get("metric") or "nll")
    print_run_summary(_matrix(selections, run_dir), selections, evaluations, metric=metric, console=console)
    reports = record.folders("report", REPORT_FILE)
    if reports:
        console.print(f"report: {escape(str(reports[-1] / REPORT_FILE))}", highlight=False)


def _matrix(selections: list[Selection], run_dir: Path) -> AttributionMatrix | None:
    """The influence matrix the first selection not made on RDS records (looked up in the run directory by its
    folder name when the run directory was moved); None when there is none or it cannot be read."""
    for selection in selections:
        try:
            config = with_recorded_matrix(selection, MatrixConfig())
        except PoiseError:
            continue
        if config.attribution and not Path(config.attribution).exists():
            config = dataclasses.replace(config, attribution=str(run_dir / Path(config.attribution).name))
        try:
            return load_matrix(config)
        except PoiseError:
            return None
    return None
