"""The report page: one HTML file with inline CSS and no scripts, fonts or external links.

By default the figures are embedded as base64 PNG data URIs, so the page is a single self-contained
file that opens anywhere; with `embed_images=False` it links the PNG files written beside it instead.
`render_page` only formats what it is given - the numbers are computed by `poise.analysis`, the
figures drawn by `poise.report.plots` and the first-picks rows read by `poise.report.previews`. Every
string that comes from the user or the data (title, labels, task names, methods, sources, ids, example
text) is HTML-escaped here; colours are checked to be hex codes before they go into a style attribute.
"""

from __future__ import annotations

import base64
import html
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

AID_CAPTION = (
    "AID (Average Influence Distribution, BIDS paper Section 3) is the mean, over the selected "
    "training examples, of their influence on each validation example. Values are column-normalised "
    "(each validation example's influence is standardised over the whole pool), so 0 is what an "
    "average pool example gives and tasks with large raw influence scales do not dominate. Each box "
    "is one task; each dot is one validation example. A balanced selection lifts every task, not a few."
)
THI_CAPTION = (
    "THI (Task frequency with Highest Influence) counts, for every pick, the task it helps most: "
    "task-wise takes the task with the highest mean influence over its validation examples (Section 3), "
    "instance-wise the task of the single most influenced validation example (Section 6.2). Both use "
    "the normalised matrix. A selection that over-serves one task shows one tall bar."
)
COVERAGE_CAPTION = (
    "Coverage follows the instance-wise THI share of each task as the picks are added in pick order: "
    "one panel per task, one line per selection; the dotted line is an equal share. A selection whose "
    "lines stay near it in every panel serves every task throughout; a line far above it marks a task "
    "that the selection over-serves, and a line along 0 a task it neglects."
)
OVERLAP_CAPTION = (
    "Overlap is the Jaccard similarity |A ∩ B| / |A ∪ B| between the sets of picked rows of two "
    "selections (1 = the same rows, 0 = no row in common)."
)
COLOR_NOTE = (
    "Each selection keeps one colour in every figure (the swatch next to its name in the tables); "
    "tasks are told apart by position and label, never by colour."
)
PICKS_CAPTION = (
    "The first picks of each selection, in pick order (rank 1 = the first pick; selection.json counts "
    "from 0): the pool row and its id, the task and validation example the pick served (the one that "
    "decided it; none for random) and its score - for bids the marginal gain, for the other rules the "
    "value they rank by. The text, where shown, is the first user message of the picked example, cut short; "
    "with the validation files, the served validation example's first user message is shown beside it, so "
    "each pick can be read as \"this pool example, for that validation example\"."
)
SUMMARY_CAPTION = (
    "Per task and selection: infl. is the mean normalised influence of the picks on the task's "
    "validation examples (the mean of the normalised AID over the task); THI is the instance-wise share "
    "of picks whose most influenced validation example belongs to the task. The macro row gives the "
    "mean influence over tasks and, for THI, the ratio of the largest to the smallest task share "
    "(1.00× = perfectly balanced, ∞ = some task is never the top task)."
)

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0; background: #f6f7f9; color: #1d2330; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.7rem; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 32px 0 8px; border-bottom: 1px solid #d5d9e0; padding-bottom: 4px; }
p.meta { color: #5a6272; margin: 0 0 12px; }
p.caption { color: #3d4555; max-width: 70em; }
table { border-collapse: collapse; background: #fff; margin: 8px 0 4px; font-size: 0.92rem; }
th, td { border: 1px solid #d5d9e0; padding: 4px 10px; text-align: right; }
th { background: #eceff4; font-weight: 600; }
td.name, th.name { text-align: left; }
tr.macro td { font-weight: 600; background: #f1f3f7; }
tbody tr:nth-child(even):not(.macro) td { background: #fafbfc; }
figure { margin: 12px 0 22px; background: #fff; border: 1px solid #d5d9e0; padding: 10px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #5a6272; font-size: 0.88rem; margin-top: 6px; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 6px; border-radius: 2px;
          vertical-align: -0.05em; border: 1px solid rgba(0, 0, 0, 0.3); }
h3 { font-size: 1.02rem; margin: 18px 0 4px; }
h3 small { color: #5a6272; font-weight: normal; font-size: 0.85rem; margin-left: 6px; }
table.picks { font-size: 0.84rem; }
table.picks th, table.picks td { padding: 2px 8px; }
table.picks td.left, table.picks th.left { text-align: left; }
table.picks td.text { text-align: left; color: #3d4555; max-width: 40em; }
table.picks td.text.served { background: #f3f6fb; max-width: 30em; }
p.finding { font-size: 1.05rem; background: #fff; border-left: 4px solid #3b6fb6; padding: 8px 12px;
            margin: 8px 0; max-width: 70em; }
section.downstream h3 { margin-top: 14px; }
table.facts { margin: 4px 0 12px; font-size: 0.9rem; }
table.facts th, table.facts td { text-align: left; padding: 2px 10px; }
p.source { color: #5a6272; font-size: 0.85rem; margin: 0 0 4px; }
ul.left-out { color: #3d4555; max-width: 70em; padding-left: 1.4em; }
"""
LEFT_OUT_CAPTION = (
    "The page summarises the selections; it stays a few MB whatever the pool size, so it does not list every "
    "pick or draw every value. What it leaves out, and where the full data is:"
)


@dataclass
class Image:
    """A figure of the page: the PNG bytes, the file name it was written under, and its text."""

    filename: str
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Section:
    heading: str
    caption: str
    images: list[Image]


@dataclass
class PickTable:
    """The first picks of one selection: its name and colour (#rrggbb), how many picks it has in
    all, one row per pick (`rank`, `row`, `id`, `task`, `column_id`, `score`, `text`; None where
    unknown; `served_text` too when `served`) and the header of the score column ("gain" for bids).
    With `served`, the table shows the pool example's text and then the text of the validation example
    each pick served (a dash where its id is not in the validation files). `source` says where all picks are."""

    name: str
    color: str
    total: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    score_label: str = "score"
    #: show the served validation example's text (row key `served_text`) beside the pick's own text
    served: bool = False
    #: where every pick is (a sentence naming the selection's files), shown under the table's heading
    source: str = ""


_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
DASH = "–"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def swatch(color: str | None) -> str:
    """A small square of the selection's colour (nothing for a missing or malformed colour)."""
    if not color or not _HEX_COLOR.fullmatch(color):
        return ""
    return f'<span class="swatch" style="background:{color}"></span>'


def png_size(png: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels from a PNG's IHDR chunk, or None when the bytes are not a PNG."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def _img_src(image: Image, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(image.png).decode("ascii")
    return image.filename


def _figure(image: Image, embed: bool) -> str:
    caption = f"<figcaption>{esc(image.caption)}</figcaption>" if image.caption else ""
    size = png_size(image.png)
    # width/height let the browser reserve the space before the image is decoded (no layout jumps)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    lazy = "" if embed else ' loading="lazy"'
    return (
        f'<figure><img src="{esc(_img_src(image, embed))}" alt="{esc(image.alt)}"{dims}{lazy}>'
        f"{caption}</figure>"
    )


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    name_columns: int = 1,
    colors: Sequence[str | None] | None = None,
) -> str:
    """A table whose first `name_columns` columns are left-aligned text; cells are escaped here.
    `colors` puts a swatch of each row's colour before its first cell."""
    head = "".join(
        f'<th class="name">{esc(h)}</th>' if k < name_columns else f"<th>{esc(h)}</th>"
        for k, h in enumerate(header)
    )
    body = []
    for r, row in enumerate(rows):
        mark = swatch(colors[r]) if colors else ""
        cells = "".join(
            f'<td class="name">{mark if k == 0 else ""}{esc(c)}</td>' if k < name_columns else f"<td>{esc(c)}</td>"
            for k, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _or_dash(value: Any) -> str:
    return DASH if value is None or value == "" else esc(value)


def format_score(value: Any) -> str:
    if value is None:
        return DASH
    try:
        number = float(value)
    except (TypeError, ValueError):
        return esc(value)
    return DASH if math.isnan(number) else f"{number:.4g}"


def _picks_table(table: PickTable) -> str:
    shown = len(table.rows)
    served = table.served and any(row.get("column_id") is not None for row in table.rows)
    has_text = served or any(row.get("text") for row in table.rows)
    heading = (
        f"<h3>{swatch(table.color)}{esc(table.name)}"
        f"<small>first {shown:,} of {table.total:,} picks</small></h3>"
    )
    head = (
        "<th>rank</th><th>row</th><th class=\"left\">id</th><th class=\"left\">task</th>"
        f"<th class=\"left\">validation example</th><th>{esc(table.score_label)}</th>"
    )
    if served:
        head += ('<th class="left">pool example (first user message)</th>'
                 '<th class="left">served validation example (first user message)</th>')
    elif has_text:
        head += '<th class="left">example (first user message)</th>'
    body = []
    for row in table.rows:
        rank = row.get("rank")
        cells = (
            f"<td>{DASH if rank is None else esc(int(rank) + 1)}</td>"
            f"<td>{_or_dash(row.get('row'))}</td>"
            f"<td class=\"left\">{_or_dash(row.get('id'))}</td>"
            f"<td class=\"left\">{_or_dash(row.get('task'))}</td>"
            f"<td class=\"left\">{_or_dash(row.get('column_id'))}</td>"
            f"<td>{format_score(row.get('score'))}</td>"
            + (f'<td class="text">{_or_dash(row.get("text"))}</td>' if has_text else "")
            + (f'<td class="text served">{_or_dash(row.get("served_text"))}</td>' if served else "")
        )
        body.append(f"<tr>{cells}</tr>")
    source = f'<p class="source">{esc(table.source)}</p>' if table.source else ""
    return (
        f'{heading}{source}<table class="picks"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def facts_table(facts: Sequence[tuple[str, str]]) -> str:
    """The header's table of what was run: one (label, value) per row; empty without facts."""
    if not facts:
        return ""
    rows = "".join(f"<tr><th>{esc(label)}</th><td>{esc(value)}</td></tr>" for label, value in facts)
    return f'<table class="facts"><tbody>{rows}</tbody></table>'


def format_ratio(value: float) -> str:
    if math.isinf(value):
        return "∞"
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}×"


def _summary_table(names: Sequence[str], rows: Sequence[dict], colors: Sequence[str | None] | None = None) -> str:
    marks = list(colors) if colors else [None] * len(names)
    top = '<th class="name" rowspan="2">task</th>' + "".join(
        f'<th colspan="2">{swatch(color)}{esc(name)}</th>' for name, color in zip(names, marks, strict=True)
    )
    sub = "".join("<th>infl.</th><th>THI</th>" for _ in names)
    body = []
    for row in rows:
        if row["macro"]:
            cells = "".join(
                f"<td>{infl:.3f}</td><td>{esc(format_ratio(ratio))}</td>"
                for infl, ratio in zip(row["influence"], row["thi"], strict=True)
            )
            body.append(f'<tr class="macro"><td class="name">macro (mean; THI max/min)</td>{cells}</tr>')
        else:
            cells = "".join(
                f"<td>{infl:.3f}</td><td>{100 * share:.1f}%</td>"
                for infl, share in zip(row["influence"], row["thi"], strict=True)
            )
            body.append(f'<tr><td class="name">{esc(row["task"])}</td>{cells}</tr>')
    return (
        f"<table><thead><tr>{top}</tr><tr>{sub}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def render_page(
    *,
    title: str,
    meta: Sequence[tuple[str, str]],
    selection_header: Sequence[str],
    selection_rows: Sequence[Sequence[str]],
    names: Sequence[str],
    summary: Sequence[dict],
    sections: Sequence[Section],
    embed_images: bool = True,
    colors: Sequence[str | None] | None = None,
    picks: Sequence[PickTable] = (),
    downstream: str = "",
    facts: Sequence[tuple[str, str]] = (),
    left_out: Sequence[str] = (),
) -> str:
    """The whole page as a string, top to bottom: what was run (`facts`, `poise.report.rundir.run_facts`;
    none without a run directory), the `meta` line (what the matrix and selections say), the downstream
    results (`downstream`, HTML made by `poise.report.downstream.downstream_section`; empty without
    evaluations), the selections and their per-task summary, the figures (`sections`) and the first-picks
    tables (`picks`), then `left_out`: one sentence per thing the page leaves out and where it is instead.
    `summary` rows come from `poise.report.comparison.summary_rows`; `colors` are the selections' colours
    (#rrggbb, in `names` order)."""
    meta_html = " · ".join(f"{esc(k)}: {esc(v)}" for k, v in meta)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        facts_table(facts),
        f'<p class="meta">{meta_html}</p>',
        downstream,
        "<h2>Selections</h2>",
        f'<p class="caption">{esc(COLOR_NOTE)}</p>' if colors else "",
        _table(selection_header, selection_rows, name_columns=2, colors=colors),
        "<h2>Per-task summary</h2>",
        f'<p class="caption">{esc(SUMMARY_CAPTION)}</p>',
        _summary_table(names, summary, colors),
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.heading)}</h2>")
        if section.caption:
            parts.append(f'<p class="caption">{esc(section.caption)}</p>')
        parts.extend(_figure(image, embed_images) for image in section.images)
    if picks:
        parts.append("<h2>First picks</h2>")
        parts.append(f'<p class="caption">{esc(PICKS_CAPTION)}</p>')
        parts.extend(_picks_table(table) for table in picks)
    if left_out:
        parts.append("<h2>What this page leaves out</h2>")
        parts.append(f'<p class="caption">{esc(LEFT_OUT_CAPTION)}</p>')
        parts.append('<ul class="left-out">' + "".join(f"<li>{esc(item)}</li>" for item in left_out) + "</ul>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"
