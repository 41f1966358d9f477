"""The report's figures, drawn with matplotlib's object API and returned as PNG bytes.

Every function takes plain data (names, task names, arrays, counts) and returns the encoded PNG, so
the caller decides where it goes (a file written atomically, or a data URI); the small multiples also
come as `*_figure` functions that return the `matplotlib.figure.Figure` itself. Figures are built with
`Figure` on the Agg canvas: no pyplot, no global state, nothing left open.

Colour means one thing throughout: the selection (method). `method_colors` gives each selection its
colour once, and every figure takes that mapping, so `bids` is the same colour in every plot. Tasks are
told apart by position and their x labels (or by panel), never by the method palette; greys are kept
for references (the equal-share line) and legends that are not about a method. Several selections are
drawn as small multiples: one figure, one panel per selection, shared axes, the same task order.
Layouts adapt to up to ~20 tasks (wider panels, rotated labels).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

#: At most this many strip points per task in an AID plot (a deterministic subsample beyond it).
MAX_STRIP_POINTS = 1500
#: At most this many points per column in a Q-Q plot (evenly spaced order statistics beyond it).
QQ_POINTS = 1000
DPI = 110
#: Widest comparison figure (inches): wider ones are shrunk so much on the page that their text is unreadable.
COMPARISON_WIDTH = 13.0
#: Reference lines and neutral legend entries (not a method).
NEUTRAL = "0.35"

Color = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------- colours
def _palette(n: int) -> list[Color]:
    """n distinguishable saturated colours without greys (greys are kept for references)."""
    tab10 = colormaps["tab10"]
    colors = [tab10(k) for k in range(10) if k != 7]  # tab10's grey
    if n <= len(colors):
        return colors[:n]
    tab20 = colormaps["tab20"]
    colors = [tab20(k) for k in range(20) if k not in (14, 15)]  # tab20's greys
    if n <= len(colors):
        return colors[:n]
    ring = colormaps["hsv"]
    return [ring(k / n) for k in range(n)]


def method_colors(names: Sequence[str]) -> dict[str, Color]:
    """One colour per selection, by its place in `names` (the report's order), as a name -> RGBA map.

    The same names in the same order always get the same colours; every figure of a report is drawn
    with one such map, so a method keeps its colour from plot to plot.
    """
    unique = list(dict.fromkeys(names))
    return dict(zip(unique, _palette(len(unique)), strict=True))


def _colors_for(names: Sequence[str], colors: Mapping[str, Color] | None) -> list[Color]:
    mapping = method_colors(names) if colors is None else colors
    return [to_rgba(mapping[name]) for name in names]


def _light(color: Color, amount: float = 0.35) -> Color:
    """The colour blended towards white: box fills behind the strip points."""
    r, g, b, _ = to_rgba(color)
    return (1 - amount + amount * r, 1 - amount + amount * g, 1 - amount + amount * b, 1.0)


# --------------------------------------------------------------------------------------- helpers
def _to_png(fig: Figure) -> bytes:
    """The figure drawn as PNG bytes (then cleared)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()
    return buffer.getvalue()


def _width_for(n_groups: int, per_group: float = 0.75, minimum: float = 6.5, maximum: float = 18.0) -> float:
    return float(min(maximum, max(minimum, 1.8 + per_group * n_groups)))


#: the height of a legend entry at fontsize "small", in inches, and the margin a figure keeps beside it
LEGEND_ENTRY = 0.21
LEGEND_MARGIN = 0.9


def _height_for(entries: int, minimum: float) -> float:
    """A figure's height, grown so that a legend of `entries` beside it fits: a taller legend than the figure
    would squeeze the plot into a strip."""
    return float(max(minimum, LEGEND_ENTRY * entries + LEGEND_MARGIN))


def _rotate(tasks: Sequence[str], crowded: int = 7) -> bool:
    return len(tasks) > crowded or max((len(t) for t in tasks), default=0) > 10


def _set_task_ticks(ax, tasks: Sequence[str], rotate: bool | None = None, labels: bool = True) -> None:
    """Task names under the x positions 0..K-1 (or no labels, for a panel with another below it)."""
    ax.set_xticks(np.arange(len(tasks)))
    ax.tick_params(labelbottom=labels)  # shared axes hide inner labels; a panel above a spare cell needs them
    if labels and (_rotate(tasks) if rotate is None else rotate):
        ax.set_xticklabels(tasks, rotation=35, ha="right", rotation_mode="anchor")
    elif labels:
        ax.set_xticklabels(tasks)
    ax.set_xlim(-0.6, len(tasks) - 0.4)


def _subsample(values: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if values.size <= limit:
        return values
    rng = np.random.default_rng(seed)
    return values[np.sort(rng.choice(values.size, size=limit, replace=False))]


def _grid(fig: Figure, n: int, cols: int, **share) -> list:
    """An n-panel grid of `cols` columns, row by row; the spare cells of the last row are hidden."""
    rows = -(-n // cols)
    axes = list(np.asarray(fig.subplots(rows, cols, squeeze=False, **share)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes


def _grid_columns(n: int, n_tasks: int) -> int:
    """Panels per row: up to 4 (3 when the tasks need wide panels), fewer for few selections."""
    most = 4 if n_tasks <= 10 else 3 if n_tasks <= 16 else 2
    return max(1, min(n, most))


def _panel_size(n: int, n_tasks: int, cols: int) -> tuple[float, float]:
    """(width, height) in inches of one small-multiple panel; a lone panel gets a full-size figure."""
    if n == 1:
        return _width_for(n_tasks), 3.8
    return min(max(2.7, 0.42 * n_tasks + 0.6), 17.4 / cols), 2.5


def _is_bottom(k: int, n: int, cols: int) -> bool:
    """Whether panel k of n has no visible panel below it (so it carries the x labels)."""
    return k + cols >= n


# ------------------------------------------------------------------------------------------ AID
def _aid_boxes(ax, data: Sequence[np.ndarray], color: Color, widths: float, point_size: float) -> None:
    boxes = ax.boxplot(
        data,
        positions=np.arange(len(data)),
        widths=widths,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "black", "linewidth": 1.3},
        whiskerprops={"color": "0.3"},
        capprops={"color": "0.3"},
    )
    for patch in boxes["boxes"]:
        patch.set_facecolor(_light(color))
        patch.set_edgecolor("0.3")
    for k, values in enumerate(data):
        shown = _subsample(values, MAX_STRIP_POINTS, seed=k)
        jitter = np.random.default_rng(1000 + k).uniform(-widths / 3, widths / 3, size=shown.size)
        ax.scatter(k + jitter, shown, s=point_size, color=color, alpha=0.8, linewidths=0, zorder=3)
    ax.axhline(0.0, color=NEUTRAL, linewidth=0.8, linestyle="--", zorder=1)
    ax.grid(axis="y", alpha=0.3)


def aid_panels(
    names: Sequence[str],
    per_task: Sequence[Mapping[str, np.ndarray]],
    normalized: bool = True,
    colors: Mapping[str, Color] | None = None,
) -> bytes:
    """`aid_panels_figure` as PNG bytes."""
    return _to_png(aid_panels_figure(names, per_task, normalized, colors))


def aid_panels_figure(
    names: Sequence[str],
    per_task: Sequence[Mapping[str, np.ndarray]],
    normalized: bool = True,
    colors: Mapping[str, Color] | None = None,
) -> Figure:
    """Small multiples of the AID: one panel per selection (its colour), a shared y axis and the same
    task order; in each, a box per task with its validation examples as a jittered strip."""
    tasks = list(per_task[0])
    n = len(names)
    cols = _grid_columns(n, len(tasks))
    rotate = _rotate(tasks, crowded=4)
    panel_w, panel_h = _panel_size(n, len(tasks), cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(panel_w * cols + 0.6, panel_h * rows + (1.0 if rotate else 0.6)), layout="constrained")
    axes = _grid(fig, n, cols, sharex=True, sharey=True)
    total = sum(np.asarray(per_task[0][t]).size for t in tasks)
    size = 10 if total <= 500 else 6 if total <= 3000 else 3
    for k, (ax, name, aid_s, color) in enumerate(zip(axes, names, per_task, _colors_for(names, colors),
                                                      strict=False)):
        _aid_boxes(ax, [np.asarray(aid_s[t], dtype=np.float64) for t in tasks], color, 0.6, size)
        _set_task_ticks(ax, tasks, rotate=rotate, labels=_is_bottom(k, n, cols))
        ax.set_title(name, fontsize="medium")
        if k % cols == 0:
            ax.set_ylabel("average influence" + (" (norm.)" if normalized else " (raw)"))
    fig.suptitle("AID per task" + (", one panel per selection" if n > 1 else "") + " (dots: validation examples)")
    return fig


def aid_comparison_plot(
    names: Sequence[str],
    per_task: Sequence[Mapping[str, np.ndarray]],
    normalized: bool = True,
    colors: Mapping[str, Color] | None = None,
) -> bytes:
    """Side-by-side AID boxes per task, one colour per selection (the paper's Fig. 4)."""
    tasks = list(per_task[0])
    n_sel = len(names)
    fig = Figure(figsize=(_width_for(len(tasks), per_group=0.45 + 0.3 * n_sel, maximum=COMPARISON_WIDTH),
                          _height_for(n_sel, 4.6)),
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / n_sel
    for s, (aid_s, color) in enumerate(zip(per_task, _colors_for(names, colors), strict=True)):
        positions = np.arange(len(tasks)) - 0.4 + width * (s + 0.5)
        boxes = ax.boxplot(
            [np.asarray(aid_s[t], dtype=np.float64) for t in tasks],
            positions=positions,
            widths=width * 0.85,
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "0.2", "linewidth": 0.8},
        )
        for patch in boxes["boxes"]:
            patch.set_facecolor(color)
            patch.set_edgecolor("0.25")
        boxes["boxes"][0].set_label(names[s])
        # the median as a marker in the selection's colour: visible even where a box is flat
        medians = [float(np.median(np.asarray(aid_s[t], dtype=np.float64))) for t in tasks]
        ax.scatter(positions, medians, s=22, marker="D", color=color, edgecolors="0.2", linewidths=0.6, zorder=4)
    ax.axhline(0.0, color=NEUTRAL, linewidth=0.8, linestyle="--", zorder=1)
    _set_task_ticks(ax, tasks)
    ax.set_ylabel("average influence" + (" (normalised)" if normalized else " (raw)"))
    ax.set_title("AID per task, by selection")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize="small")
    return _to_png(fig)


# ------------------------------------------------------------------------------------------ THI
def thi_panels(
    names: Sequence[str],
    task_wise: Sequence[Mapping[str, int]],
    instance_wise: Sequence[Mapping[str, int]],
    colors: Mapping[str, Color] | None = None,
) -> bytes:
    """`thi_panels_figure` as PNG bytes."""
    return _to_png(thi_panels_figure(names, task_wise, instance_wise, colors))


def thi_panels_figure(
    names: Sequence[str],
    task_wise: Sequence[Mapping[str, int]],
    instance_wise: Sequence[Mapping[str, int]],
    colors: Mapping[str, Color] | None = None,
) -> Figure:
    """Small multiples of the THI counts: one panel per selection (its colour), shared axes, the same
    task order; per task a solid bar (instance-wise) and a hatched bar (task-wise). The dotted line
    is an equal share of the selection's picks."""
    tasks = list(instance_wise[0])
    n = len(names)
    cols = _grid_columns(n, len(tasks))
    rotate = _rotate(tasks, crowded=4)
    panel_w, panel_h = _panel_size(n, len(tasks), cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(panel_w * cols + 0.6, panel_h * rows + (1.2 if rotate else 0.8)), layout="constrained")
    axes = _grid(fig, n, cols, sharex=True, sharey=True)
    x = np.arange(len(tasks))
    top = 0
    for k, (ax, name, t_counts, i_counts, color) in enumerate(
        zip(axes, names, task_wise, instance_wise, _colors_for(names, colors), strict=False)
    ):
        inst = np.array([i_counts[t] for t in tasks])
        task = np.array([t_counts[t] for t in tasks])
        top = max(top, int(inst.max(initial=0)), int(task.max(initial=0)))
        ax.bar(x - 0.2, inst, width=0.4, color=color, edgecolor="0.25", linewidth=0.5)
        ax.bar(x + 0.2, task, width=0.4, facecolor="white", edgecolor=color, hatch="////", linewidth=1.0)
        ax.axhline(sum(i_counts.values()) / len(tasks), color=NEUTRAL, linewidth=0.9, linestyle=":")
        _set_task_ticks(ax, tasks, rotate=rotate, labels=_is_bottom(k, n, cols))
        ax.set_title(name, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if k % cols == 0:
            ax.set_ylabel("number of picks")
    axes[0].set_ylim(0, max(1, top) * 1.08)
    legend = [
        Patch(facecolor=NEUTRAL, edgecolor="0.25", label="instance-wise (top validation example)"),
        Patch(facecolor="white", edgecolor=NEUTRAL, hatch="////", label="task-wise (top task mean)"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=2, frameon=False, fontsize="small")
    fig.suptitle("THI: picks per top task" + (", one panel per selection" if n > 1 else "") + " (dotted: equal share)")
    return fig


def thi_comparison_plot(
    names: Sequence[str],
    task_wise: Sequence[Mapping[str, int]],
    instance_wise: Sequence[Mapping[str, int]],
    colors: Mapping[str, Color] | None = None,
) -> bytes:
    """`thi_comparison_figure` as PNG bytes."""
    return _to_png(thi_comparison_figure(names, task_wise, instance_wise, colors))


def thi_comparison_figure(
    names: Sequence[str],
    task_wise: Sequence[Mapping[str, int]],
    instance_wise: Sequence[Mapping[str, int]],
    colors: Mapping[str, Color] | None = None,
) -> Figure:
    """THI share per task for every selection (the paper's Fig. 3): instance-wise above, task-wise below."""
    tasks = list(instance_wise[0])
    n_sel = len(names)
    width = 0.8 / n_sel
    fig = Figure(
        figsize=(_width_for(len(tasks), per_group=0.4 + 0.25 * n_sel, maximum=COMPARISON_WIDTH),
                 _height_for(n_sel + 1, 6.0)),  # the selections and the equal-share line
        layout="constrained",
    )
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    panels = (("instance-wise THI", instance_wise), ("task-wise THI", task_wise))
    for ax, (panel, counts_list) in zip(axes, panels, strict=True):
        for s, (counts, color) in enumerate(zip(counts_list, _colors_for(names, colors), strict=True)):
            total = max(1, sum(counts.values()))
            shares = np.array([counts[t] / total for t in tasks])
            ax.bar(np.arange(len(tasks)) - 0.4 + width * (s + 0.5), 100 * shares, width=width,
                   color=color, edgecolor="0.25", linewidth=0.4, label=names[s])
        ax.axhline(100 / len(tasks), color=NEUTRAL, linewidth=0.9, linestyle=":", label="equal share")
        ax.set_ylabel("share of picks (%)")
        ax.set_title(panel)
        ax.grid(axis="y", alpha=0.3)
    _set_task_ticks(axes[1], tasks)
    # one legend for both panels, beside the figure: on the upper panel alone it would stretch that panel's row
    # to the legend's height and leave a gap between the panels
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize="small")
    return fig


# ------------------------------------------------------------------------------------- coverage
def coverage_limits(top: float) -> tuple[float, float]:
    """y limits (in %) for shares up to `top` %: headroom on both sides, so lines at 0 % and at the
    top (100 % included) are drawn inside the frame rather than on it."""
    high = max(float(top), 1.0)
    pad = max(2.0, 0.06 * high)
    return -pad, high + pad


def coverage_plot(
    names: Sequence[str], coverages: Sequence[Mapping], colors: Mapping[str, Color] | None = None
) -> bytes:
    """`coverage_figure` as PNG bytes."""
    return _to_png(coverage_figure(names, coverages, colors))


def coverage_figure(
    names: Sequence[str], coverages: Sequence[Mapping], colors: Mapping[str, Color] | None = None
) -> Figure:
    """One panel per task (shared axes): the task's instance-wise THI share against the number of
    picks, one line per selection in its colour; the dotted line is an equal share."""
    tasks = list(coverages[0]["thi_share"])
    n_tasks = len(tasks)
    cols = max(1, min(n_tasks, 4))
    rows = -(-n_tasks // cols)
    spare = rows * cols - n_tasks
    fig = Figure(figsize=(3.1 * cols + (0.2 if spare else 2.2), 2.35 * rows + 0.5), layout="constrained")
    axes = _grid(fig, n_tasks, cols, sharex=True, sharey=True)
    top = 0.0
    for k, (ax, task) in enumerate(zip(axes, tasks, strict=False)):
        for name, cov, color in zip(names, coverages, _colors_for(names, colors), strict=True):
            share = 100 * np.asarray(cov["thi_share"][task], dtype=np.float64)
            top = max(top, float(share.max(initial=0.0)))
            ax.plot(np.asarray(cov["sizes"]), share, color=color, linewidth=1.6, label=name)
        ax.axhline(100 / n_tasks, color=NEUTRAL, linewidth=0.9, linestyle=":")
        ax.set_title(task, fontsize="medium")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.tick_params(labelbottom=_is_bottom(k, n_tasks, cols))
        if _is_bottom(k, n_tasks, cols):
            ax.set_xlabel("number of picks")
        if k % cols == 0:
            ax.set_ylabel("THI share (%)")
    axes[0].set_xlim(left=0)
    axes[0].set_ylim(*coverage_limits(top))
    handles, labels = axes[0].get_legend_handles_labels()
    if spare:  # the legend fills the first spare cell of the grid
        holder = axes[n_tasks]
        holder.set_visible(True)
        holder.axis("off")
        holder.legend(handles, labels, loc="center", frameon=False, fontsize="small",
                      ncols=1 if len(names) <= 10 else 2)
    else:
        fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize="small")
    fig.suptitle("Instance-wise THI share of each task as the selection grows (dotted: equal share)")
    return fig


# -------------------------------------------------------------------------------------- overlap
def overlap_plot(names: Sequence[str], similarity: np.ndarray) -> bytes:
    """Heatmap of the pairwise Jaccard similarity between selections, with the values written in."""
    n = len(names)
    side = min(9.0, max(4.0, 0.5 * n + 2.8))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(similarity, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(np.arange(n))
    ax.set_yticks(np.arange(n))
    ax.set_xticklabels(names, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(names)
    fontsize = "medium" if n <= 6 else "small" if n <= 10 else "x-small"
    for i in range(n):
        for j in range(n):
            value = float(similarity[i, j])
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize,
                    color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="Jaccard similarity", shrink=0.8)
    ax.set_title("Overlap between selections")
    return _to_png(fig)


def zscore_column_choice(tasks: Sequence[str], per_task: int = 5) -> np.ndarray:
    """Indices of up to `per_task` evenly spaced validation columns of each task, tasks in order of appearance:
    the columns the Q-Q figure draws (read them alone from a large matrix, then pass them with their tasks)."""
    task_array = np.asarray(tasks)
    chosen = []
    for task in dict.fromkeys(tasks):
        columns = np.flatnonzero(task_array == task)
        picked = np.unique(np.linspace(0, len(columns) - 1, min(per_task, len(columns))).round().astype(int))
        chosen.extend(columns[picked].tolist())
    return np.asarray(chosen, dtype=np.int64)


def zscore_columns(scores: np.ndarray, tasks: Sequence[str], per_task: int = 5) -> dict[str, list[np.ndarray]]:
    """For up to `per_task` evenly spaced validation columns of each task, the column's values after BIDS's
    column normalisation (z = (a - mean) / population std); constant columns are skipped."""
    out: dict[str, list[np.ndarray]] = {}
    for j in zscore_column_choice(tasks, per_task).tolist():
        column = np.asarray(scores[:, j], dtype=np.float64)
        sd = column.std()
        if sd > 0:
            out.setdefault(tasks[j], []).append((column - column.mean()) / sd)
    return out


def qq_points(z: np.ndarray, limit: int = QQ_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(standard normal quantiles, sorted values) of a column at up to `limit` evenly spaced order statistics,
    the smallest and largest included: the Q-Q line of a million values, drawn with a thousand points."""
    from statistics import NormalDist

    n = z.size
    ranks = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(np.int64))
    normal = NormalDist()
    expected = np.array([normal.inv_cdf((k + 0.5) / n) for k in ranks.tolist()])
    return expected, np.sort(z)[ranks]


def zscore_fit_figure(scores: np.ndarray, tasks: Sequence[str], per_task: int = 5) -> bytes:
    """BIDS paper Appendix A.4 / Figure 5: does the z-score fit the influence columns? One panel per task:
    the quantiles of each normalised column against the standard normal's (a Q-Q plot; on the diagonal when
    the column is normal; at most QQ_POINTS points per column), with the columns' pooled skewness and excess
    kurtosis (of all their values) in the title. One column is normalised at a time, so a pool of a million
    rows costs a few columns' memory."""
    panels: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    moments: dict[str, list[float]] = {}  # per task: count, sum z^3, sum z^4, max |z|
    for j in zscore_column_choice(tasks, per_task).tolist():
        column = np.asarray(scores[:, j], dtype=np.float64)
        sd = column.std()
        if not sd > 0:
            continue
        z = (column - column.mean()) / sd
        panels.setdefault(tasks[j], []).append(qq_points(z))
        m = moments.setdefault(tasks[j], [0.0, 0.0, 0.0, 0.0])
        m[0] += z.size
        m[1] += float(np.sum(z**3))
        m[2] += float(np.sum(z**4))
        m[3] = max(m[3], float(np.abs(z).max()))
    names = list(panels)
    cols = min(len(names), 4) or 1
    rows = math.ceil(len(names) / cols) or 1
    fig = Figure(figsize=(3.2 * cols + 0.6, 3.0 * rows + 0.6), layout="constrained")
    axes = _grid(fig, max(len(names), 1), cols, sharex=True, sharey=True)
    for ax, task in zip(axes, names, strict=False):
        for expected, observed in panels[task]:
            ax.plot(expected, observed, ".", markersize=2, alpha=0.7)
        count, cubes, fourths, biggest = moments[task]
        lim = max(3.0, biggest)
        ax.plot([-lim, lim], [-lim, lim], color="0.3", linewidth=0.8, linestyle="--")
        ax.set_title(f"{task}: skew {cubes / count:.2f}, ex. kurt {fourths / count - 3.0:.2f}", fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.supxlabel("standard normal quantile")
    fig.supylabel("normalised influence quantile")
    return _to_png(fig)
