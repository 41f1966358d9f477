"""Reports on selections and the runs trained on them: PNG figures, one HTML page, terminal tables.

One job per module: `page` (the `poise report` stage: figures and report.html), `comparison` (the selections'
per-task numbers), `previews` (the first picks' text and the validation examples they served), `downstream`
(the runs x capabilities table and its sentence), `tables` (terminal tables), `rundir` (what a run directory
records, for the page's header), `summary` (what `poise run` prints at the end), `html` (the page's markup),
`plots` (the figures) and `study` (seed-averaged study tables). The numbers come from `poise.analysis`; this
package lays them out. Neither rich nor matplotlib is imported until something is printed or drawn.
"""

from __future__ import annotations

from poise.report.comparison import display_names, summary_rows
from poise.report.page import REPORT_FILE, ZSCORE_CAPTION, build_report, run_report
from poise.report.previews import (
    PICKS_SHOWN,
    PREVIEW_CHARS,
    ValidationTexts,
    first_picks,
    preview_text,
    read_validation,
)
from poise.report.rundir import RunRecord, read_run, run_facts
from poise.report.summary import summarize_run
from poise.report.tables import print_run_summary, print_scores, print_summary

__all__ = [
    "PICKS_SHOWN", "PREVIEW_CHARS", "REPORT_FILE", "ZSCORE_CAPTION", "RunRecord", "ValidationTexts",
    "build_report", "display_names", "first_picks", "preview_text", "print_run_summary", "print_scores",
    "print_summary", "read_run", "read_validation", "run_facts", "run_report", "summarize_run", "summary_rows",
]
