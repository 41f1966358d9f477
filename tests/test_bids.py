"""Fast BIDS returns exactly the picks of the naive Algorithm-1 loop (tests/oracles.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from oracles import bids_naive, normalize_naive

from poise import AttributionMatrix, select
from poise.errors import PoiseError
from poise.selection.bids import bids_fast


def _matrix(scores: np.ndarray, n_tasks: int = 3) -> AttributionMatrix:
    v = scores.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AttributionMatrix(scores.astype(np.float32), list(range(v)), [f"t{j % n_tasks}" for j in range(v)])


def _random_case(seed: int) -> tuple[np.ndarray, int]:
    """Varied shapes and per-column scales; every 3rd has heavy ties, every 4th a constant column,
    every 5th a budget of the whole pool; some are large enough that prefixes must grow."""
    rng = np.random.default_rng(seed)
    big = seed % 6 == 5
    n = int(rng.integers(1200, 2500)) if big else int(rng.integers(1, 80))
    v = int(rng.integers(1, 10))
    shared = rng.normal(size=(n, 1))
    scores = (rng.uniform(0, 1) * shared + rng.normal(size=(n, v))) * rng.lognormal(0, 2, size=v)
    scores += rng.normal(0, 5, size=v)
    if seed % 3 == 0:
        scores = np.round(scores / scores.std(axis=0, keepdims=True).clip(1e-9) * 1.5)
    if seed % 4 == 0:
        scores[:, int(rng.integers(0, v))] = rng.normal()
    budget = n if seed % 5 == 0 else int(rng.integers(1, n + 1))
    return scores.astype(np.float32), budget


@pytest.mark.parametrize("seed", range(60))
def test_fast_bids_equals_naive_loop_pick_for_pick(seed: int) -> None:
    scores, budget = _random_case(seed)
    matrix = _matrix(scores)
    fast = bids_fast(matrix, budget, normalize=True)
    rows, gains, columns = bids_naive(matrix.normalized(), budget)
    assert fast.rows.tolist() == rows
    assert fast.columns.tolist() == columns
    np.testing.assert_array_equal(fast.scores, np.array(gains))


@pytest.mark.parametrize("seed", range(8))
def test_fast_bids_without_normalisation_equals_naive_on_raw_scores(seed: int) -> None:
    scores, budget = _random_case(seed + 100)
    matrix = _matrix(scores)
    fast = bids_fast(matrix, budget, normalize=False)
    rows, _, columns = bids_naive(scores, budget)
    assert fast.rows.tolist() == rows
    assert fast.columns.tolist() == columns


def test_ties_go_to_the_lowest_row_index() -> None:
    scores = np.array([[1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]], dtype=np.float32)
    fast = bids_fast(_matrix(scores, 2), 5, normalize=False)
    assert fast.rows.tolist() == bids_naive(scores, 5)[0]
    assert fast.rows[0] == 1  # rows 1, 2, 3, 4 all gain 3; row 1 wins


def test_rounding_ties_between_distinct_values_resolve_like_the_naive_loop() -> None:
    # Distinct float32 values near 0 whose differences from a large running mean round to the same float64.
    tiny = np.float32(1e-30)
    scores = np.zeros((6, 2), dtype=np.float32)
    scores[:, 0] = [50.0, 0.0, tiny, 2 * tiny, 3 * tiny, 0.0]
    scores[:, 1] = [-50.0, 0.0, 0.0, 0.0, 0.0, 1e-31]
    fast = bids_fast(_matrix(scores, 2), 6, normalize=False)
    assert fast.rows.tolist() == bids_naive(scores, 6)[0]


def test_zero_variance_column_takes_no_part_in_the_selection() -> None:
    scores = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    scores[:, 1] = 4.2
    matrix = AttributionMatrix(scores, [0, 1, 2], ["a", "b", "c"])
    normalized = matrix.normalized()
    assert np.all(normalized[:, 1] == 0.0)  # the analyses see zeros
    np.testing.assert_allclose(normalized, normalize_naive(scores), rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=r"1 validation column\(s\) are constant over the pool \(1\); they take no "
                                         r"part in the selection"):
        selection = select(matrix, "bids", 30)
    # the naive loop on the matrix without the constant column: the same picks, column indices of the full matrix
    rows, _, columns = bids_naive(normalized[:, [0, 2]], 30)
    assert selection.indices.tolist() == rows
    assert [p["column"] for p in selection.trace] == [[0, 2][j] for j in columns]
    assert all(p["column"] != 1 for p in selection.trace)


def test_a_constant_column_does_not_make_picks_follow_row_order() -> None:
    matrix = AttributionMatrix(np.array([[1, 5], [2, 5], [3, 5]], np.float32), ["x", "y"], ["a", "b"])
    with pytest.warns(UserWarning, match="constant"):
        assert select(matrix, "bids", 3).indices.tolist() == [2, 1, 0]  # was [2, 0, 1]: gain 0 from column y
    with pytest.warns(UserWarning, match="constant"):
        assert select(matrix, "instance-max", 3, normalize=True).indices.tolist() == [2, 1, 0]
    assert select(matrix, "instance-max", 3).indices.tolist() == [0, 1, 2]  # raw: all rows max 5, ties by row


def test_every_column_constant_is_one_error() -> None:
    matrix = AttributionMatrix(np.full((4, 2), 3.0, np.float32), ["x", "y"], ["a", "b"])
    with pytest.raises(PoiseError, match="every validation column is constant"):
        select(matrix, "bids", 2)


def test_gains_may_turn_negative_and_the_budget_is_still_filled() -> None:
    scores = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    selection = select(_matrix(scores), "bids", 50)
    assert sorted(selection.indices.tolist()) == list(range(50))
    assert min(p["score"] for p in selection.trace) < 0


def test_bids_trace_names_the_column_and_task_served() -> None:
    scores = np.random.default_rng(4).normal(size=(60, 6)).astype(np.float32)
    matrix = _matrix(scores)
    selection = select(matrix, "bids", 20)
    _, gains, columns = bids_naive(matrix.normalized(), 20)
    assert [p["column"] for p in selection.trace] == columns
    assert [p["task"] for p in selection.trace] == [matrix.tasks[j] for j in columns]
    assert [p["score"] for p in selection.trace] == gains


def test_column_statistics_match_float64_numpy() -> None:
    rng = np.random.default_rng(5)
    scores = (rng.normal(size=(40_000, 5)) * [1e-3, 1, 1e3, 5, 7] + [1e4, 0, -3, 2, 1]).astype(np.float32)
    stats = _matrix(scores).column_stats()
    np.testing.assert_allclose(stats.mean, scores.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, scores.astype(np.float64).std(axis=0), rtol=1e-7)


@pytest.mark.parametrize("seed", range(12))
def test_growing_short_prefixes_keeps_fast_bids_exact(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefixes of ~1 row force every column to grow (and tie runs to cross prefix ends)."""
    from poise.selection import bids

    monkeypatch.setattr(bids, "MIN_PREFIX", 1)
    monkeypatch.setattr(bids, "PREFIX_FACTOR", 0)
    grown = []
    original = bids._Prefixes.grow
    monkeypatch.setattr(bids._Prefixes, "grow", lambda self, j: (grown.append(j), original(self, j)))
    scores, budget = _random_case(seed)
    matrix = _matrix(scores)
    fast = bids_fast(matrix, budget)
    assert fast.rows.tolist() == bids_naive(matrix.normalized(), budget)[0]
    if budget > 2 * scores.shape[1]:
        assert grown


def _memory_mapped_copy(scores: np.ndarray, folder, n_tasks: int = 3) -> AttributionMatrix:
    """The scores as a float16 poise attribution folder, loaded back (memory-mapped)."""
    from poise.matrix import load_attribution

    v = scores.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AttributionMatrix(scores.astype(np.float16), list(range(v)), [f"t{j % n_tasks}" for j in range(v)]).save(folder)
        return load_attribution(folder)


@pytest.mark.parametrize("seed", range(12))
def test_memory_mapped_float16_in_tiny_blocks_picks_what_the_in_memory_matrix_picks(
    seed: int, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bounded-memory path - a float16 scores.npy read through its memory map in blocks of 5 rows, scattered
    rows 3 at a time, its pages handed back after each, prefixes of 1 row placed from a 7-row sample and
    refilled by streaming passes - gives
    exactly the picks, gains and served columns of the in-memory float32 matrix (default blocks)."""
    from poise import matrix as matrix_module
    from poise.selection import bids

    scores, budget = _random_case(seed + 300)
    scores = (scores / max(1e-30, float(np.abs(scores).max())) * 100).astype(np.float16)  # float16 range
    in_memory = _matrix(scores.astype(np.float32))
    expected = {norm: select(in_memory, "bids", budget, normalize=norm) for norm in (True, False)
                if norm is False or not bool(np.all(scores == scores[0]))}
    mapped = _memory_mapped_copy(scores, tmp_path / "attribution")
    assert mapped.memory_mapped and mapped.scores.dtype == np.float16
    monkeypatch.setattr(matrix_module, "BLOCK_VALUES", 5 * scores.shape[1])
    monkeypatch.setattr(matrix_module, "ROW_BATCH", 3)
    monkeypatch.setattr(matrix_module, "RELEASE_BYTES", 0)  # hand pages back however small the file
    monkeypatch.setattr(bids, "SAMPLE_ROWS", 7)
    monkeypatch.setattr(bids, "MIN_PREFIX", 1)
    monkeypatch.setattr(bids, "PREFIX_FACTOR", 0)
    for norm, reference in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = select(mapped, "bids", budget, normalize=norm)
        assert got.indices.tolist() == reference.indices.tolist()
        assert got.trace == reference.trace  # gains and served columns too


def test_refills_of_a_memory_mapped_matrix_stay_exact_and_bounded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw BIDS crowds into the large-scale columns, so their prefixes run out again and again: every refill is a
    streaming pass, a prefix never holds more than the prune limit, and the picks stay the naive loop's."""
    from poise import matrix as matrix_module
    from poise.selection import bids

    monkeypatch.setattr(matrix_module, "RELEASE_BYTES", 0)
    rng = np.random.default_rng(9)
    scores = (rng.normal(size=(3000, 6)) * [20, 18, 1, 1, 1, 1]).astype(np.float16)
    mapped = _memory_mapped_copy(scores, tmp_path / "attribution")
    monkeypatch.setattr(bids, "MIN_PREFIX", 8)
    monkeypatch.setattr(bids, "PREFIX_FACTOR", 0)
    monkeypatch.setattr(bids, "PREFIX_VALUES", 6 * 32)  # at most 32 rows asked for per refill
    seen = []
    original = bids._Prefixes._fill

    def fill(self, cols, floor):
        original(self, cols, floor)
        seen.append(max(o.shape[0] for o in self.orders))

    monkeypatch.setattr(bids._Prefixes, "_fill", fill)
    fast = bids_fast(mapped, 600, normalize=False)
    assert fast.rows.tolist() == bids_naive(scores.astype(np.float32), 600)[0]
    assert len(seen) > 5  # many refills
    assert max(seen) <= (bids.PRUNE_FACTOR + 1) * 32  # what a fill kept (pruned to the limit) + the unused rest
