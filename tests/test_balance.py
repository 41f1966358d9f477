"""The round-robin rules (round-robin, task-round-robin, rds+) and the stratified random draw, against naive loops.

The naive loops restate RDS+'s selection code, hamishivi/automated-instruction-selection at commit
df71a044d567976e37bebeae53cd59f992b1ea09:
- `minimal_multitask/get_top_influences.py`, the `"max" in selection_method` branch (per-instance round-robin):
  every test instance's training rows sorted by score, highest first, with Python's stable `sorted(...,
  reverse=True)` (equal scores keep row order); then, round after round, every instance in order pops the
  first row of its list and appends it; a row already saved is removed again (`remove_dupes_ordered`), so that
  instance's turn yields nothing; the list is cut to the output size at the end.
- `minimal_multitask/get_top_aggregated_influences.py`, `--aggregation_method round_robin` with
  `--selection_method max`: a row's score per task file is the max over the task's instances
  (`compute_influences_for_file`), the tasks' lists are sorted the same way and the tasks take turns the same
  way (a row already in `inter_dataset_scores` does not grow it); `task-round-robin` is that turn with the
  task mean instead of the max.
- `scripts/construct_downsampled_balanced.py` for balanced random: one row per data set in turn, skipping the
  exhausted ones, until the budget; poise draws each stratum's rows at random and hands the remainder to the
  strata in a seeded random order instead of file order.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from oracles import normalize_naive

from poise import AttributionMatrix, PoiseError, select
from poise.selection import balance


def _matrix(scores, tasks, kind=None) -> AttributionMatrix:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AttributionMatrix(np.asarray(scores, dtype=np.float32), list(range(len(tasks))), tasks, kind=kind)


def _naive_turns(target_scores: np.ndarray, budget: int) -> tuple[list[int], list[int]]:
    """The peer's loop: (rows, serving target) in pick order."""
    n, n_targets = target_scores.shape
    ranked = [sorted(range(n), key=lambda i, t=t: target_scores[i, t], reverse=True) for t in range(n_targets)]
    saved: list[int] = []
    served: list[int] = []
    while len(saved) < budget:
        for t in range(n_targets):
            row = ranked[t].pop(0)
            if row in saved:
                continue  # a repeat: removed again, the turn passes
            saved.append(row)
            served.append(t)
    return saved[:budget], served[:budget]


def _targets(a: np.ndarray, tasks: list[str], how: str) -> np.ndarray:
    if how == "columns":
        return a.astype(np.float64)
    names = list(dict.fromkeys(tasks))
    cols = [np.flatnonzero(np.array(tasks) == name) for name in names]
    if how == "task-mean":
        return np.stack([a[:, c].astype(np.float64).mean(axis=1) for c in cols], axis=1)
    return np.stack([a[:, c].max(axis=1).astype(np.float64) for c in cols], axis=1)


METHODS = {"round-robin": "columns", "task-round-robin": "task-mean", "rds+": "task-max"}


def _case(seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    n, v = int(rng.integers(20, 120)), int(rng.integers(2, 10))
    scores = rng.normal(size=(n, v)) * rng.uniform(0.1, 10, size=v)
    if seed % 3 == 0:
        scores = np.round(scores, 0)  # many equal scores
    if seed % 5 == 1:
        scores[:, 1:] = scores[:, :1]  # every target ranks the pool alike: one pick per round
    n_tasks = int(rng.integers(1, min(v, 4) + 1))
    tasks = [f"t{j % n_tasks}" for j in range(v)]
    return scores.astype(np.float32), tasks


@pytest.mark.parametrize("seed", range(15))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("normalize", [False, True])
def test_round_robin_rules_pick_what_the_peers_loop_picks(seed: int, method: str, normalize: bool) -> None:
    """Rows in pick order, their order of turns included, equal the restated peer loop at several budgets, with
    ties and with targets that all rank the pool alike; the served column is the target (per instance) or the
    task's best column for the row, and the score is the target's score for the row."""
    scores, tasks = _case(seed)
    kind = "rds+" if method == "rds+" else None
    if normalize and (method == "rds+" or bool(np.any(scores.std(axis=0) == 0))):
        pytest.skip("rds+ has no normalised variant; constant columns are dropped before normalised rules")
    matrix = _matrix(scores, tasks, kind=kind)
    a = matrix.normalized() if normalize else scores  # the bits the rules see
    target = _targets(a, tasks, METHODS[method])
    names = list(dict.fromkeys(tasks))
    n = scores.shape[0]
    for budget in sorted({1, 2, n // 7 + 1, n // 2, n}):
        got = select(matrix, method, budget, normalize=normalize if method != "rds+" else None)
        rows, served = _naive_turns(target, budget)
        assert got.indices.tolist() == rows, (method, budget)
        assert [p["score"] for p in got.trace] == [float(target[r, t]) for r, t in zip(rows, served, strict=True)]
        if METHODS[method] == "columns":
            assert [p["column"] for p in got.trace] == served
        else:
            for pick, t in zip(got.trace, served, strict=True):
                cols = [j for j, name in enumerate(tasks) if name == names[t]]
                assert pick["task"] == names[t]
                assert pick["column"] == cols[int(np.argmax(a[pick["row"], cols]))]


def test_normalised_round_robin_uses_the_z_scored_columns() -> None:
    """With one column on a 100x scale, raw and normalised round-robin differ only through the ranking per
    column, which normalisation does not change: each column's own order is affine-invariant."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(80, 4)) * [1, 100, 1, 1]
    matrix = _matrix(scores, ["a", "a", "b", "b"])
    assert select(matrix, "round-robin", 30).indices.tolist() == \
        select(matrix, "round-robin", 30, normalize=True).indices.tolist()
    # ... but a task mean is not: the large column dominates task a's raw mean
    naive = normalize_naive(scores)
    rows, _ = _naive_turns(_targets(naive, ["a", "a", "b", "b"], "task-mean"), 30)
    assert select(matrix, "task-round-robin", 30, normalize=True).indices.tolist() == rows


@pytest.mark.parametrize("seed", range(6))
def test_round_robin_in_tiny_blocks_of_a_memory_map_with_shallow_rankings_stays_exact(
    seed: int, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float16 scores.npy streamed 3 rows at a time (so every target's best rows are merged across many
    blocks) and rankings that start 1 deep (so the turns outrun them and they are rebuilt deeper) give the
    in-memory picks."""
    from poise import matrix as matrix_module
    from poise.matrix import load_attribution

    scores, tasks = _case(seed + 40)
    scores = scores.astype(np.float16)
    in_memory = _matrix(scores.astype(np.float32), tasks)
    budget = scores.shape[0] // 2
    expected = {m: select(in_memory, m, budget).indices.tolist() for m in ("round-robin", "task-round-robin")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AttributionMatrix(scores, list(range(len(tasks))), tasks).save(tmp_path / "attribution")
    mapped = load_attribution(tmp_path / "attribution")
    assert mapped.memory_mapped
    monkeypatch.setattr(matrix_module, "BLOCK_VALUES", 3 * scores.shape[1])
    deepened = []
    original = balance.ranked_targets
    monkeypatch.setattr(balance, "ranked_targets", lambda m, c, t, k: (deepened.append(k), original(m, c, t, 1))[1]
                        if not deepened else (deepened.append(k), original(m, c, t, k))[1])
    for method, rows in expected.items():
        deepened.clear()
        assert select(mapped, method, budget).indices.tolist() == rows
        assert len(deepened) >= 2  # the 1-deep rankings ran out and were rebuilt


def test_chunk_top_keeps_the_lowest_rows_among_equal_scores_at_the_edge() -> None:
    scores = np.array([[1.0, 5.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
    part = balance._chunk_top(scores, 3)
    assert sorted(part[0].tolist()) == [1, 2, 3]


def test_rds_plus_needs_an_rds_plus_matrix() -> None:
    matrix = _matrix(np.eye(4), ["a", "a", "b", "b"], kind="rds")
    with pytest.raises(PoiseError, match="rds\\+"):
        select(matrix, "rds+", 2)


# ------------------------------------------------------------------------------------- balanced random
def _naive_counts(sizes: list[int], budget: int, order: list[int]) -> list[int]:
    """construct_downsampled_balanced.py's loop, strata visited in `order`: one row each per round."""
    left = list(sizes)
    counts = [0] * len(sizes)
    total = 0
    while total < budget:
        for g in order:
            if left[g] == 0:
                continue
            if total >= budget:
                break
            left[g] -= 1
            counts[g] += 1
            total += 1
    return counts


@pytest.mark.parametrize("seed", range(40))
def test_stratum_counts_equal_the_one_per_stratum_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 30, size=int(rng.integers(1, 9)))
    sizes[0] = max(sizes[0], 1)
    budget = int(rng.integers(1, sizes.sum() + 1))
    order = rng.permutation(sizes.size)
    assert balance.stratum_counts(sizes, budget, order).tolist() == _naive_counts(sizes.tolist(), budget,
                                                                                   order.tolist())


@pytest.mark.parametrize("seed", range(10))
def test_stratified_draw_gives_equal_shares_uniformly_within_each_stratum(seed: int) -> None:
    """The draw equals a loop that takes the naive counts and draws each stratum's rows with the same generator
    calls; every prefix of the picks is balanced (interleaved); strata that run short give everything."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 200))
    strata = rng.choice(int(rng.integers(2, 7)), size=n, p=None).astype(np.int64)
    n_strata = int(strata.max()) + 1
    budget = int(rng.integers(1, n + 1))
    rows, groups = balance.stratified_draw(strata, n_strata, budget, seed)
    ref = np.random.default_rng(seed)
    order = ref.permutation(n_strata)
    sizes = [int((strata == g).sum()) for g in range(n_strata)]
    counts = _naive_counts(sizes, budget, order.tolist())
    expected = set()
    for g in range(n_strata):
        members = np.flatnonzero(strata == g)
        if counts[g]:
            expected |= set(ref.choice(members, size=counts[g], replace=False).tolist())
    assert set(rows.tolist()) == expected and len(rows) == budget
    assert (strata[rows] == groups).all()
    for prefix in range(1, budget + 1):
        got = np.bincount(groups[:prefix], minlength=n_strata)
        open_ = [g for g in range(n_strata) if got[g] < counts[g]]
        assert not open_ or got.max() - min(got[g] for g in open_) <= 1


def test_random_without_strata_is_the_plain_seeded_draw() -> None:
    matrix = _matrix(np.zeros((60, 2)), ["a", "b"])
    plain = select(matrix, "random", 12, seed=5)
    rng = np.random.default_rng(5)
    assert plain.indices.tolist() == rng.choice(60, size=12, replace=False).tolist()
