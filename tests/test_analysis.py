"""AID, THI, coverage, overlap and the per-task summary, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from poise import select
from poise.analysis import (
    aid,
    aid_by_task,
    coverage,
    jaccard,
    overlap,
    profile,
    task_summary,
    thi,
)
from poise.errors import PoiseError
from poise.matrix import AttributionMatrix
from poise.synthetic import synthetic_matrix


def make_matrix(scores, tasks) -> AttributionMatrix:
    scores = np.asarray(scores, dtype=np.float32)
    return AttributionMatrix(scores=scores, column_ids=[f"v{j}" for j in range(scores.shape[1])], tasks=tasks)


@pytest.fixture
def small() -> AttributionMatrix:
    """5 rows, tasks a (columns 0, 2) and b (columns 1, 3) interleaved, different column scales."""
    return make_matrix(
        [
            [1.0, 10.0, 0.5, -3.0],
            [2.0, -20.0, 0.0, 1.0],
            [0.0, 30.0, 1.5, 0.0],
            [4.0, 0.0, -1.0, 2.0],
            [-1.0, 5.0, 2.0, 4.0],
        ],
        ["a", "b", "a", "b"],
    )


@pytest.fixture(scope="module")
def synthetic() -> AttributionMatrix:
    matrix, _ = synthetic_matrix(n_rows=1500, columns_per_task=4)
    return matrix


# ------------------------------------------------------------------------------------------- AID
def test_raw_aid_is_the_mean_of_the_selected_rows(small):
    # rows 0 and 3, by hand: ((1+4)/2, (10+0)/2, (0.5-1)/2, (-3+2)/2)
    np.testing.assert_allclose(aid(small, [0, 3], normalized=False), [2.5, 5.0, -0.25, -0.5])


def test_normalized_aid_is_the_mean_of_the_normalized_rows(small):
    dense = small.normalized()
    expected = dense[[4, 1, 2]].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(aid(small, [4, 1, 2]), expected, rtol=1e-6, atol=1e-7)
    # by hand for column 0: mean 1.2, population std sqrt(2.96); rows 4, 1, 2 -> (-1, 2, 0)
    by_hand = np.mean((np.array([-1.0, 2.0, 0.0]) - 1.2) / np.sqrt(2.96))
    assert aid(small, [4, 1, 2])[0] == pytest.approx(by_hand, rel=1e-6)


def test_aid_of_the_whole_pool_normalized_is_zero(small):
    np.testing.assert_allclose(aid(small, np.arange(5)), 0.0, atol=1e-6)


def test_aid_does_not_depend_on_pick_order_or_chunking(synthetic, monkeypatch):
    picks = np.random.default_rng(3).permutation(synthetic.n_rows)[:400]
    whole = aid(synthetic, picks)
    import poise.analysis as analysis

    monkeypatch.setattr(analysis, "_BLOCK_VALUES", synthetic.n_columns * 7)  # 7-row chunks
    np.testing.assert_allclose(aid(synthetic, picks[::-1]), whole, rtol=1e-12, atol=1e-12)
    expected = synthetic.normalized()[picks].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(whole, expected, rtol=1e-6, atol=1e-7)


def test_aid_by_task_groups_interleaved_columns_in_task_order(small):
    values = np.array([0.0, 1.0, 2.0, 3.0])
    split = aid_by_task(small, values)
    assert list(split) == ["a", "b"]
    np.testing.assert_array_equal(split["a"], [0.0, 2.0])
    np.testing.assert_array_equal(split["b"], [1.0, 3.0])


def test_aid_rejects_empty_out_of_range_and_wrong_shapes(small):
    with pytest.raises(PoiseError, match="empty"):
        aid(small, [])
    with pytest.raises(PoiseError, match="outside the matrix"):
        aid(small, [0, 5])
    with pytest.raises(PoiseError, match="outside the matrix"):
        aid(small, [-1])
    with pytest.raises(PoiseError, match="integers"):
        aid(small, np.array([0.5]))
    with pytest.raises(PoiseError, match="one value per validation column"):
        aid_by_task(small, np.zeros(3))


# ------------------------------------------------------------------------------------------- THI
def test_thi_task_wise_and_instance_wise_differ_when_one_column_spikes():
    # row 0: task a has one huge column but a mean of 0; task b is uniformly 3 -> task-wise b,
    # instance-wise a (column 0 = 10 is the single largest value)
    matrix = make_matrix([[10.0, -10.0, 3.0, 3.0]], ["a", "a", "b", "b"])
    assert thi(matrix, [0], mode="task", normalized=False) == {"a": 0, "b": 1}
    assert thi(matrix, [0], mode="instance", normalized=False) == {"a": 1, "b": 0}


def test_thi_task_wise_uses_the_per_task_mean_not_the_sum():
    # a has 1 column (mean 2, sum 2), b has 3 columns of 1 (mean 1, sum 3): the mean picks a
    matrix = make_matrix([[2.0, 1.0, 1.0, 1.0]], ["a", "b", "b", "b"])
    assert thi(matrix, [0], mode="task", normalized=False) == {"a": 1, "b": 0}


def test_thi_ties_go_to_the_first_task():
    matrix = make_matrix([[1.0, 1.0, 1.0, 1.0]], ["a", "a", "b", "b"])
    assert thi(matrix, [0], mode="task", normalized=False) == {"a": 1, "b": 0}
    assert thi(matrix, [0], mode="instance", normalized=False) == {"a": 1, "b": 0}


def test_normalized_thi_matches_argmax_on_the_dense_normalized_matrix(synthetic):
    picks = np.arange(0, synthetic.n_rows, 3)
    dense = synthetic.normalized()[picks].astype(np.float64)
    names = synthetic.task_names
    by_column = np.array([names.index(t) for t in synthetic.tasks])
    instance = np.bincount(by_column[dense.argmax(axis=1)], minlength=len(names))
    means = np.stack([dense[:, cols].mean(axis=1) for cols in synthetic.task_columns().values()], axis=1)
    task = np.bincount(means.argmax(axis=1), minlength=len(names))
    assert thi(synthetic, picks, mode="instance") == dict(zip(names, instance.tolist(), strict=True))
    assert thi(synthetic, picks, mode="task") == dict(zip(names, task.tolist(), strict=True))


@pytest.mark.parametrize("mode", ["task", "instance"])
@pytest.mark.parametrize("normalized", [True, False])
def test_thi_counts_every_task_and_sum_to_the_number_of_picks(synthetic, mode, normalized):
    picks = np.arange(0, synthetic.n_rows, 7)
    counts = thi(synthetic, picks, mode=mode, normalized=normalized)
    assert list(counts) == synthetic.task_names
    assert sum(counts.values()) == picks.size
    assert all(isinstance(n, int) and n >= 0 for n in counts.values())


def test_thi_of_an_empty_selection_is_all_zero_and_rejects_unknown_modes(small):
    assert thi(small, []) == {"a": 0, "b": 0}
    with pytest.raises(PoiseError, match="unknown THI mode"):
        thi(small, [0], mode="column")  # type: ignore[arg-type]


def test_raw_instance_max_selection_is_dominated_by_the_large_scale_task(synthetic):
    # the paper's Fig. 2/3 finding on the synthetic matrix: raw scores over-serve mmlu, BIDS balances
    raw = thi(synthetic, select(synthetic, "instance-max", 150).indices, normalized=False)
    balanced = thi(synthetic, select(synthetic, "bids", 150).indices)
    assert max(raw, key=raw.get) == "mmlu" and raw["mmlu"] > 0.5 * 150
    assert max(balanced.values()) < 0.3 * 150


# -------------------------------------------------------------------------------------- coverage
def test_coverage_last_point_equals_the_full_selection(synthetic):
    picks = select(synthetic, "bids", 300).indices
    cov = coverage(synthetic, picks, points=20)
    assert cov["sizes"][-1] == 300
    assert cov["sizes"] == sorted(set(cov["sizes"])) and len(cov["sizes"]) == 20
    counts = thi(synthetic, picks, mode="instance")
    summary = aid_by_task(synthetic, aid(synthetic, picks))
    for task in synthetic.task_names:
        assert cov["thi_share"][task][-1] == pytest.approx(counts[task] / 300)
        assert cov["mean_influence"][task][-1] == pytest.approx(summary[task].mean(), rel=1e-9, abs=1e-12)


def test_coverage_prefix_points_equal_the_prefix_selection(synthetic, monkeypatch):
    import poise.analysis as analysis

    monkeypatch.setattr(analysis, "_BLOCK_VALUES", synthetic.n_columns * 13)  # prefixes cross chunks
    picks = np.random.default_rng(1).permutation(synthetic.n_rows)[:97]
    cov = coverage(synthetic, picks, points=10, normalized=False)
    for position, k in enumerate(cov["sizes"]):
        counts = thi(synthetic, picks[:k], normalized=False)
        means = aid_by_task(synthetic, aid(synthetic, picks[:k], normalized=False))
        for task in synthetic.task_names:
            assert cov["thi_share"][task][position] == pytest.approx(counts[task] / k)
            assert cov["mean_influence"][task][position] == pytest.approx(means[task].mean(), rel=1e-9)


def test_coverage_of_fewer_picks_than_points_has_every_prefix(small):
    cov = coverage(small, [3, 1, 4], points=50)
    assert cov["sizes"] == [1, 2, 3]
    assert coverage(small, [], points=5) == {"sizes": [], "thi_share": {"a": [], "b": []},
                                             "mean_influence": {"a": [], "b": []}}


# --------------------------------------------------------------------------------------- overlap
def test_jaccard_identical_disjoint_and_partial():
    assert jaccard([1, 2, 3], [3, 2, 1]) == 1.0
    assert jaccard([1, 2], [3, 4]) == 0.0
    assert jaccard([1, 2, 3, 4], [3, 4, 5]) == pytest.approx(2 / 5)
    assert jaccard([1, 1, 2], [2]) == pytest.approx(1 / 2)  # duplicates ignored
    assert jaccard([], []) == 1.0


def test_overlap_is_a_symmetric_jaccard_matrix_with_unit_diagonal():
    lists = [np.array([0, 1, 2, 3]), np.array([2, 3, 4]), np.array([9])]
    result = overlap(lists)
    assert result.shape == (3, 3)
    np.testing.assert_array_equal(result, result.T)
    np.testing.assert_array_equal(np.diag(result), 1.0)
    assert result[0, 1] == pytest.approx(2 / 5)
    assert result[0, 2] == 0.0 and result[1, 2] == 0.0


# --------------------------------------------------------------------------------------- summary
def test_task_summary_combines_normalized_aid_and_both_thi_shares(synthetic):
    selection = select(synthetic, "instance-max", 120)
    summary = task_summary(synthetic, selection)
    assert list(summary) == synthetic.task_names
    values = aid_by_task(synthetic, aid(synthetic, selection.indices, normalized=True))
    instance = thi(synthetic, selection.indices, mode="instance")
    task = thi(synthetic, selection.indices, mode="task")
    for name, row in summary.items():
        assert row["mean_normalized_influence"] == pytest.approx(values[name].mean(), rel=1e-12)
        assert row["thi_share"] == pytest.approx(instance[name] / 120)
        assert row["thi_task_share"] == pytest.approx(task[name] / 120)
    assert sum(row["thi_share"] for row in summary.values()) == pytest.approx(1.0)
    assert task_summary(synthetic, selection.indices) == summary  # plain indices work too


def test_profile_is_aid_and_thi_in_one_pass(small):
    prof = profile(small, [0, 2, 4], normalized=False)
    np.testing.assert_allclose(prof.aid, aid(small, [0, 2, 4], normalized=False))
    assert prof.thi_task == thi(small, [0, 2, 4], mode="task", normalized=False)
    assert prof.thi_instance == thi(small, [0, 2, 4], mode="instance", normalized=False)
    assert prof.n_picks == 3


def test_analysis_imports_no_plotting_terminal_or_torch_modules():
    import subprocess
    import sys

    code = (
        "import sys, poise.analysis, poise.report; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'rich') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
