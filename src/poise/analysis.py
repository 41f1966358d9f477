"""Analyses of a selection: what its picks do to every validation example and task.

These are the two diagnostics of the BIDS paper (arXiv 2501.12147, Sections 3 and 6.2) that show
*why* plain influence selection is unbalanced and what BIDS changes, plus two that compare methods:

- AID (Average Influence Distribution): the mean of the selected rows of A (or of the
  column-normalised A'), one value per validation example, read per task (paper Fig. 1 and 4).
- THI (Task frequency with Highest Influence): for every pick, the task it helps most - task-wise
  (Section 3) or instance-wise (Section 6.2) - counted per task (paper Fig. 2 and 3).
- coverage: the instance-wise THI share and mean influence of every task as the selection grows.
- overlap: Jaccard similarity between the selections of different methods.

Everything here is plain numpy over an `AttributionMatrix` and row indices, so it runs on any
matrix (including a memory-mapped one, gathered in bounded chunks) and knows nothing of plotting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from poise.errors import PoiseError
from poise.matrix import CHUNK_ROWS, AttributionMatrix

__all__ = [
    "Profile", "aid", "aid_by_task", "coverage", "jaccard", "overlap", "profile", "task_summary", "thi",
]

ThiMode = Literal["task", "instance"]

#: Upper bound on float64 values held per gathered block (rows x columns), about 32 MB.
_BLOCK_VALUES = 1 << 22


class HasIndices(Protocol):
    """Anything with picked row indices - a `poise.selection.Selection` in practice."""

    indices: Any


# --------------------------------------------------------------------------------------- helpers
def _as_indices(matrix: AttributionMatrix, indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """Row indices as a 1-D int64 array, checked against the matrix."""
    rows = np.asarray(indices)
    if rows.ndim != 1:
        raise PoiseError(f"row indices must be 1-D, got shape {tuple(rows.shape)}")
    if rows.size == 0:
        return rows.astype(np.int64)
    if rows.dtype.kind not in "iu":
        raise PoiseError(f"row indices must be integers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64)
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= matrix.n_rows:
        bad = low if low < 0 else high
        raise PoiseError(
            f"row index {bad} is outside the matrix ({matrix.n_rows} rows); "
            "was the selection made on a different matrix?"
        )
    return rows


def _chunk_rows(matrix: AttributionMatrix) -> int:
    return max(1, min(CHUNK_ROWS, _BLOCK_VALUES // max(1, matrix.n_columns)))


def _blocks(
    matrix: AttributionMatrix, rows: np.ndarray, normalized: bool
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (offset into `rows`, float64 block of those rows), raw or normalised, in `rows` order."""
    step = _chunk_rows(matrix)
    for start in range(0, rows.size, step):
        part = rows[start : start + step]
        if normalized:
            block = matrix.normalized_rows(part).astype(np.float64)
        else:
            block = matrix.read_rows(part).astype(np.float64)
        yield start, block


def _task_means(block: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
    """(rows, K): per row, the mean over each task's columns."""
    return np.stack([block[:, cols].mean(axis=1) for cols in columns], axis=1)


def _scan(
    matrix: AttributionMatrix, rows: np.ndarray, normalized: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the rows: column sums (V,), instance-wise and task-wise THI counts (K,)."""
    task_of_column = matrix.task_index
    columns = list(matrix.task_columns().values())
    n_tasks = len(columns)
    total = np.zeros(matrix.n_columns, dtype=np.float64)
    by_instance = np.zeros(n_tasks, dtype=np.int64)
    by_task = np.zeros(n_tasks, dtype=np.int64)
    for _, block in _blocks(matrix, rows, normalized):
        total += block.sum(axis=0)
        by_instance += np.bincount(task_of_column[np.argmax(block, axis=1)], minlength=n_tasks)
        by_task += np.bincount(np.argmax(_task_means(block, columns), axis=1), minlength=n_tasks)
    return total, by_instance, by_task


def _counts_dict(matrix: AttributionMatrix, counts: np.ndarray) -> dict[str, int]:
    return {name: int(n) for name, n in zip(matrix.task_names, counts, strict=True)}


# --------------------------------------------------------------------------------------- profile
@dataclass
class Profile:
    """AID and both THI counts of one selection, from a single pass over its rows."""

    aid: np.ndarray  # (V,) float64: mean of the selected rows (raw or normalised)
    thi_task: dict[str, int]  # task-wise THI counts, every task a key, in `task_names` order
    thi_instance: dict[str, int]  # instance-wise THI counts
    n_picks: int
    normalized: bool

    def summary(self, matrix: AttributionMatrix) -> dict[str, dict[str, float]]:
        """Per task: mean AID over its columns and both THI shares (see `task_summary`).

        The "mean_normalized_influence" key holds raw influence if the profile was made raw.
        """
        out: dict[str, dict[str, float]] = {}
        for name, cols in matrix.task_columns().items():
            out[name] = {
                "mean_normalized_influence": float(self.aid[cols].mean()),
                "thi_share": self.thi_instance[name] / self.n_picks,
                "thi_task_share": self.thi_task[name] / self.n_picks,
            }
        return out


def profile(
    matrix: AttributionMatrix, indices: np.ndarray | Sequence[int], normalized: bool = True
) -> Profile:
    """AID, task-wise and instance-wise THI of the selected rows in one pass (see `aid` and `thi`)."""
    rows = _as_indices(matrix, indices)
    if rows.size == 0:
        raise PoiseError("the AID of an empty selection is undefined (no rows selected)")
    total, by_instance, by_task = _scan(matrix, np.sort(rows), normalized)
    return Profile(
        aid=total / rows.size,
        thi_task=_counts_dict(matrix, by_task),
        thi_instance=_counts_dict(matrix, by_instance),
        n_picks=int(rows.size),
        normalized=normalized,
    )


# ------------------------------------------------------------------------------------------- AID
def aid(
    matrix: AttributionMatrix, indices: np.ndarray | Sequence[int], normalized: bool = True
) -> np.ndarray:
    """Average Influence Distribution of the selected rows: (V,) float64, one value per column.

    AID = (1/|T|) sum_{i in T} A_i (paper Section 3). With `normalized` (the default, as in the
    paper's Section 6.2 comparison) the rows are taken from the column-normalised matrix
    A' = (A - mu_j) / sigma_j, so tasks with large raw influence scales do not dominate the picture.
    Rows are gathered in bounded chunks (the matrix may be a memmap) and summed in float64.
    """
    rows = _as_indices(matrix, indices)
    if rows.size == 0:
        raise PoiseError("the AID of an empty selection is undefined (no rows selected)")
    total = np.zeros(matrix.n_columns, dtype=np.float64)
    for _, block in _blocks(matrix, np.sort(rows), normalized):
        total += block.sum(axis=0)
    return total / rows.size


def aid_by_task(matrix: AttributionMatrix, values: np.ndarray) -> dict[str, np.ndarray]:
    """Split a per-column vector (an AID) by task: {task: its columns' values}, in `task_names` order."""
    values = np.asarray(values)
    if values.shape != (matrix.n_columns,):
        raise PoiseError(
            f"expected one value per validation column ({matrix.n_columns}), got shape {tuple(values.shape)}"
        )
    return {name: values[cols] for name, cols in matrix.task_columns().items()}


# ------------------------------------------------------------------------------------------- THI
def thi(
    matrix: AttributionMatrix,
    indices: np.ndarray | Sequence[int],
    mode: ThiMode = "instance",
    normalized: bool = True,
) -> dict[str, int]:
    """Task frequency with Highest Influence: {task: number of picks whose top task it is}.

    mode="task" (paper Section 3): a pick counts for argmax_k of its *mean* influence over the
    columns of task k. The paper writes the per-task sum; the mean is the same argmax when every
    task has the same number of validation columns, and does not favour tasks that merely have
    more columns when they differ.
    mode="instance" (paper Section 6.2, the default): a pick counts for the task of its single most
    influenced column, argmax_j A_ij.

    Ties go to the first task (resp. the first column). Every task is a key (0 when never the top);
    the counts sum to the number of picks. `normalized` uses A' instead of A.
    """
    if mode not in ("task", "instance"):
        raise PoiseError(f"unknown THI mode {mode!r}; use 'task' or 'instance'")
    rows = _as_indices(matrix, indices)
    _, by_instance, by_task = _scan(matrix, rows, normalized)
    return _counts_dict(matrix, by_task if mode == "task" else by_instance)


# -------------------------------------------------------------------------------------- coverage
def _prefix_sizes(n: int, points: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    points = max(1, int(points))
    sizes = np.rint(np.linspace(n / points, n, points)).astype(np.int64)
    return np.unique(np.clip(sizes, 1, n))


def coverage(
    matrix: AttributionMatrix,
    indices: np.ndarray | Sequence[int],
    points: int = 50,
    normalized: bool = True,
) -> dict[str, Any]:
    """How each task is served as the selection grows, at about `points` prefix lengths k.

    Returns {"sizes": [k, ...] (increasing, the last is len(indices)),
             "thi_share": {task: [instance-wise THI count among the first k picks / k, ...]},
             "mean_influence": {task: [mean over the task's columns of the AID of the first k picks]}}.
    Picks are read once in pick order with running sums, not re-gathered per prefix.
    """
    rows = _as_indices(matrix, indices)
    names = matrix.task_names
    sizes = _prefix_sizes(rows.size, points)
    task_of_column = matrix.task_index
    columns = list(matrix.task_columns().values())
    n_tasks = len(names)
    counts = np.zeros(n_tasks, dtype=np.int64)  # instance-wise THI counts so far
    sums = np.zeros(n_tasks, dtype=np.float64)  # sum over rows so far of each task's mean influence
    share_at = np.zeros((sizes.size, n_tasks), dtype=np.float64)
    influence_at = np.zeros((sizes.size, n_tasks), dtype=np.float64)
    for start, block in _blocks(matrix, rows, normalized):
        stop = start + block.shape[0]
        top = np.zeros((block.shape[0], n_tasks), dtype=np.int64)
        top[np.arange(block.shape[0]), task_of_column[np.argmax(block, axis=1)]] = 1
        running_counts = counts + np.cumsum(top, axis=0)
        running_sums = sums + np.cumsum(_task_means(block, columns), axis=0)
        here = np.flatnonzero((sizes > start) & (sizes <= stop))
        local = sizes[here] - start - 1
        share_at[here] = running_counts[local] / sizes[here, None]
        influence_at[here] = running_sums[local] / sizes[here, None]
        counts = running_counts[-1]
        sums = running_sums[-1]
    return {
        "sizes": [int(k) for k in sizes],
        "thi_share": {name: share_at[:, k].tolist() for k, name in enumerate(names)},
        "mean_influence": {name: influence_at[:, k].tolist() for k, name in enumerate(names)},
    }


# --------------------------------------------------------------------------------------- overlap
def jaccard(a: np.ndarray | Sequence[int], b: np.ndarray | Sequence[int]) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets (duplicates ignored); two empty sets give 1.0."""
    set_a = np.unique(np.asarray(a, dtype=np.int64))
    set_b = np.unique(np.asarray(b, dtype=np.int64))
    union = np.union1d(set_a, set_b).size
    if union == 0:
        return 1.0
    return float(np.intersect1d(set_a, set_b, assume_unique=True).size / union)


def overlap(index_lists: Sequence[np.ndarray | Sequence[int]]) -> np.ndarray:
    """(L, L) symmetric matrix of pairwise Jaccard similarities; the diagonal is 1."""
    n = len(index_lists)
    out = np.eye(n, dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = jaccard(index_lists[i], index_lists[j])
    return out


# --------------------------------------------------------------------------------------- summary
def task_summary(
    matrix: AttributionMatrix, selection: HasIndices | np.ndarray | Sequence[int]
) -> dict[str, dict[str, float]]:
    """Per task (in `task_names` order), from one pass over the picks of the normalised matrix:

    - "mean_normalized_influence": mean of the normalised AID over the task's columns,
    - "thi_share": instance-wise THI count / number of picks,
    - "thi_task_share": task-wise THI count / number of picks.
    """
    indices = selection.indices if hasattr(selection, "indices") else selection
    rows = _as_indices(matrix, indices)
    if rows.size == 0:
        raise PoiseError("cannot summarise an empty selection (no rows selected)")
    return profile(matrix, rows, normalized=True).summary(matrix)
