"""Top-B rules (Appendix A.3), random, rds and budget parsing, against direct numpy computations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from oracles import normalize_naive

from poise import AttributionMatrix, PoiseError, select
from poise.selection.registry import parse_budget


def _matrix(scores, tasks, kind=None) -> AttributionMatrix:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AttributionMatrix(np.asarray(scores, dtype=np.float32), list(range(len(tasks))), tasks, kind=kind)


def _top(scores: np.ndarray, budget: int) -> list[int]:
    """Reference top-B: highest score first, ties to the lowest row (sorted by (-score, row))."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:budget]


@pytest.fixture
def matrix() -> AttributionMatrix:
    rng = np.random.default_rng(11)
    scores = np.round(rng.normal(size=(200, 7)) * [1, 2, 3, 10, 10, 0.1, 0.2], 1)  # rounding -> ties
    return _matrix(scores, ["a", "a", "b", "b", "b", "c", "c"])


def test_instance_max_takes_rows_by_their_best_column(matrix) -> None:
    a = matrix.scores.astype(np.float64)
    selection = select(matrix, "instance-max", 50)
    assert selection.indices.tolist() == _top(a.max(axis=1), 50)
    assert [p["column"] for p in selection.trace] == [int(a[i].argmax()) for i in selection.indices]


def test_sum_takes_rows_by_total_influence(matrix) -> None:
    a = matrix.scores.astype(np.float64)
    assert select(matrix, "sum", 50).indices.tolist() == _top(a.sum(axis=1), 50)


def test_task_max_uses_the_per_task_mean(matrix) -> None:
    a = matrix.scores.astype(np.float64)
    per_task = np.stack([a[:, :2].mean(1), a[:, 2:5].mean(1), a[:, 5:].mean(1)], axis=1)
    selection = select(matrix, "task-max", 50)
    assert selection.indices.tolist() == _top(per_task.max(axis=1), 50)
    assert [p["task"] for p in selection.trace] == [["a", "b", "c"][per_task[i].argmax()] for i in selection.indices]


def test_normalised_instance_max_is_instance_max_on_the_normalised_matrix(matrix) -> None:
    normalized = normalize_naive(matrix.scores)
    selection = select(matrix, "instance-max", 60, normalize=True)
    expected = _top(normalized.max(axis=1), 60)
    # float32 normalisation vs float64 reference: compare as sets of equal-score blocks
    assert selection.indices.tolist() == expected or sorted(selection.indices.tolist()) == sorted(expected)
    assert selection.label == "instance-max (norm)"


def test_ties_in_top_b_go_to_the_lowest_row_index() -> None:
    scores = [[1.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    assert select(_matrix(scores, ["x", "y"]), "instance-max", 3).indices.tolist() == [1, 2, 3]


def test_random_is_seeded_uniform_without_replacement(matrix) -> None:
    a = select(matrix, "random", 100, seed=3)
    b = select(matrix, "random", 100, seed=3)
    c = select(matrix, "random", 100, seed=4)
    assert a.indices.tolist() == b.indices.tolist() != c.indices.tolist()
    assert len(set(a.indices.tolist())) == 100
    assert all(p["score"] is None and p["task"] is None for p in a.trace)


def test_rds_refuses_an_influence_matrix_and_runs_instance_max_on_a_similarity_one(matrix) -> None:
    influence = _matrix(matrix.scores, matrix.tasks, kind="influence")
    with pytest.raises(PoiseError, match="needs a rds matrix"):
        select(influence, "rds", 10)
    similarity = _matrix(matrix.scores, matrix.tasks, kind="rds")
    assert select(similarity, "rds", 10).indices.tolist() == select(matrix, "instance-max", 10).indices.tolist()


def test_restricting_to_tasks_uses_only_their_columns(matrix) -> None:
    selection = select(matrix, "instance-max", 20, tasks=["c"])
    assert selection.indices.tolist() == _top(matrix.scores[:, 5:].astype(np.float64).max(axis=1), 20)
    with pytest.raises(PoiseError, match="unknown task 'nope'"):
        select(matrix, "bids", 20, tasks=["nope"])


@pytest.mark.parametrize(
    ("budget", "pool", "rows"),
    [("4500", 10_000, 4500), (4500, 10_000, 4500), ("0.15", 288_000, 43_200), (0.15, 288_000, 43_200),
     ("0.29", 100, 29), ("1.0", 7, 7), (1.0, 7, 7), ("1", 7, 1), ("0.999", 10, 9)],
)
def test_budget_whole_number_is_a_count_and_a_fraction_is_floored(budget, pool, rows) -> None:
    assert parse_budget(budget, pool) == rows


@pytest.mark.parametrize("budget", ["0", 0, -3, "-0.5", "0.0", "1.5", 1.5, "11", 11, "abc", "0.01", float("nan")])
def test_bad_budgets_are_refused(budget) -> None:
    with pytest.raises(PoiseError):
        parse_budget(budget, 10)


def test_every_method_returns_distinct_rows_in_pick_order_with_a_full_trace(matrix) -> None:
    from poise import METHODS

    for method in METHODS:
        m = _matrix(matrix.scores, matrix.tasks, kind="rds" if method == "rds" else None)
        selection = select(m, method, 30)
        assert len(set(selection.indices.tolist())) == 30
        assert [p["row"] for p in selection.trace] == selection.indices.tolist()
        assert [p["rank"] for p in selection.trace] == list(range(30))


def test_the_registry_and_the_method_literal_list_the_same_methods() -> None:
    """Adding a method is one function, one @register line and its name in options.SelectionMethod: kept equal."""
    from poise.options import SELECTION_METHODS
    from poise.selection import METHODS

    assert sorted(METHODS) == sorted(SELECTION_METHODS)


@pytest.mark.parametrize("tasks", [None, ["b", "c"]], ids=["all-tasks", "two-tasks"])
def test_every_method_on_a_memory_mapped_float16_matrix_in_tiny_blocks_picks_as_in_memory(
    tasks, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each method (and its normalised/raw variant) on a float16 scores.npy read through its memory map in 3-row
    blocks picks exactly what it picks on the same values in RAM as float32: the constant column and the task
    restriction are views of the map (nothing copied), and blocks change no score."""
    from poise import METHODS, load_attribution
    from poise import matrix as matrix_module

    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=(500, 8)) * [1, 2, 3, 10, 10, 0.1, 0.2, 1], 1).astype(np.float16)
    scores[:, 7] = 0.5  # a constant column: left out of every normalised selection
    column_tasks = ["a", "a", "b", "b", "b", "c", "c", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_memory = {kind: _matrix(scores.astype(np.float32), column_tasks, kind=kind) for kind in (None, "rds")}
        AttributionMatrix(scores, list(range(8)), column_tasks).save(tmp_path / "attribution")
        mapped = {kind: load_attribution(tmp_path / "attribution", kind=kind) for kind in (None, "rds")}
        expected = {(method, norm): select(in_memory["rds" if method == "rds" else None], method, 120, normalize=norm,
                                           tasks=tasks)
                    for method in METHODS for norm in (None, True, False)}
    assert mapped[None].memory_mapped and mapped[None].scores.dtype == np.float16
    view = mapped[None].select_columns([6, 2, 3])
    assert view.scores is mapped[None].scores and view.stored_columns.tolist() == [6, 2, 3]  # nothing copied
    copy = in_memory[None].select_columns([6, 2, 3])
    np.testing.assert_array_equal(view.column_stats().std, copy.column_stats().std)
    monkeypatch.setattr(matrix_module, "BLOCK_VALUES", 3 * 8)
    monkeypatch.setattr(matrix_module, "ROW_BATCH", 2)
    monkeypatch.setattr(matrix_module, "RELEASE_BYTES", 0)  # hand pages back however small the file
    for (method, norm), reference in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = select(mapped["rds" if method == "rds" else None], method, 120, normalize=norm, tasks=tasks)
        assert got.indices.tolist() == reference.indices.tolist(), (method, norm)
        assert got.trace == reference.trace, (method, norm)
