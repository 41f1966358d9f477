"""The `poise report` stage: `report.html` and its figures for selections and the runs evaluated on them.

`build_report` draws every figure once for all selections (AID and THI side by side and as one panel per
selection, coverage, the z-score fit, and for two or more selections their overlap) and writes the page, which
reads top to bottom: what was run (with a run directory), the downstream results, the selections' settings and
per-task summary, the figures, each selection's first picks (with the files that hold every pick), and what the
page leaves out. Nothing on it grows with the pool (capped table rows and figure points), so it stays a few
MB at any pool size. `run_report` is the stage: it reads the folders, opens the output folder through
`poise.provenance` and marks it complete once the page is written. matplotlib is imported when a report is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poise import provenance
from poise.analysis import aid_by_task, coverage, overlap, profile
from poise.config import validate
from poise.errors import PoiseError, warn
from poise.files import REPORT_FILE, SELECTED_FILE, SELECTION_FILE
from poise.io import atomic_write_bytes, atomic_write_text
from poise.matrix import AttributionMatrix, load_matrix
from poise.report.comparison import check_selections, display_names, rows_from, with_recorded_matrix
from poise.report.downstream import (
    downstream_page,
    downstream_section,
    downstream_tables,
    is_evaluation,
    read_evaluation,
)
from poise.report.previews import PICKS_SHOWN, PREVIEW_CHARS, ValidationTexts, first_picks, read_validation
from poise.report.rundir import read_run, run_facts
from poise.report.tables import print_run_summary
from poise.selection import Selection, read_selection
from poise.version import __version__

if TYPE_CHECKING:
    from poise.config import ReportConfig

#: report.html should stay below this: its per-example content is capped whatever the pool size (tests check
#: it at 20,000 and 100,000 rows); a page over it (many selections or tasks) is reported with a warning.
MAX_PAGE_BYTES = 4 * 2**20

ZSCORE_CAPTION = (
    "BIDS normalises every validation column to z = (a - mean) / std before comparing tasks (BIDS paper, "
    "Appendix A.4). Each panel plots, for up to five columns of a task, the sorted normalised influences "
    "against the quantiles of a standard normal: points on the dashed diagonal mean the column is close to "
    "normal, a bent line a skewed or heavy-tailed column (the title gives the pooled skewness and excess "
    "kurtosis, both 0 for a normal). The z-score puts columns on one scale either way; it maps equal "
    "quantiles to equal values only when the shapes agree.")


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
    facts: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the figures and `report.html` for `selections` of `matrix` into `out_dir`; return the page.

    The PNGs are always written. With `embed_images` (the default) the page carries them as base64
    data URIs, so `report.html` is one file to share; without, it refers to them by name. `folders`
    are the selections' folders, read for a preview of the first picks' text (selected.jsonl); by
    default the folder each selection records. `downstream` is HTML put at the top of the page (the
    downstream results, `poise.report.downstream.downstream_section`). With `validation`
    (`read_validation`), the first-picks tables show the text of the validation example each pick
    served. `facts` head the page: what was run (`poise.report.rundir.run_facts`). Files are written
    atomically. Files of an earlier report in `out_dir` that this one does not produce are left in place.
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

    check_selections(matrix, selections)
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
    chosen = plots.zscore_column_choice(matrix.tasks)  # a few columns, read in one pass (not the whole matrix)
    zscores = plots.zscore_fit_figure(matrix.read_columns(chosen), [matrix.tasks[j] for j in chosen])
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
                  served=validation is not None, source=_where_picks_are(selection, folder))
        for name, color, selection, folder in zip(names, hex_colors, selections, folder_list, strict=True)
    ]

    meta = [
        ("matrix", matrix.source or "in memory"),
        ("shape", f"{matrix.n_rows:,} pool rows × {matrix.n_columns:,} validation examples"),
        ("kind", matrix.kind or "unknown"),
        ("tasks", f"{len(matrix.task_names)}"),
        *([] if facts else [("poise", __version__)]),  # the facts name the version
        ("figures", "embedded in this page" if embed_images else "PNG files beside this page"),
    ]
    header = ["selection", "method", "budget", "picks", "pool", "of pool", "normalised", "seed", "tasks"]
    page = render_page(
        title=title,
        meta=meta,
        selection_header=header,
        selection_rows=[_selection_row(n, sel) for n, sel in zip(names, selections, strict=True)],
        names=names,
        summary=rows_from(matrix.task_names, summaries),
        sections=sections,
        embed_images=embed_images,
        colors=hex_colors,
        picks=picks,
        downstream=downstream,
        facts=facts,
        left_out=_left_out(matrix),
    )
    path = out / REPORT_FILE
    atomic_write_text(path, page)
    size = len(page.encode("utf-8"))
    if size > MAX_PAGE_BYTES:
        warn(f"{path} is {size / 2**20:.1f} MB, more than the {MAX_PAGE_BYTES / 2**20:.0f} MB a report should be "
             "(many selections or tasks make many figures): --no-embed-images links the PNGs instead")
    return path


def _where_picks_are(selection: Selection, folder: str | os.PathLike | None) -> str:
    """A sentence naming the files that hold every pick of a selection (the page lists only the first ones)."""
    if folder is None:
        folder = (selection.arguments.get("settings") or {}).get("out")
    total = f"All {len(selection.indices):,} picks"
    if not folder:
        return f"{total} are in the selection.json that poise select writes (this one was not read from a folder)."
    base = Path(os.path.abspath(folder))  # the page may be read from anywhere
    base = base.parent if base.name == SELECTION_FILE else base
    where = f"{total} (row, id, score, served validation example): {base / SELECTION_FILE}"
    if (base / SELECTED_FILE).is_file():
        where += f"; the picked examples in pick order: {base / SELECTED_FILE}"
    return where + "."


def _left_out(matrix: AttributionMatrix) -> list[str]:
    """What the page does not show of the data, with the numbers that apply to this matrix."""
    from poise.report.plots import MAX_STRIP_POINTS, QQ_POINTS

    items = [f"Per selection only the first {PICKS_SHOWN} picks are listed, their text cut to {PREVIEW_CHARS} "
             "characters; every pick is in the selection's files named above its table. The per-task tables and "
             "all figures are computed from every pick."]
    widest = max(len(cols) for cols in matrix.task_columns().values())
    if widest > MAX_STRIP_POINTS:
        items.append(f"AID figures draw at most {MAX_STRIP_POINTS:,} dots per task (a seeded sample of its "
                     f"{widest:,} validation examples at most); the boxes use all of them.")
    if matrix.n_rows > QQ_POINTS:
        items.append(f"Q-Q figure: each column's line is drawn at {QQ_POINTS:,} evenly spaced quantiles of its "
                     f"{matrix.n_rows:,} values (smallest and largest included), up to 5 columns per task; the "
                     "skewness and kurtosis use every value.")
    items.append("Coverage figure: each selection at up to 50 lengths of its pick order.")
    items.append(f"The scores themselves: the attribution matrix {matrix.source or '(in memory)'}, "
                 f"{matrix.n_rows:,} × {matrix.n_columns:,}.")
    return items


def run_report(config: ReportConfig, console: Any = None) -> Path:
    """The `poise report` stage: read the selection and evaluation folders (the validation files, for the
    served examples' text; the run directory, for the header), open the output folder (`provenance.open_folder`:
    a folder made with other settings is refused unless `overwrite`; the same settings write the report
    again), load the matrix, build the report, mark the folder complete, and print the summary tables to
    `console` when one is given."""
    validate(config)
    if not config.selections:
        raise PoiseError("name at least one selection folder (poise select) or evaluation folder (poise evaluate)")
    facts = run_facts(read_run(config.run)) if config.run else []
    evaluations = [read_evaluation(p) for p in config.selections if is_evaluation(p)]
    tables = downstream_tables(evaluations, metric=config.metric) if evaluations else []
    folders = [p for p in config.selections if not is_evaluation(p)]
    validation = read_validation(config.validation) if config.validation and folders else None
    selections = [read_selection(path) for path in folders]
    out = provenance.open_folder(config.out, "report", config).folder
    if not selections:  # evaluations only: the page is the table
        path = out / REPORT_FILE
        atomic_write_text(path, downstream_page(config.title, tables, facts))
        provenance.mark_complete(out)
        if console is not None:
            print_run_summary(None, [], evaluations, metric=config.metric, console=console)
        return path
    source = config if config.attribution or config.scores else with_recorded_matrix(selections[0], config)
    matrix = load_matrix(source)
    path = build_report(matrix, selections, out, title=config.title, embed_images=config.embed_images,
                        folders=folders, downstream=downstream_section(tables) if tables else "",
                        validation=validation, facts=facts)
    provenance.mark_complete(out)
    if console is not None:
        print_run_summary(matrix, selections, evaluations, metric=config.metric, console=console)
    return path

