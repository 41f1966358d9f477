"""Round-robin rules (RDS+) and the stratified random draw ("balanced random").

These balance the targets by turn rather than by need: every target (a validation instance, or a task) takes
its next-best training row in a fixed order, round after round, whatever the others already have; BIDS
instead serves, at each step, the instance that is served least so far (docs/study.md, "How the balancing
rules differ", compares them).

The rules restate Ivison et al. 2025 ("Large-Scale Data Selection for Instruction Tuning"), code in
hamishivi/automated-instruction-selection at commit df71a044d567976e37bebeae53cd59f992b1ea09:

- `round-robin` is the "max" branch of `minimal_multitask/get_top_influences.py`: each validation instance
  ranks the pool by its own score, highest first, equal scores in row order (Python's stable sort); in each
  round the instances, in column order, each pop the next row of their own ranking. A row already picked is
  dropped and that instance's turn passes without a pick (its ranking has still moved on); picking stops at
  the budget, mid-round if need be.
- `rds+` is `minimal_multitask/get_top_aggregated_influences.py` with `--selection_method max
  --aggregation_method round_robin`, the multi-task RDS+ of the paper: a row's score for a task is its highest
  score over that task's validation instances, and the tasks take turns in the same way (task order: the
  matrix's, which is the validation files' sorted order, as the peer's score files come from a shell glob).
- `task-round-robin` is the same turn over tasks with the task's score taken as the mean over its columns
  (LESS's per-task aggregate, as in poise's task-max) instead of the maximum.

Scale: a target never needs more of its ranking than the number of rounds, so each target keeps only its
top-k rows (k starts at four times budget / targets and grows fourfold, with another streaming pass, in
the rare case the turns run deeper); memory is k x targets x 16 bytes, never the matrix.
"""

from __future__ import annotations

import math

import numpy as np

from poise.matrix import AttributionMatrix
from poise.selection.registry import Context, Picks, register

#: How the targets of a round-robin score a row: each column, each task's column mean, each task's column max.
TARGETS = ("columns", "task-mean", "task-max")


def target_scores(block: np.ndarray, groups: list[np.ndarray] | None, targets: str) -> np.ndarray:
    """(b, T) float64 score of each row of `block` for each target."""
    if targets == "columns":
        return block.astype(np.float64)
    if targets == "task-mean":
        return np.stack([block[:, cols].mean(axis=1, dtype=np.float64) for cols in groups], axis=1)
    return np.stack([block[:, cols].max(axis=1).astype(np.float64) for cols in groups], axis=1)


def _chunk_top(scores: np.ndarray, k: int) -> np.ndarray:
    """(T, min(k, b)) indices into each row of `scores` (T, b) of its k best, equal scores to the lower index;
    unsorted."""
    b = scores.shape[1]
    if k >= b:
        return np.broadcast_to(np.arange(b)[None, :], scores.shape).copy()
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # the k largest, ties at the edge arbitrary
    chosen = np.take_along_axis(scores, part, axis=1)
    edge = chosen.min(axis=1)  # the k-th largest value per target
    straddle = np.flatnonzero((scores == edge[:, None]).sum(axis=1) > (chosen == edge[:, None]).sum(axis=1))
    for t in straddle.tolist():  # ties across the edge: keep the lowest indices among the equal ones
        row = scores[t]
        above = np.flatnonzero(row > edge[t])
        equal = np.flatnonzero(row == edge[t])[: k - above.size]
        part[t] = np.concatenate([above, equal])
    return part


def ranked_targets(
    matrix: AttributionMatrix, ctx: Context, targets: str, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores), each (min(k, N), T): every target's k best rows, best first, equal scores in row order.

    One streaming pass over row blocks; per block each target's k best are merged with its k best so far.
    """
    groups = list(matrix.task_columns().values()) if targets != "columns" else None
    n = matrix.n_rows
    k = min(k, n)
    rows: np.ndarray | None = None
    vals: np.ndarray | None = None
    for start, block in matrix.iter_chunks(normalized=ctx.normalize):
        scores = np.ascontiguousarray(target_scores(block, groups, targets).T)  # (T, b): each target's scores
        local = _chunk_top(scores, k)
        cand_rows = local + start
        cand_vals = np.take_along_axis(scores, local, axis=1)
        if rows is not None:
            cand_rows = np.concatenate([rows, cand_rows], axis=1)
            cand_vals = np.concatenate([vals, cand_vals], axis=1)
        order = np.lexsort((cand_rows, -cand_vals), axis=1)[:, :k]
        rows = np.take_along_axis(cand_rows, order, axis=1)
        vals = np.take_along_axis(cand_vals, order, axis=1)
        if ctx.progress:
            ctx.progress(start + block.shape[0], n)
    return rows.T.astype(np.int64), np.ascontiguousarray(vals.T)


def take_turns(rows: np.ndarray, budget: int, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The round-robin over ranked targets: (picked rows, the target each served, the round) in pick order.

    Round r offers every target's r-th row, targets in order; a row picked before, or offered by an earlier
    target in the same round, is not picked again and that target's turn passes. None when the rankings
    (`rows`, (k, T)) run out before `budget` rows are picked and hold fewer than all N rows.
    """
    depth, n_targets = rows.shape
    picked = np.zeros(n_rows, dtype=bool)
    out_rows, out_targets, out_rounds = [], [], []
    total = 0
    for r in range(depth):
        offer = rows[r]
        first = np.zeros(n_targets, dtype=bool)
        first[np.unique(offer, return_index=True)[1]] = True
        takes = np.flatnonzero(first & ~picked[offer])
        takes = takes[: budget - total]
        picked[offer[takes]] = True
        out_rows.append(offer[takes])
        out_targets.append(takes)
        out_rounds.append(np.full(takes.size, r, dtype=np.int64))
        total += takes.size
        if total == budget:
            return np.concatenate(out_rows), np.concatenate(out_targets), np.concatenate(out_rounds)
    return None


def round_robin(matrix: AttributionMatrix, budget: int, ctx: Context, targets: str) -> Picks:
    """Run the turn with rankings deep enough for the budget; the column each pick served and its score."""
    n_targets = matrix.n_columns if targets == "columns" else len(matrix.task_names)
    k = min(matrix.n_rows, 4 * math.ceil(budget / n_targets) + 64)
    while True:
        rows, vals = ranked_targets(matrix, ctx, targets, k)
        turned = take_turns(rows, budget, matrix.n_rows)
        if turned is not None:
            break
        k = min(matrix.n_rows, 4 * k)  # the turns ran deeper than the rankings: rank deeper
    picks, served, rounds = turned
    scores = vals[rounds, served]
    if targets == "columns":
        columns = served
    else:  # the task's column that scores the row highest
        groups = list(matrix.task_columns().values())
        block = matrix.normalized_rows(picks) if ctx.normalize else matrix.read_rows(picks)
        columns = np.array([groups[t][int(block[i, groups[t]].argmax())] for i, t in enumerate(served.tolist())],
                           dtype=np.int64)
    return Picks(rows=picks.astype(np.int64), scores=scores.astype(np.float64), columns=columns.astype(np.int64))


@register("round-robin", description="validation instances in turn, each taking its next-best row; a row already "
          "picked passes the turn (RDS+'s per-instance round-robin)")
def select_round_robin(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    return round_robin(matrix, budget, ctx, "columns")


@register("task-round-robin", description="tasks in turn, each taking its next-best row by the mean over its "
          "columns; a row already picked passes the turn")
def select_task_round_robin(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    return round_robin(matrix, budget, ctx, "task-mean")


@register("rds+", requires_kind="rds+", description="RDS+ (Ivison et al. 2025): position-weighted mean-pooled "
          "representations of the base model; tasks in turn by each row's best cosine within the task")
def select_rds_plus(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    return round_robin(matrix, budget, ctx, "task-max")


# ------------------------------------------------------------------------------------- balanced random
def stratum_counts(sizes: np.ndarray, budget: int, order: np.ndarray) -> np.ndarray:
    """Rows per stratum: equal shares, a stratum smaller than its share gives all it has and the rest is shared
    among the others; the remainder (fewer rows than strata still open) goes one each to the open strata in
    `order`. The same counts as handing out one row per stratum in `order`, round after round, skipping the
    exhausted ones, until the budget is reached (the naive loop the tests compare with).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    lo, hi = 0, int(sizes.max(initial=0))
    while lo < hi:  # the largest level L with sum(min(size, L)) <= budget
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= budget:
            lo = mid
        else:
            hi = mid - 1
    counts = np.minimum(sizes, lo)
    rest = budget - int(counts.sum())
    open_in_order = [int(g) for g in order if sizes[g] > lo]
    counts[open_in_order[:rest]] += 1
    return counts


def stratified_draw(strata: np.ndarray, n_strata: int, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, stratum of each) of a draw with equal shares per stratum, uniformly at random within each.

    The picks are interleaved (one of each stratum in turn), so every prefix of the selection is balanced too.
    """
    rng = np.random.default_rng(seed)
    by_stratum = np.argsort(strata, kind="stable")  # each stratum's rows, in row order, one after the other
    sizes = np.bincount(strata, minlength=n_strata).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    members = [by_stratum[a : a + z] for a, z in zip(starts.tolist(), sizes.tolist(), strict=True)]
    counts = stratum_counts(sizes, budget, rng.permutation(n_strata))
    drawn = [rng.choice(m, size=int(c), replace=False) if c else m[:0] for m, c in zip(members, counts, strict=True)]
    rows = np.concatenate(drawn).astype(np.int64)
    groups = np.concatenate([np.full(d.size, g, dtype=np.int64) for g, d in enumerate(drawn)])
    turn = np.concatenate([np.arange(d.size) for d in drawn])
    order = np.lexsort((groups, turn))
    return rows[order], groups[order]
