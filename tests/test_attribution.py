"""Reading, validating and writing attribution matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_columns

from poise import AttributionMatrix, PoiseError, load_attribution


def test_npy_safetensors_and_weights_only_pt_load_the_same_matrix(small_files) -> None:
    import torch
    from safetensors.numpy import save_file

    d, array = small_files["dir"], small_files["array"]
    save_file({"scores": array}, str(d / "a.safetensors"))
    torch.save(torch.from_numpy(array.astype(np.float64)), d / "a.pt")
    torch.save({"scores": torch.from_numpy(array)}, d / "b.pt")
    for name in ("scores.npy", "a.safetensors", "a.pt", "b.pt"):
        matrix = load_attribution(d / name, columns=small_files["columns"], rows=small_files["rows"])
        assert matrix.scores.dtype == np.float32
        np.testing.assert_array_equal(matrix.scores, array)
        assert matrix.task_names == ["code", "math", "chat"]
        assert matrix.row_id(3) == "ex3"


def test_attribution_folder_round_trips(small_files, tmp_path) -> None:
    matrix = load_attribution(small_files["scores"], columns=small_files["columns"], rows=small_files["rows"])
    matrix.kind = "influence"
    folder = matrix.save(tmp_path / "attribution")
    again = load_attribution(folder)
    np.testing.assert_array_equal(again.scores, matrix.scores)
    assert again.column_ids == matrix.column_ids and again.tasks == matrix.tasks
    assert again.row_ids == matrix.row_ids and again.kind == "influence"


def test_unequal_task_sizes_warn_in_task_max_only_not_on_every_load(tmp_path) -> None:
    import warnings

    from poise import select

    scores = np.zeros((3, 3), np.float32) + np.arange(3, dtype=np.float32)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading, BIDS and instance-max say nothing about it
        matrix = AttributionMatrix(scores, [0, 1, 2], ["a", "a", "b"])
        select(matrix, method="bids", budget=2)
        select(matrix, method="instance-max", budget=2)
    assert matrix.unequal_task_sizes() == "a=2, b=1"
    with pytest.warns(UserWarning, match="unequal numbers of validation columns"):
        select(matrix, method="task-max", budget=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused_with_their_position(bad) -> None:
    scores = np.ones((5, 2), np.float32)
    scores[3, 1] = bad
    with pytest.raises(PoiseError, match="row 3, column 1"):
        AttributionMatrix(scores, [0, 1], ["a", "b"])


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (0, 3), (3, 0)])
def test_scores_of_the_wrong_shape_are_refused(tmp_path, shape) -> None:
    np.save(tmp_path / "s.npy", np.ones(shape, np.float32))
    write_columns(tmp_path / "c.jsonl", ["a", "b", "c"])
    with pytest.raises(PoiseError):
        load_attribution(tmp_path / "s.npy", columns=tmp_path / "c.jsonl")


def test_columns_file_must_name_a_task_per_line(tmp_path) -> None:
    np.save(tmp_path / "s.npy", np.ones((2, 2), np.float32))
    (tmp_path / "c.jsonl").write_text('{"id": 0, "task": "a"}\n{"id": 1}\n')
    with pytest.raises(PoiseError, match=r"c.jsonl:2: missing field 'task'"):
        load_attribution(tmp_path / "s.npy", columns=tmp_path / "c.jsonl")
    (tmp_path / "c.jsonl").write_text('{"id": 0, "task": "a"}\n{"id": 1, "task": ""}\n')
    with pytest.raises(PoiseError, match=r"c.jsonl:2: field 'task' must be a non-empty string"):
        load_attribution(tmp_path / "s.npy", columns=tmp_path / "c.jsonl")
    (tmp_path / "c.jsonl").write_text('{"id": 0, "task": "a"}\nnot json\n')
    with pytest.raises(PoiseError, match=r"c.jsonl:2: not valid JSON"):
        load_attribution(tmp_path / "s.npy", columns=tmp_path / "c.jsonl")


def test_non_numeric_and_object_arrays_are_refused(tmp_path) -> None:
    np.save(tmp_path / "s.npy", np.ones((2, 2), bool))
    write_columns(tmp_path / "c.jsonl", ["a", "b"])
    with pytest.raises(PoiseError, match="real numbers"):
        load_attribution(tmp_path / "s.npy", columns=tmp_path / "c.jsonl")
    np.save(tmp_path / "o.npy", np.array([[{"x": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(PoiseError, match="not a plain numeric"):
        load_attribution(tmp_path / "o.npy", columns=tmp_path / "c.jsonl")


class Payload:
    """A pickled object outside torch's weights-only allow-list: loading it would run arbitrary code."""


def test_pickle_only_pt_is_refused_without_unpickling(tmp_path, small_files) -> None:
    import torch

    torch.save({"scores": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PoiseError, match="refusing to unpickle"):
        load_attribution(tmp_path / "evil.pt", columns=small_files["columns"])


def test_rows_file_must_match_the_number_of_rows(small_files, tmp_path) -> None:
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(39)))
    with pytest.raises(PoiseError, match="39 rows listed but"):
        load_attribution(small_files["scores"], columns=small_files["columns"], rows=tmp_path / "r.jsonl")
