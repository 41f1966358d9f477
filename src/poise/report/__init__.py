"""Reports on selections and the runs trained on them: PNG figures, one HTML page, terminal tables.

`build_report(matrix, selections, out_dir)` writes the figures, each once for all selections:
`aid_comparison.png` and `aid_selections.png` (the AID per task side by side, and as small multiples,
one panel per selection), `thi_comparison.png` and `thi_selections.png` (the same for THI),
`coverage.png` (one panel per task) and, for two or more selections, `overlap.png`; and
`report.html`, which reads top to bottom: the downstream results when evaluations are given (the BIDS
paper's Table 2 layout with one sentence computed from the numbers, `downstream.py`), the selections'
settings and per-task summary table, the figures, and a table of each selection's first picks - with
the validation files, beside each pick the validation example it served, so the page shows why it was
picked. Every selection keeps one colour in every figure (`plots.method_colors`).
The page embeds the PNGs as data URIs by default, so it is one file that opens anywhere; the PNGs are
written beside it all the same, and `embed_images=False` links them instead.
`print_summary` prints the per-task table to a terminal with rich; `print_run_summary` prints it and
the downstream tables (what `poise run` ends with).

The numbers come from `poise.analysis` (BIDS paper Sections 3 and 6.2); this package only lays them
out. matplotlib is imported when a report is built, not by the terminal tables.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poise.analysis import aid_by_task, coverage, overlap, profile, task_summary
from poise.attribution import AttributionMatrix, load_matrix
from poise.errors import PoiseError
from poise.io import atomic_write_bytes, atomic_write_text
from poise.report.downstream import read_evaluation
from poise.selection import SELECTED_FILE, SELECTION_FILE, Selection, read_selection
from poise.version import __version__

if TYPE_CHECKING:
    from poise.config import ReportConfig

__all__ = [
    "REPORT_FILE", "ValidationTexts", "build_report", "display_names", "first_picks", "preview_text",
    "print_run_summary", "print_summary", "read_validation", "run_report", "summary_rows",
]

REPORT_FILE = "report.html"
ZSCORE_CAPTION = (
    "BIDS normalises every validation column to z = (a - mean) / std before comparing tasks (BIDS paper, "
    "Appendix A.4). Each panel plots, for up to five columns of a task, the sorted normalised influences "
    "against the quantiles of a standard normal: points on the dashed diagonal mean the column is close to "
    "normal, a bent line a skewed or heavy-tailed column (the title gives the pooled skewness and excess "
    "kurtosis, both 0 for a normal). The z-score puts columns on one scale either way; it maps equal "
    "quantiles to equal values only when the shapes agree.")
#: The first-picks table of each selection shows this many picks.
PICKS_SHOWN = 10
#: Example text in the first-picks table is cut to this many characters.
PREVIEW_CHARS = 120


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

    from poise.report.downstream import print_table
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
        print_table(table, console)


# ----------------------------------------------------------------------------------- first picks
def _text_of(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) else p for p in content]
        text = " ".join(p for p in parts if isinstance(p, str))
        return text or None
    return None


def preview_text(example: Any, limit: int = PREVIEW_CHARS) -> str | None:
    """The first user message of a pool example (tulu `messages`, sharegpt `conversations`, alpaca
    `instruction`/`input`, `prompt`, `text`), on one line and cut to `limit` characters; None when
    the example has no text to show (e.g. it is pre-tokenized)."""
    if not isinstance(example, dict):
        return None
    text = None
    turns = example.get("messages") or example.get("conversations")
    if isinstance(turns, list):
        dicts = [t for t in turns if isinstance(t, dict)]
        users = [t for t in dicts if (t.get("role") or t.get("from")) in ("user", "human")]
        for turn in users or dicts[:1]:
            text = _text_of(turn.get("content", turn.get("value")))
            if text:
                break
    if not text and isinstance(example.get("instruction"), str):
        extra = example.get("input")
        text = example["instruction"] + (f" {extra}" if isinstance(extra, str) and extra else "")
    for key in ("prompt", "text"):
        if not text and isinstance(example.get(key), str):
            text = example[key]
    if not text:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _first_lines(path: Path, count: int) -> list[str]:
    lines: list[str] = []
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
                if len(lines) == count:
                    break
    return lines


def _previews(folder: str | os.PathLike | None, trace: Sequence[dict[str, Any]]) -> list[str | None]:
    """The example text of the given picks from `selected.jsonl` in the selection folder.

    The file holds the pool lines in pick order. Nothing is shown (all None) when there is no such
    file, it cannot be read, or a line's id disagrees with the pick's id (a file of another selection).
    """
    nothing: list[str | None] = [None] * len(trace)
    if not folder or not trace:
        return nothing
    path = Path(folder)
    if path.name == SELECTION_FILE:
        path = path.parent
    path = path / SELECTED_FILE
    try:
        if not path.is_file():
            return nothing
        lines = _first_lines(path, len(trace))
    except (OSError, UnicodeDecodeError):
        return nothing
    texts: list[str | None] = []
    for entry, line in zip(trace, lines, strict=False):
        try:
            example = json.loads(line)
        except json.JSONDecodeError:
            texts.append(None)
            continue
        if isinstance(example, dict) and "id" in example and entry.get("id") is not None \
                and str(example["id"]) != str(entry["id"]):
            return nothing
        texts.append(preview_text(example))
    return texts + [None] * (len(trace) - len(texts))


def _recorded_folder(selection: Selection) -> str | None:
    """The folder `poise select` wrote the selection to, as recorded in its settings."""
    settings = selection.arguments.get("settings") or {}
    out = settings.get("out")
    return str(out) if out else None


def first_picks(
    selection: Selection, limit: int = PICKS_SHOWN, folder: str | os.PathLike | None = None,
    validation: ValidationTexts | None = None,
) -> list[dict[str, Any]]:
    """The first `limit` picks of a selection from its trace: `rank` (0-based), `row`, `id`, `task`,
    `column_id` (the validation example the pick served; None for random), `score` (the BIDS gain or
    the rule's score; None when there is none) and `text` (a preview of the example from the folder's
    selected.jsonl, else None). `folder` defaults to the folder the selection records. With
    `validation`, each pick also gets `served_text`: the served validation example's first user
    message (None when the pick serves none or its id is not in the validation files)."""
    trace = list(selection.trace[:limit])
    if not trace:  # a selection without a trace: its indices alone
        trace = [{"rank": k, "row": int(row)} for k, row in enumerate(selection.indices[:limit].tolist())]
    texts = _previews(folder if folder is not None else _recorded_folder(selection), trace)
    rows = [
        {
            "rank": entry.get("rank", k),
            "row": entry.get("row"),
            "id": entry.get("id"),
            "task": entry.get("task"),
            "column_id": entry.get("column_id"),
            "score": entry.get("score"),
            "text": text,
        }
        for k, (entry, text) in enumerate(zip(trace, texts, strict=True))
    ]
    if validation is not None:
        for row in rows:
            row["served_text"] = validation.get(row["column_id"], row["task"])
    return rows


# ------------------------------------------------------------------------------ validation texts
@dataclass
class ValidationTexts:
    """The first user message of every validation example, by id (and by task and id, for ids that
    repeat across files). Only shown on the page: an id that is not here shows as a dash."""

    by_task: dict[tuple[str, str], str | None] = field(default_factory=dict)
    by_id: dict[str, str | None] = field(default_factory=dict)

    def get(self, column_id: Any, task: Any = None) -> str | None:
        if column_id is None:
            return None
        key = str(column_id)
        if task is not None and (str(task), key) in self.by_task:
            return self.by_task[(str(task), key)]
        return self.by_id.get(key)

    def __len__(self) -> int:
        return len(self.by_id)


def read_validation(paths: Sequence[str | os.PathLike]) -> ValidationTexts:
    """The validation examples' texts from files or folders of validation data (one JSONL per task),
    read as `poise features` reads them (`poise.data.formats.read_examples`), so their ids are the
    attribution matrix's column ids: the row's "id", else "<file stem>/<index>" in a folder. A missing or
    unreadable path is one PoiseError line naming it."""
    from poise.data.formats import read_examples

    texts = ValidationTexts()
    for path in paths:
        p = Path(path)
        try:
            if not p.exists():  # checked here: read_examples would take "a/b" for a hub data set
                raise PoiseError(f"{path}: no such file or folder")
            examples = read_examples(p, task=p.stem if p.is_file() else None)
        except PoiseError as exc:
            raise PoiseError(f"validation: {exc}") from None
        except OSError as exc:
            raise PoiseError(f"validation: {path}: cannot read ({exc.strerror or exc})") from None
        for example in examples:
            text = preview_text({"messages": example.messages}) if example.messages else None
            texts.by_task.setdefault((str(example.task), example.id), text)
            texts.by_id.setdefault(example.id, text)
    return texts


# ---------------------------------------------------------------------------------------- report
def _selection_row(name: str, selection: Selection) -> list[str]:
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
    ]


def _as_list(values: Iterable[Any] | None, n: int) -> list[Any]:
    out = list(values) if values is not None else [None] * n
    if len(out) != n:
        raise PoiseError(f"expected {n} selection folders, got {len(out)}")
    return out


def build_report(
    matrix: AttributionMatrix,
    selections: list[Selection],
    out_dir: str | os.PathLike,
    title: str = "poise selection report",
    embed_images: bool = True,
    folders: Sequence[str | os.PathLike | None] | None = None,
    downstream: str = "",
    validation: ValidationTexts | None = None,
) -> Path:
    """Write the figures and `report.html` for `selections` of `matrix` into `out_dir`; return the page.

    The PNGs are always written. With `embed_images` (the default) the page carries them as base64
    data URIs, so `report.html` is one file to share; without, it refers to them by name. `folders`
    are the selections' folders, read for a preview of the first picks' text (selected.jsonl); by
    default the folder each selection records. `downstream` is HTML put at the top of the page (the
    downstream results, `poise.report.downstream.downstream_section`). With `validation`
    (`read_validation`), the first-picks tables show the text of the validation example each pick
    served. Files are written atomically. Files of an earlier report in `out_dir` that this one does
    not produce are left in place.
    """
    from matplotlib.colors import to_hex

    from poise.report import plots
    from poise.report.html import (
        AID_CAPTION,
        COVERAGE_CAPTION,
        OVERLAP_CAPTION,
        THI_CAPTION,
        Image,
        PickTable,
        Section,
        render_page,
    )

    _check(matrix, selections)
    folder_list = _as_list(folders, len(selections))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = display_names(selections)
    colors = plots.method_colors(names)
    hex_colors = [to_hex(colors[name]) for name in names]

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

    several = len(selections) >= 2
    aid_images = [image("aid_selections.png", plots.aid_panels(names, aids, colors=colors),
                        "normalised AID per task, one panel per selection",
                        "One panel per selection, same task order and y axis: the box is the spread of "
                        "the task's validation examples, each dot one example.")]
    thi_images = [image("thi_selections.png", plots.thi_panels(names, thi_task, thi_instance, colors=colors),
                        "THI counts per task, one panel per selection",
                        "One panel per selection, shared axes: picks whose top validation example "
                        "(solid) or top task mean (hatched) is in the task.")]
    if several:
        aid_images.insert(0, image("aid_comparison.png", plots.aid_comparison_plot(names, aids, colors=colors),
                                   "normalised AID per task for every selection",
                                   "Normalised AID per task, all selections side by side."))
        thi_images.insert(0, image("thi_comparison.png",
                                   plots.thi_comparison_plot(names, thi_task, thi_instance, colors=colors),
                                   "THI share per task for every selection",
                                   "Share of picks per task, instance-wise (top) and task-wise (bottom)."))
    sections = [
        Section("Average Influence Distribution (AID)", AID_CAPTION, aid_images),
        Section("Task frequency with Highest Influence (THI)", THI_CAPTION, thi_images),
        Section("Coverage as the selection grows", COVERAGE_CAPTION,
                [image("coverage.png", plots.coverage_plot(names, coverages, colors=colors),
                       "instance-wise THI share of each task against the number of picks, per selection")]),
    ]
    zscores = plots.zscore_fit_figure(matrix.scores, matrix.tasks)
    sections.append(Section("Does the z-score fit the influence columns?", ZSCORE_CAPTION,
                            [image("zscore_fit.png", zscores, "Q-Q plots of normalised validation columns against "
                                   "the standard normal, one panel per task")]))
    if several:
        sections.append(
            Section("Overlap between selections", OVERLAP_CAPTION,
                    [image("overlap.png", plots.overlap_plot(names, overlap([s.indices for s in selections])),
                           "Jaccard similarity between the selections")])
        )
    picks = [
        PickTable(name=name, color=color, total=len(selection.indices),
                  rows=first_picks(selection, PICKS_SHOWN, folder, validation=validation),
                  score_label="gain" if selection.method == "bids" else "score",
                  served=validation is not None)
        for name, color, selection, folder in zip(names, hex_colors, selections, folder_list, strict=True)
    ]

    meta = [
        ("matrix", matrix.source or "in memory"),
        ("shape", f"{matrix.n_rows:,} pool rows × {matrix.n_columns:,} validation examples"),
        ("kind", matrix.kind or "unknown"),
        ("tasks", f"{len(matrix.task_names)}"),
        ("poise", __version__),
        ("figures", "embedded in this page" if embed_images else "PNG files beside this page"),
    ]
    header = ["selection", "method", "budget", "picks", "pool", "of pool", "normalised", "seed", "tasks"]
    page = render_page(
        title=title,
        meta=meta,
        selection_header=header,
        selection_rows=[_selection_row(n, sel) for n, sel in zip(names, selections, strict=True)],
        names=names,
        summary=_rows_from(matrix.task_names, summaries),
        sections=sections,
        embed_images=embed_images,
        colors=hex_colors,
        picks=picks,
        downstream=downstream,
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
    """The `poise report` stage: load the matrix, the selection and evaluation folders (and the
    validation files, for the served examples' text), build the report, and print the summary tables
    to `console` when one is given."""
    import dataclasses

    from poise.report.downstream import downstream_page, downstream_section, downstream_tables, is_evaluation

    if not config.out:
        raise PoiseError("--out DIR is required")
    if not config.selections:
        raise PoiseError("name at least one selection folder (poise select) or evaluation folder (poise evaluate)")
    evaluations = [read_evaluation(p) for p in config.selections if is_evaluation(p)]
    tables = downstream_tables(evaluations, metric=config.metric) if evaluations else []
    folders = [p for p in config.selections if not is_evaluation(p)]
    validation = read_validation(config.validation) if config.validation and folders else None
    if not folders:  # evaluations only: the page is the table
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / REPORT_FILE
        atomic_write_text(path, downstream_page(config.title, tables))
        if console is not None:
            print_run_summary(None, [], evaluations, metric=config.metric, console=console)
        return path
    config = dataclasses.replace(config, selections=folders)
    selections = [read_selection(path) for path in config.selections]
    if not (config.attribution or config.scores):
        config = _matrix_of(selections[0], config)
    matrix = load_matrix(config)
    path = build_report(matrix, selections, config.out, title=config.title, embed_images=config.embed_images,
                        folders=config.selections, downstream=downstream_section(tables) if tables else "",
                        validation=validation)
    if console is not None:
        print_run_summary(matrix, selections, evaluations, metric=config.metric, console=console)
    return path


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
    from poise.report.downstream import downstream_tables, print_downstream

    if console is None:
        from rich.console import Console

        console = Console()
    if matrix is not None and selections:
        print_summary(matrix, selections, console=console)
    if evaluations:
        for table in downstream_tables(evaluations, metric=metric):
            print_downstream(table, console)
