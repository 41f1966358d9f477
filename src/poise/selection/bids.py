"""BIDS: iterative selection favouring under-represented validation instances (exact, fast, bounded memory).

Algorithm 1 of the BIDS paper picks, B times, the unselected row i maximising max_j (A'_ij - m_j),
where A' is the column-normalised matrix and m the mean of the rows already picked (0 when none are).
The naive loop costs O(B * N * V). Because m_j is shared by all rows of column j, the best candidate of
a column is simply its best unselected row, so

    max_i max_j (A'_ij - m_j) = max_j (max_{i unselected} A'_ij - m_j).

We keep, for each column, a prefix of its rows in descending value and a pointer to its best unselected
row. One step is a vector operation over the V column heads, a float64 update of the running sum and
advancing the pointers that pointed at the picked row. Total O(N * V + B * V).

Memory. The matrix is only read in row blocks (`AttributionMatrix.iter_chunks`), so it may be a memory map
larger than RAM; A' is never materialised (a prefix entry and a picked row are normalised when read).
What BIDS holds: one bool per row (selected), the picks, a row sample of at most SAMPLE_VALUES values, and
the prefixes. A prefix is "every row that was unselected when it was filled, with a value at or above the
column's cut", so selected rows are dropped whenever it is refilled; it starts at a few times the picks per
column and each refill asks for twice as many rows as the last, up to max(MIN_PREFIX, PREFIX_VALUES / V).
The prefixes together therefore hold about 4B + V * MIN_PREFIX entries at first and never more than about
PRUNE_FACTOR * max(PREFIX_VALUES, 4B + V * MIN_PREFIX) (12 bytes each): bounded by the budget, not by N.

Filling. One streaming pass fills any set of columns: per column it collects the unselected rows whose value
lies in [floor, cut), the floor placed from the row sample so that about the wanted number of rows lie
between it and the cut. Should more than PRUNE_FACTOR times that many turn up, the floor is raised to the
value of the wanted-th best collected, so a poor estimate costs time, never memory. The first pass fills
every column (per-column thresholds from the sample, as measured faster than sorting or partitioning the
whole matrix). Later, a column whose prefix runs out is refilled together with every column that has used
three quarters of its prefix, because each pass reads the whole matrix. Normalisation is monotone within a
column, so the raw order is a valid order of A' and cuts are raw values.

Exactness: the result equals the naive loop pick for pick, including ties. A tie in the gain can come
from equal values or from two different float32 values that round to the same float64 difference; the
rows of a column whose gain equals the maximum sit contiguously from its head on, so we scan that short
run and take the lowest row index, as the naive `argmax` over rows does. Because ties are settled by
that scan, the order among equal values inside a prefix does not matter, and a pointer is re-derived
(first unselected position) whenever its prefix is refilled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from poise.matrix import AttributionMatrix
from poise.selection.registry import Context, Picks, register

#: Rows sampled to place the fill thresholds (fewer when V is large: at most SAMPLE_VALUES values).
SAMPLE_ROWS = 16384
SAMPLE_VALUES = 1 << 23
#: Initial prefix length per column: MIN_PREFIX + PREFIX_FACTOR * (picks per column).
MIN_PREFIX = 256
PREFIX_FACTOR = 4
#: A refill asks for at most max(MIN_PREFIX, PREFIX_VALUES // V) rows of a column.
PREFIX_VALUES = 1 << 22
#: A fill keeps at most this many times the rows it asked for (then raises its floor).
PRUNE_FACTOR = 4
#: A memory-mapped matrix's pages read for picked rows are handed back every this many picks.
RELEASE_EVERY = 128

_EMPTY_ROWS = np.empty(0, dtype=np.int64)
_EMPTY_VALUES = np.empty(0, dtype=np.float32)


class _Prefixes:
    """Per-column prefixes (row indices, float32 values as the selection sees them) and their heads.

    Column j holds every row that was unselected at its last fill with a raw value >= cut[j], best first;
    cut[j] = -inf means the prefix covers the whole column. `ptr[j]` points at its best unselected row,
    `head_row[j]` / `head_val[j]` (float64) are that row and its value (-1 / -inf when none is left).
    """

    def __init__(self, matrix: AttributionMatrix, normalize: bool, budget: int, selected: np.ndarray):
        self.matrix = matrix
        self.selected = selected  # (N,) bool, shared with the selection loop
        self.n, self.v = matrix.n_rows, matrix.n_columns
        stats = matrix.column_stats() if normalize else None
        self.normalize = stats is not None
        if stats is not None:
            self.mean = stats.mean
            self.safe = np.where(stats.zero_variance, 1.0, stats.std)
            self.zero = stats.zero_variance
        # expected prefix length: a few times the picks per column, enough that growth is rare
        target = min(self.n, MIN_PREFIX + PREFIX_FACTOR * math.ceil(budget / self.v))
        self.cap = max(target, MIN_PREFIX, PREFIX_VALUES // self.v)
        self.want = np.full(self.v, target, dtype=np.int64)
        self.cut = np.full(self.v, np.inf, dtype=np.float32)
        self.orders = [_EMPTY_ROWS] * self.v
        self.values = [_EMPTY_VALUES] * self.v
        self.ptr = np.zeros(self.v, dtype=np.int64)
        self.size = np.zeros(self.v, dtype=np.int64)  # prefix length right after its last fill
        self.head_row = np.full(self.v, -1, dtype=np.int64)
        self.head_val = np.full(self.v, -np.inf, dtype=np.float64)
        self.grown = 0  # refills asked for
        self.passes = 0  # streaming passes over the matrix
        size = min(self.n, SAMPLE_ROWS, max(1024, SAMPLE_VALUES // self.v))
        self.sample = matrix.read_rows(np.unique(np.linspace(0, self.n - 1, size).astype(np.int64)))
        everything = np.arange(self.v)
        self._fill(everything, self._first_floors(target))
        for j in range(self.v):
            self._head(j)

    # ---------------------------------------------------------------------------------- filling
    def _first_floors(self, target: int) -> np.ndarray:
        """Per-column thresholds for the first fill: the sample's value with about `target` rows above it."""
        if target >= self.n:
            return np.full(self.v, -np.inf, dtype=np.float32)
        size = self.sample.shape[0]
        rank = min(size, max(1, math.ceil(size * target / self.n)))  # from the top
        return np.partition(self.sample, size - rank, axis=0)[size - rank]

    def _floors(self, cols: np.ndarray) -> np.ndarray:
        """Per-column floors for a refill: the sample's value with about `want` rows between it and the cut."""
        size = self.sample.shape[0]
        out = np.empty(cols.size, dtype=np.float32)
        for i, j in enumerate(cols.tolist()):
            column = self.sample[:, j]
            below = column[column < self.cut[j]]
            rank = max(1, math.ceil(size * int(self.want[j]) / self.n))
            if below.size <= rank:
                out[i] = -np.inf
            else:
                out[i] = np.partition(below, below.size - rank)[below.size - rank]
        return out

    def _fill(self, cols: np.ndarray, floor: np.ndarray) -> None:
        """One streaming pass: for every column in `cols`, the unselected rows with floor <= value < cut,
        appended in descending order to what is left unselected of its prefix; its cut becomes the floor."""
        g = cols.size
        cut = self.cut[cols]
        want = self.want[cols]
        limit = PRUNE_FACTOR * want
        bounded = bool(np.isfinite(cut).any())
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        counts = np.zeros(g, dtype=np.int64)
        for start, block in self.matrix.iter_chunks(columns=None if g == self.v else cols):  # (b, g) float32
            mask = block >= floor
            if bounded:
                mask &= block < cut
            taken = self.selected[start : start + block.shape[0]]
            if taken.any():
                mask[taken] = False
            r, c = np.nonzero(mask)
            if not r.size:
                continue
            parts.append((r + start, c, block[r, c]))
            counts += np.bincount(c, minlength=g)
            if (counts > limit).any():
                parts, counts = self._prune(parts, counts, floor, want, limit)
        if parts:
            rows, where, raw = (np.concatenate(p) for p in zip(*parts, strict=True))
        else:
            rows, where, raw = _EMPTY_ROWS, _EMPTY_ROWS, _EMPTY_VALUES
        keep = raw >= floor[where]  # a raised floor drops what was collected below it
        rows, where, raw = rows[keep], where[keep], raw[keep]
        order = np.lexsort((-raw, where))  # by column, then value descending
        rows, where, raw = rows[order], where[order], raw[order]
        values = self._values(raw, cols[where])
        bounds = np.concatenate([[0], np.cumsum(np.bincount(where, minlength=g))])
        for i, j in enumerate(cols.tolist()):
            rest = self.orders[j][self.ptr[j] :]
            alive = ~self.selected[rest]
            self.orders[j] = np.concatenate([rest[alive], rows[bounds[i] : bounds[i + 1]]])
            self.values[j] = np.concatenate([self.values[j][self.ptr[j] :][alive], values[bounds[i] : bounds[i + 1]]])
            self.ptr[j] = 0
            self.size[j] = self.orders[j].shape[0]
            self.cut[j] = floor[i]
        self.passes += 1

    @staticmethod
    def _prune(
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], counts: np.ndarray, floor: np.ndarray,
        want: np.ndarray, limit: np.ndarray,
    ) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray]:
        """Raise the floor of every column over its limit to its want-th best value collected (ties kept)."""
        rows, where, raw = (np.concatenate(p) for p in zip(*parts, strict=True))
        for i in np.flatnonzero(counts > limit).tolist():
            mine = raw[where == i]
            k = mine.size - int(want[i])
            floor[i] = max(floor[i], np.partition(mine, k)[k])
        keep = raw >= floor[where]
        rows, where, raw = rows[keep], where[keep], raw[keep]
        return [(rows, where, raw)], np.bincount(where, minlength=counts.size)

    def _values(self, raw: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float32 of the values BIDS compares: normalised exactly as `normalize_block` does."""
        if not self.normalize:
            return raw.astype(np.float32)
        out = ((raw.astype(np.float64) - self.mean[cols]) / self.safe[cols]).astype(np.float32)
        out[self.zero[cols]] = 0.0
        return out

    # ------------------------------------------------------------------------------ the heads
    def complete(self, j: int) -> bool:
        return bool(self.cut[j] == -np.inf)

    def _head(self, j: int) -> None:
        """Point column j at the first entry of its freshly filled prefix (all unselected), or at none."""
        self.ptr[j] = 0
        if self.orders[j].shape[0]:
            self.head_row[j], self.head_val[j] = self.orders[j][0], self.values[j][0]
        else:
            self.head_row[j], self.head_val[j] = -1, -np.inf

    def grow(self, j: int) -> None:
        """Refill column j, and with it every column that has used three quarters of its prefix, each asking
        for twice as many rows as at its last fill; their pointers and heads are re-derived."""
        self.grown += 1
        lengths = np.fromiter((o.shape[0] for o in self.orders), dtype=np.int64, count=self.v)
        low = (self.cut != -np.inf) & (4 * (lengths - self.ptr) <= self.size)
        low[j] = True
        cols = np.flatnonzero(low)
        self.want[cols] = np.minimum(self.cap, 2 * self.want[cols])
        pending = cols
        while pending.size:
            self._fill(pending, self._floors(pending))
            # a floor placed too high finds nothing: go deeper until a row turns up or the column is complete
            pending = np.array([k for k in pending.tolist() if not self.orders[k].shape[0] and not self.complete(k)],
                               dtype=np.int64)
            self.want[pending] = np.minimum(self.cap, 2 * self.want[pending])
        for k in cols.tolist():
            self._head(k)

    def advance(self, j: int) -> None:
        """Move column j's pointer to its next unselected row (its head was just picked), refilling as needed."""
        order = self.orders[j]
        p = int(self.ptr[j]) + 1
        while p < order.shape[0] and self.selected[order[p]]:
            p += 1
        if p < order.shape[0]:
            self.ptr[j], self.head_row[j], self.head_val[j] = p, order[p], self.values[j][p]
        elif self.complete(j):  # every row of the column is selected
            self.ptr[j], self.head_row[j], self.head_val[j] = p, -1, -np.inf
        else:
            self.grow(j)


def _row_reader(matrix: AttributionMatrix, normalize: bool) -> Callable[[int], np.ndarray]:
    """Function row -> float32 (V,) values of the matrix BIDS sees (bit-identical to normalize_block)."""
    if not normalize:
        return lambda r: np.asarray(matrix.row(r), dtype=np.float32)
    stats = matrix.column_stats()
    mean, zero = stats.mean, stats.zero_variance
    safe = np.where(zero, 1.0, stats.std)
    wide = np.empty(matrix.n_columns, dtype=np.float64)
    narrow = np.empty(matrix.n_columns, dtype=np.float32)
    any_zero = bool(zero.any())

    def read(r: int) -> np.ndarray:
        np.subtract(matrix.row(r), mean, out=wide)  # float32 or float16 -> float64 is exact
        np.divide(wide, safe, out=wide)
        narrow[:] = wide
        if any_zero:
            narrow[zero] = 0.0
        return narrow

    return read


def bids_fast(
    matrix: AttributionMatrix, budget: int, normalize: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Picks:
    """Exact fast BIDS (see module docstring). Returns picks in order with gain and argmax column."""
    n, v = matrix.n_rows, matrix.n_columns
    selected = np.zeros(n, dtype=bool)
    pre = _Prefixes(matrix, normalize, budget, selected)
    read_row = _row_reader(matrix, normalize)
    head_row, head_val = pre.head_row, pre.head_val  # updated in place by `pre`

    running = np.zeros(v, dtype=np.float64)  # sum of the picked rows, float64
    mean = np.zeros(v, dtype=np.float64)
    gains = np.empty(v, dtype=np.float64)
    rows = np.empty(budget, dtype=np.int64)
    best_gains = np.empty(budget, dtype=np.float64)
    served = np.empty(budget, dtype=np.int64)

    def lowest_tied_row(j: int, best: float) -> int:
        """Lowest unselected row of column j whose gain equals `best` (its head has that gain)."""
        while True:
            order_j, values_j, m_j = pre.orders[j], pre.values[j], mean[j]
            row = int(order_j[pre.ptr[j]])
            q = int(pre.ptr[j]) + 1
            while q < order_j.shape[0]:
                r = int(order_j[q])
                if not selected[r]:
                    if float(values_j[q]) - m_j != best:
                        return row
                    row = min(row, r)
                q += 1
            if pre.complete(j):
                return row
            pre.grow(j)  # the run of equal gains reaches the end of the prefix; its head stays first

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
            if head_row[j] == pick_row:  # a refill for an earlier column may have moved it on already
                pre.advance(j)
        if (t + 1) % RELEASE_EVERY == 0:
            matrix.release_pages()
        if progress is not None and ((t + 1) % 4096 == 0 or t + 1 == budget):
            progress(t + 1, budget)
    matrix.release_pages()
    return Picks(rows=rows, scores=best_gains, columns=served)


@register(
    "bids",
    normalize_default=True,
    description="BIDS (Algorithm 1): column-normalise, then B times pick the row with the largest "
    "gain max_j (A'_ij - mean of picked rows_j)",
)
def select_bids(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    return bids_fast(matrix, budget, normalize=ctx.normalize, progress=ctx.progress)
