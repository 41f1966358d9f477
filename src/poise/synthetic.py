"""Deterministic synthetic attribution matrices and pools (demo, tests, benchmarks).

The matrix mimics what the BIDS paper measured on UltraInteract (its Figure 1): each task has its
own influence scale (MMLU-like knowledge columns dwarf code columns), columns within a task differ
in scale too, and every pool example mostly helps the capability of its source data set. Selecting
by raw influence then over-samples the large-scale tasks; column normalisation removes that bias.
"""

from __future__ import annotations

import numpy as np

from poise.matrix import AttributionMatrix

#: (task, source data set of the pool that serves it, influence scale) - scales after the paper's Fig. 1.
DEFAULT_TASKS: tuple[tuple[str, str, float], ...] = (
    ("humaneval", "code", 0.25),
    ("mbpp", "code", 0.35),
    ("gsm-plus", "math", 0.8),
    ("math", "math", 0.6),
    ("bbh", "reasoning", 1.0),
    ("mmlu", "knowledge", 3.0),
    ("ifeval", "chat", 0.5),
)


def synthetic_matrix(
    n_rows: int = 20_000,
    columns_per_task: int = 10,
    tasks: tuple[tuple[str, str, float], ...] = DEFAULT_TASKS,
    seed: int = 0,
    chunk_rows: int = 32_768,
) -> tuple[AttributionMatrix, np.ndarray]:
    """A float32 influence matrix (n_rows x tasks*columns_per_task) and each row's source data set.

    Deterministic in (n_rows, columns_per_task, tasks, seed); generated in row chunks so paper-scale
    matrices (288K x 350) fit comfortably in memory.
    """
    rng = np.random.default_rng(seed)
    sources = sorted({source for _, source, _ in tasks})
    source_of_task = np.array([sources.index(source) for _, source, _ in tasks])
    n_tasks = len(tasks)
    v = n_tasks * columns_per_task
    task_of_col = np.repeat(np.arange(n_tasks), columns_per_task)
    # per column: task scale times an instance-level scale spread, plus an offset
    col_scale = np.array([scale for _, _, scale in tasks])[task_of_col] * rng.lognormal(0.0, 0.35, size=v)
    col_offset = rng.normal(0.0, 0.15, size=v) * col_scale
    row_source = rng.integers(0, len(sources), size=n_rows)
    quality = rng.normal(0.0, 1.0, size=n_rows)  # some examples help everything a bit
    scores = np.empty((n_rows, v), dtype=np.float32)
    for start in range(0, n_rows, chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        k = stop - start
        match = (row_source[start:stop, None] == source_of_task[None, task_of_col]).astype(np.float32)
        task_factor = rng.standard_normal((k, n_tasks), dtype=np.float32)[:, task_of_col]
        noise = rng.standard_normal((k, v), dtype=np.float32)
        signal = 1.2 * match + 0.35 * quality[start:stop, None] + 0.5 * task_factor + 0.6 * noise
        scores[start:stop] = (signal * col_scale + col_offset).astype(np.float32)
    column_ids = [f"{tasks[t][0]}-{c}" for t in range(n_tasks) for c in range(columns_per_task)]
    column_tasks = [tasks[t][0] for t in task_of_col]
    matrix = AttributionMatrix(
        scores=scores,
        column_ids=column_ids,
        tasks=column_tasks,
        row_ids=[f"pool-{i}" for i in range(n_rows)],
        kind="influence",
        source="synthetic",
    )
    return matrix, np.array(sources, dtype=object)[row_source]


def synthetic_rds_matrix(
    row_sources: np.ndarray, matrix: AttributionMatrix, dim: int = 64, seed: int = 0
) -> AttributionMatrix:
    """Cosine similarities of synthetic representations: rows and columns embed near their domain."""
    rng = np.random.default_rng(seed + 1)
    sources = sorted(set(row_sources.tolist()))
    centers = rng.normal(size=(len(sources), dim))
    task_source = {task: source for task, source, _ in DEFAULT_TASKS}
    src_index = {s: k for k, s in enumerate(sources)}
    rows = centers[[src_index[s] for s in row_sources]] + 1.5 * rng.normal(size=(len(row_sources), dim))
    cols = centers[[src_index[task_source.get(t, sources[0])] for t in matrix.tasks]]
    cols = cols + 1.5 * rng.normal(size=cols.shape)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    cols /= np.linalg.norm(cols, axis=1, keepdims=True)
    return AttributionMatrix(
        scores=(rows @ cols.T).astype(np.float32),
        column_ids=list(matrix.column_ids),
        tasks=list(matrix.tasks),
        row_ids=matrix.row_ids,
        kind="rds",
        source="synthetic-rds",
    )


_PROMPTS = {
    "code": ("Write a Python function that {verb} a list of {noun}.", "def solve(items):\n    return items"),
    "math": ("What is {a} + {b} times {c}?", "{a} + {b} * {c} = {r}."),
    "reasoning": ("If every {noun} is a {noun2}, is some {noun2} a {noun}?", "Yes, assuming a {noun} exists."),
    "knowledge": ("Name one fact about {noun}.", "{Noun} are well studied."),
    "chat": ("Reply in exactly three words about {noun}.", "{Noun} are great."),
}
_NOUNS = ["rivers", "primes", "birds", "stars", "maps", "songs", "trees", "bridges"]
_VERBS = ["sorts", "reverses", "deduplicates", "sums"]


def synthetic_pool(row_sources: np.ndarray, seed: int = 0) -> list[dict]:
    """Tulu-format instruction examples, one per row, matching the matrix rows (ids pool-<i>)."""
    rng = np.random.default_rng(seed + 2)
    rows = []
    for i, source in enumerate(row_sources.tolist()):
        noun, noun2 = rng.choice(_NOUNS, size=2, replace=False)
        a, b, c = (int(x) for x in rng.integers(1, 50, size=3))
        fields = dict(verb=rng.choice(_VERBS), noun=noun, noun2=noun2, Noun=noun.capitalize(),
                      a=a, b=b, c=c, r=a + b * c)
        prompt, answer = _PROMPTS[source]
        rows.append(
            {
                "id": f"pool-{i}",
                "dataset": source,
                "messages": [
                    {"role": "user", "content": prompt.format(**fields)},
                    {"role": "assistant", "content": answer.format(**fields)},
                ],
            }
        )
    return rows
