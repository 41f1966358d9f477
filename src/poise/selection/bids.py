"""BIDS: iterative selection favouring under-represented validation instances (exact, fast).

Algorithm 1 of the BIDS paper picks, B times, the unselected row i maximising max_j (A'_ij - m_j),
where A' is the column-normalised matrix and m the mean of the rows already picked (0 when none are).
The naive loop costs O(B * N * V). Because m_j is shared by all rows of column j, the best candidate of
a column is simply its best unselected row, so

    max_i max_j (A'_ij - m_j) = max_j (max_{i unselected} A'_ij - m_j).

We keep, for each column, a sorted prefix of its rows (descending value) and a pointer to its best
unselected row. One step is a vector operation over the V column heads, a float64 update of the running
sum and advancing the pointers that pointed at the picked row. Total O(N * V + B * V).

Preparation never sorts or transposes the whole matrix (at N=288K, V=350 that alone costs seconds):
per-column thresholds come from a row sample, one streaming pass collects every entry at or above its
column's threshold, and those few are sorted. Normalisation is monotone within a column, so the raw
order is a valid order of A'. A column whose pointer runs past its prefix gets a prefix twice as long.

Exactness: the result equals the naive loop pick for pick, including ties. A tie in the gain can come
from equal values or from two different float32 values that round to the same float64 difference; the
rows of a column whose gain equals the maximum sit contiguously from its head on, so we scan that short
run and take the lowest row index, as the naive `argmax` over rows does. Because ties are settled by
that scan, the order among equal values inside a prefix does not matter, and a pointer is re-derived
(first unselected position) whenever its prefix is rebuilt.
"""

from __future__ import annotations

import math

import numpy as np

from poise.matrix import CHUNK_ROWS, AttributionMatrix
from poise.selection.registry import Context, Picks, register

#: Rows sampled to place the per-column thresholds.
SAMPLE_ROWS = 16384
#: Initial prefix length per column: MIN_PREFIX + PREFIX_FACTOR * (picks per column).
MIN_PREFIX = 256
PREFIX_FACTOR = 4


class _Prefixes:
    """Per-column sorted prefixes (row indices, float64 values as the selection sees them)."""

    def __init__(self, matrix: AttributionMatrix, normalize: bool, budget: int):
        self.raw = matrix.scores
        self.n, self.v = matrix.n_rows, matrix.n_columns
        stats = matrix.column_stats() if normalize else None
        if stats is not None:
            self.mean = stats.mean
            self.safe = np.where(stats.zero_variance, 1.0, stats.std)
            self.zero = stats.zero_variance
        # expected prefix length: a few times the picks per column, enough that growth is rare
        target = min(self.n, MIN_PREFIX + PREFIX_FACTOR * math.ceil(budget / self.v))
        thresholds = self._thresholds(target)
        rows_parts, cols_parts, vals_parts = [], [], []
        for start in range(0, self.n, CHUNK_ROWS):
            block = np.asarray(self.raw[start : start + CHUNK_ROWS])
            r, c = np.nonzero(block >= thresholds)
            rows_parts.append(r + start)
            cols_parts.append(c)
            vals_parts.append(block[r, c])
        rows = np.concatenate(rows_parts)
        cols = np.concatenate(cols_parts)
        raw_vals = np.concatenate(vals_parts)
        order = np.lexsort((-raw_vals, cols))  # by column, then value descending
        rows, cols, raw_vals = rows[order], cols[order], raw_vals[order]
        values = self._values(raw_vals, cols)
        bounds = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=self.v))])
        self.orders = [rows[bounds[j] : bounds[j + 1]] for j in range(self.v)]
        self.values = [values[bounds[j] : bounds[j + 1]] for j in range(self.v)]
        self.grown = 0

    def _thresholds(self, target: int) -> np.ndarray:
        if target >= self.n:
            return np.full(self.v, -np.inf, dtype=np.float32)
        size = min(self.n, SAMPLE_ROWS)
        sample_rows = np.unique(np.linspace(0, self.n - 1, size).astype(np.int64))
        sample = np.asarray(self.raw[sample_rows])
        size = sample.shape[0]
        rank = min(size, max(1, math.ceil(size * target / self.n)))  # from the top
        return np.partition(sample, size - rank, axis=0)[size - rank]

    def _values(self, raw_vals: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float64 of the values BIDS compares: normalised exactly as `normalize_block` does."""
        if not hasattr(self, "mean"):
            return raw_vals.astype(np.float64)
        out = ((raw_vals.astype(np.float64) - self.mean[cols]) / self.safe[cols]).astype(np.float32)
        out[self.zero[cols]] = 0.0
        return out.astype(np.float64)

    def complete(self, j: int) -> bool:
        return self.orders[j].shape[0] == self.n

    def grow(self, j: int) -> None:
        """Rebuild column j's prefix at least twice as long (all of it once that reaches N)."""
        self.grown += 1
        column = np.asarray(self.raw[:, j])
        want = 2 * self.orders[j].shape[0]
        if want >= self.n:
            idx = np.argsort(-column, kind="stable")
        else:
            cut = np.partition(column, self.n - want)[self.n - want]
            idx = np.flatnonzero(column >= cut)
            idx = idx[np.argsort(-column[idx], kind="stable")]
        self.orders[j] = idx
        self.values[j] = self._values(column[idx], np.full(idx.shape[0], j))


def _row_reader(matrix: AttributionMatrix, normalize: bool):
    """Function row -> float32 (V,) values of the matrix BIDS sees (bit-identical to normalize_block)."""
    raw = matrix.scores
    if not normalize:
        return lambda r: np.asarray(raw[r], dtype=np.float32)
    stats = matrix.column_stats()
    mean, zero = stats.mean, stats.zero_variance
    safe = np.where(zero, 1.0, stats.std)
    wide = np.empty(matrix.n_columns, dtype=np.float64)
    narrow = np.empty(matrix.n_columns, dtype=np.float32)
    any_zero = bool(zero.any())

    def read(r: int) -> np.ndarray:
        np.subtract(raw[r], mean, out=wide)
        np.divide(wide, safe, out=wide)
        narrow[:] = wide
        if any_zero:
            narrow[zero] = 0.0
        return narrow

    return read


def bids_fast(matrix: AttributionMatrix, budget: int, normalize: bool = True, progress=None) -> Picks:
    """Exact fast BIDS (see module docstring). Returns picks in order with gain and argmax column."""
    n, v = matrix.n_rows, matrix.n_columns
    pre = _Prefixes(matrix, normalize, budget)
    read_row = _row_reader(matrix, normalize)

    ptr = np.zeros(v, dtype=np.int64)
    head_row = np.array([o[0] for o in pre.orders], dtype=np.int64)
    head_val = np.array([x[0] for x in pre.values], dtype=np.float64)
    selected = np.zeros(n, dtype=bool)
    running = np.zeros(v, dtype=np.float64)  # sum of the picked rows, float64
    mean = np.zeros(v, dtype=np.float64)
    gains = np.empty(v, dtype=np.float64)
    rows = np.empty(budget, dtype=np.int64)
    best_gains = np.empty(budget, dtype=np.float64)
    served = np.empty(budget, dtype=np.int64)

    def reset(j: int) -> None:
        """Point column j at its first unselected row, growing its prefix as needed."""
        while True:
            unselected = np.flatnonzero(~selected[pre.orders[j]])
            if unselected.size or pre.complete(j):
                break
            pre.grow(j)
        if not unselected.size:  # every row is selected
            head_val[j] = -np.inf
            return
        p = int(unselected[0])
        ptr[j], head_row[j], head_val[j] = p, pre.orders[j][p], pre.values[j][p]

    def lowest_tied_row(j: int, best: float) -> int:
        """Lowest unselected row of column j whose gain equals `best` (its head has that gain)."""
        while True:
            order_j, values_j, m_j = pre.orders[j], pre.values[j], mean[j]
            row = int(order_j[ptr[j]])
            q = int(ptr[j]) + 1
            while q < order_j.shape[0]:
                r = int(order_j[q])
                if not selected[r]:
                    if values_j[q] - m_j != best:
                        return row
                    row = min(row, r)
                q += 1
            if pre.complete(j):
                return row
            pre.grow(j)  # the run of equal gains reaches the end of the prefix
            reset(j)

    for t in range(budget):
        if t:
            np.divide(running, t, out=mean)
        np.subtract(head_val, mean, out=gains)
        j_first = int(gains.argmax())
        best = gains[j_first]
        pick_row, pick_col = -1, -1
        for j in (np.flatnonzero(gains[j_first:] == best) + j_first).tolist():
            row = lowest_tied_row(j, best)
            if pick_row < 0 or row < pick_row:
                pick_row, pick_col = row, j
        rows[t], best_gains[t], served[t] = pick_row, best, pick_col
        selected[pick_row] = True
        running += read_row(pick_row)
        for j in np.flatnonzero(head_row == pick_row).tolist():
            order_j = pre.orders[j]
            p = int(ptr[j]) + 1
            while p < order_j.shape[0] and selected[order_j[p]]:
                p += 1
            if p < order_j.shape[0]:
                ptr[j], head_row[j], head_val[j] = p, order_j[p], pre.values[j][p]
            else:
                reset(j)
        if progress is not None and ((t + 1) % 4096 == 0 or t + 1 == budget):
            progress(t + 1, budget)
    return Picks(rows=rows, scores=best_gains, columns=served)


@register(
    "bids",
    normalize_default=True,
    description="BIDS (Algorithm 1): column-normalise, then B times pick the row with the largest "
    "gain max_j (A'_ij - mean of picked rows_j)",
)
def select_bids(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    return bids_fast(matrix, budget, normalize=ctx.normalize, progress=ctx.progress)
