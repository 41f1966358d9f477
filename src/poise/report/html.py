"""The report page: one self-contained HTML file (inline CSS, no scripts, fonts or external links).

`render_page` only formats what it is given - the numbers are computed by `poise.analysis` and the
figures drawn by `poise.report.plots`. Every string that comes from the user (title, labels, task
names, methods, sources) is HTML-escaped here.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
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
    "Coverage follows the instance-wise THI share of each task as the picks are added in pick order; "
    "the dotted line is an equal share. Curves that stay near it mean every task is served throughout "
    "the selection; a curve far above it marks a task that the first picks over-serve."
)
OVERLAP_CAPTION = (
    "Overlap is the Jaccard similarity |A ∩ B| / |A ∪ B| between the sets of picked rows of two "
    "selections (1 = the same rows, 0 = no row in common)."
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
"""


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


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img_src(image: Image, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(image.png).decode("ascii")
    return image.filename


def _figure(image: Image, embed: bool) -> str:
    caption = f"<figcaption>{esc(image.caption)}</figcaption>" if image.caption else ""
    return (
        f'<figure><img src="{esc(_img_src(image, embed))}" alt="{esc(image.alt)}" loading="lazy">'
        f"{caption}</figure>"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], name_columns: int = 1) -> str:
    """A table whose first `name_columns` columns are left-aligned text; cells are escaped here."""
    head = "".join(
        f'<th class="name">{esc(h)}</th>' if k < name_columns else f"<th>{esc(h)}</th>"
        for k, h in enumerate(header)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="name">{esc(c)}</td>' if k < name_columns else f"<td>{esc(c)}</td>"
            for k, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def format_ratio(value: float) -> str:
    if math.isinf(value):
        return "∞"
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}×"


def _summary_table(names: Sequence[str], rows: Sequence[dict]) -> str:
    top = '<th class="name" rowspan="2">task</th>' + "".join(
        f'<th colspan="2">{esc(name)}</th>' for name in names
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
    embed_images: bool = False,
) -> str:
    """The whole page as a string. `summary` rows come from `poise.report.summary_rows`."""
    meta_html = " · ".join(f"{esc(k)}: {esc(v)}" for k, v in meta)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{meta_html}</p>',
        "<h2>Selections</h2>",
        _table(selection_header, selection_rows, name_columns=2),
        "<h2>Per-task summary</h2>",
        f'<p class="caption">{esc(SUMMARY_CAPTION)}</p>',
        _summary_table(names, summary),
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.heading)}</h2>")
        if section.caption:
            parts.append(f'<p class="caption">{esc(section.caption)}</p>')
        parts.extend(_figure(image, embed_images) for image in section.images)
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"
