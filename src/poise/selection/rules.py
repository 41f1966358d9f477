"""Score-and-take-top-B rules (BIDS paper, Appendix A.3) and the random baseline.

Each rule gives every training row one score s_i, streaming over row blocks of bounded size (the matrix may be
a memory map larger than RAM; what is kept per row is one float64 score and one column index), and takes the
B best; equal scores go to the lowest row index. The column a pick "served" is where its score came from:
instance-max and rds the argmax column, task-max the argmax column of the argmax task, sum the
column that contributed most.
"""

from __future__ import annotations

import numpy as np

from poise.errors import warn
from poise.matrix import AttributionMatrix
from poise.selection.registry import Context, Picks, register


def top_rows(scores: np.ndarray, budget: int) -> np.ndarray:
    """The `budget` rows with the highest scores, best first, ties to the lowest row index."""
    return np.argsort(-scores, kind="stable")[:budget].astype(np.int64)


def _score_and_take(
    matrix: AttributionMatrix, budget: int, ctx: Context, reduce: str
) -> Picks:
    n = matrix.n_rows
    scores = np.empty(n, dtype=np.float64)
    served = np.empty(n, dtype=np.int64)
    if reduce == "task-max":
        groups = list(matrix.task_columns().values())
    for start, block in matrix.iter_chunks(normalized=ctx.normalize):
        stop = start + block.shape[0]
        if reduce == "instance-max":
            served[start:stop] = block.argmax(axis=1)
            scores[start:stop] = block[np.arange(block.shape[0]), served[start:stop]]
        elif reduce == "sum":
            scores[start:stop] = block.sum(axis=1, dtype=np.float64)
            served[start:stop] = block.argmax(axis=1)
        elif reduce == "task-max":
            per_task = np.stack([block[:, cols].mean(axis=1, dtype=np.float64) for cols in groups], axis=1)  # (b, m)
            best_task = per_task.argmax(axis=1)
            scores[start:stop] = per_task[np.arange(block.shape[0]), best_task]
            for k, cols in enumerate(groups):
                rows = np.flatnonzero(best_task == k)
                if rows.size:
                    served[start + rows] = cols[block[np.ix_(rows, cols)].argmax(axis=1)]
        else:  # pragma: no cover - guarded by the registry
            raise ValueError(reduce)
        if ctx.progress:
            ctx.progress(stop, n)
    rows = top_rows(scores, budget)
    return Picks(rows=rows, scores=scores[rows], columns=served[rows])


@register("instance-max", description="s_i = max_j A_ij; top B (paper: 'Instance-wise Max')")
def select_instance_max(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    return _score_and_take(matrix, budget, ctx, "instance-max")


@register(
    "task-max",
    description="s_i = max_k mean_{j in task k} A_ij; top B (LESS; the paper's sum equals it for equal task sizes)",
)
def select_task_max(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    listing = matrix.unequal_task_sizes()
    if listing:
        warn(f"{matrix.source or 'scores'}: tasks have unequal numbers of validation columns ({listing}); task-max "
             "uses the per-task mean (the paper's per-task sum would favour the larger tasks)")
    return _score_and_take(matrix, budget, ctx, "task-max")


@register("sum", description="s_i = sum_j A_ij; top B")
def select_sum(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    return _score_and_take(matrix, budget, ctx, "sum")


@register("rds", requires_kind="rds", description="instance-max on the representation cosine matrix (RDS)")
def select_rds(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    return _score_and_take(matrix, budget, ctx, "instance-max")


@register("random", uses_scores=False, description="B rows uniformly at random without replacement (seeded); "
          "with --stratify FIELD, equal shares per value of that pool field (balanced random)")
def select_random(matrix: AttributionMatrix, budget: int, ctx: Context) -> Picks:
    if ctx.strata is not None:
        from poise.selection.balance import stratified_draw

        rows, _ = stratified_draw(ctx.strata, len(ctx.strata_names or ()), budget, ctx.seed)
        return Picks(rows=rows, scores=np.full(budget, np.nan), columns=np.full(budget, -1, dtype=np.int64))
    rng = np.random.default_rng(ctx.seed)
    rows = rng.choice(matrix.n_rows, size=budget, replace=False).astype(np.int64)
    return Picks(rows=rows, scores=np.full(budget, np.nan), columns=np.full(budget, -1, dtype=np.int64))
