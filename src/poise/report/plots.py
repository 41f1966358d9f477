"""The report's figures, drawn with matplotlib's object API and returned as PNG bytes.

Every function takes plain data (task names, arrays, counts) and returns the encoded PNG, so the
caller decides where it goes (a file written atomically, or a data URI). Figures are built with
`matplotlib.figure.Figure` on the Agg canvas: no pyplot, no global state, nothing left open.
Layouts adapt to up to ~20 tasks (wider figures, rotated labels, a 20-colour palette).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

#: At most this many strip points per task in an AID plot (a deterministic subsample beyond it).
MAX_STRIP_POINTS = 1500
DPI = 110


# --------------------------------------------------------------------------------------- helpers
def task_colors(n: int) -> list[tuple[float, float, float, float]]:
    """n distinguishable colours: tab10 up to 10, tab20 up to 20, then an evenly spaced hue ring."""
    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(k) for k in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(k) for k in range(n)]
    cmap = colormaps["hsv"]
    return [cmap(k / n) for k in range(n)]


def selection_colors(n: int) -> list[tuple[float, float, float, float]]:
    cmap = colormaps["Set2" if n <= 8 else "tab20"]
    return [cmap(k % cmap.N) for k in range(n)]


def _to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()
    return buffer.getvalue()


def _width_for(n_groups: int, per_group: float = 0.75, minimum: float = 6.5, maximum: float = 18.0) -> float:
    return float(min(maximum, max(minimum, 1.8 + per_group * n_groups)))


def _set_task_ticks(ax, tasks: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(tasks)))
    longest = max((len(t) for t in tasks), default=0)
    if len(tasks) > 7 or longest > 10:
        ax.set_xticklabels(tasks, rotation=35, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticklabels(tasks)
    ax.set_xlim(-0.6, len(tasks) - 0.4)


def _subsample(values: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if values.size <= limit:
        return values
    rng = np.random.default_rng(seed)
    return values[np.sort(rng.choice(values.size, size=limit, replace=False))]


# ------------------------------------------------------------------------------------------ AID
def aid_plot(per_task: Mapping[str, np.ndarray], title: str, normalized: bool = True) -> bytes:
    """Box plot of the AID per task with the individual validation examples as a jittered strip."""
    tasks = list(per_task)
    colors = task_colors(len(tasks))
    fig = Figure(figsize=(_width_for(len(tasks)), 4.6), layout="constrained")
    ax = fig.add_subplot()
    data = [np.asarray(per_task[t], dtype=np.float64) for t in tasks]
    boxes = ax.boxplot(
        data,
        positions=np.arange(len(tasks)),
        widths=0.55,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "black", "linewidth": 1.4},
    )
    for patch, color in zip(boxes["boxes"], colors, strict=True):
        patch.set_facecolor((*color[:3], 0.25))
        patch.set_edgecolor(color)
    total = sum(d.size for d in data)
    size = 14 if total <= 500 else 8 if total <= 3000 else 4
    for k, (values, color) in enumerate(zip(data, colors, strict=True)):
        shown = _subsample(values, MAX_STRIP_POINTS, seed=k)
        jitter = np.random.default_rng(1000 + k).uniform(-0.2, 0.2, size=shown.size)
        ax.scatter(k + jitter, shown, s=size, color=color, alpha=0.75, linewidths=0, zorder=3)
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--", zorder=1)
    _set_task_ticks(ax, tasks)
    ax.set_ylabel("average influence" + (" (normalised)" if normalized else " (raw)"))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _to_png(fig)


def aid_comparison_plot(
    names: Sequence[str], per_task: Sequence[Mapping[str, np.ndarray]], normalized: bool = True
) -> bytes:
    """Side-by-side AID boxes per task, one colour per selection (the paper's Fig. 4)."""
    tasks = list(per_task[0])
    n_sel = len(names)
    colors = selection_colors(n_sel)
    fig = Figure(figsize=(_width_for(len(tasks), per_group=0.45 + 0.3 * n_sel), 4.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / n_sel
    for s, (aid_s, color) in enumerate(zip(per_task, colors, strict=True)):
        positions = np.arange(len(tasks)) - 0.4 + width * (s + 0.5)
        boxes = ax.boxplot(
            [np.asarray(aid_s[t], dtype=np.float64) for t in tasks],
            positions=positions,
            widths=width * 0.85,
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "black", "linewidth": 1.2},
        )
        for patch in boxes["boxes"]:
            patch.set_facecolor(color)
            patch.set_edgecolor("0.25")
        boxes["boxes"][0].set_label(names[s])
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--", zorder=1)
    _set_task_ticks(ax, tasks)
    ax.set_ylabel("average influence" + (" (normalised)" if normalized else " (raw)"))
    ax.set_title("AID per task, by selection")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize="small")
    return _to_png(fig)


# ------------------------------------------------------------------------------------------ THI
def thi_plot(task_wise: Mapping[str, int], instance_wise: Mapping[str, int], title: str) -> bytes:
    """Grouped bars per task: how many picks have it as their top task, task-wise and instance-wise."""
    tasks = list(instance_wise)
    n = max(1, sum(instance_wise.values()))
    fig = Figure(figsize=(_width_for(len(tasks)), 4.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(tasks))
    series = (("task-wise (mean over the task)", task_wise, "#4c72b0"),
              ("instance-wise (top example)", instance_wise, "#dd8452"))
    for s, (label, counts, color) in enumerate(series):
        heights = np.array([counts[t] for t in tasks], dtype=np.float64)
        bars = ax.bar(x - 0.2 + 0.4 * s, heights, width=0.4, color=color, label=label)
        if len(tasks) <= 10:
            ax.bar_label(bars, labels=[f"{h / n:.0%}" for h in heights], fontsize="x-small", padding=1)
    _set_task_ticks(ax, tasks)
    ax.set_ylabel(f"number of picks (of {n})")
    ax.set_title(title)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", frameon=False, fontsize="small")
    return _to_png(fig)


def thi_comparison_plot(
    names: Sequence[str], task_wise: Sequence[Mapping[str, int]], instance_wise: Sequence[Mapping[str, int]]
) -> bytes:
    """THI share per task for every selection (the paper's Fig. 3): instance-wise above, task-wise below."""
    tasks = list(instance_wise[0])
    n_sel = len(names)
    colors = selection_colors(n_sel)
    width = 0.8 / n_sel
    fig = Figure(
        figsize=(_width_for(len(tasks), per_group=0.4 + 0.25 * n_sel), 7.2), layout="constrained"
    )
    axes = fig.subplots(2, 1, sharex=True)
    panels = (("instance-wise THI", instance_wise), ("task-wise THI", task_wise))
    for ax, (panel, counts_list) in zip(axes, panels, strict=True):
        for s, (counts, color) in enumerate(zip(counts_list, colors, strict=True)):
            total = max(1, sum(counts.values()))
            shares = np.array([counts[t] / total for t in tasks])
            ax.bar(np.arange(len(tasks)) - 0.4 + width * (s + 0.5), 100 * shares, width=width,
                   color=color, edgecolor="0.25", linewidth=0.4, label=names[s])
        ax.axhline(100 / len(tasks), color="0.4", linewidth=0.8, linestyle=":", label="equal share")
        ax.set_ylabel("share of picks (%)")
        ax.set_title(panel)
        ax.grid(axis="y", alpha=0.3)
    _set_task_ticks(axes[1], tasks)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize="small")
    return _to_png(fig)


# ------------------------------------------------------------------------------------- coverage
def coverage_plot(names: Sequence[str], coverages: Sequence[Mapping]) -> bytes:
    """One panel per selection: instance-wise THI share of every task against the number of picks."""
    tasks = list(coverages[0]["thi_share"])
    colors = task_colors(len(tasks))
    n_sel = len(names)
    cols = min(3, n_sel)
    rows = -(-n_sel // cols)
    fig = Figure(figsize=(4.4 * cols + 1.8, 3.4 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
    top = 0.0
    for ax, name, cov in zip(axes, names, coverages, strict=False):
        sizes = np.asarray(cov["sizes"])
        for task, color in zip(tasks, colors, strict=True):
            share = 100 * np.asarray(cov["thi_share"][task])
            top = max(top, float(share.max(initial=0.0)))
            ax.plot(sizes, share, color=color, linewidth=1.5, label=task)
        ax.axhline(100 / len(tasks), color="0.4", linewidth=0.8, linestyle=":")
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("number of picks")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    for ax in axes[n_sel:]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("THI share (%)")
    axes[0].set_ylim(0, min(100.0, top * 1.08 + 1))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize="small",
               ncols=1 if len(tasks) <= 12 else 2)
    fig.suptitle("Instance-wise THI share per task as the selection grows")
    return _to_png(fig)


# -------------------------------------------------------------------------------------- overlap
def overlap_plot(names: Sequence[str], similarity: np.ndarray) -> bytes:
    """Heatmap of the pairwise Jaccard similarity between selections, with the values written in."""
    n = len(names)
    side = min(12.0, max(4.5, 1.1 * n + 2.5))
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
