"""Reading, validating and writing attribution matrices."""

from __future__ import annotations

import json
import os

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


def test_float16_scores_npy_stays_float16_and_memory_mapped(small_files, tmp_path, monkeypatch) -> None:
    """A float16 matrix is read as stored (half the bytes of float32, never converted whole) and its blocks and
    rows come back as float32, exactly, also when its pages are handed back after each read; float64 is still
    converted to float32."""
    import torch
    from safetensors.numpy import save_file

    from poise import matrix as matrix_module

    monkeypatch.setattr(matrix_module, "RELEASE_BYTES", 0)
    monkeypatch.setattr(matrix_module, "ROW_BATCH", 2)

    half = small_files["array"].astype(np.float16)
    np.save(tmp_path / "half.npy", half)
    matrix = load_attribution(tmp_path / "half.npy", columns=small_files["columns"])
    assert isinstance(matrix.scores, np.memmap) and matrix.scores.dtype == np.float16 and matrix.memory_mapped
    assert matrix._mapping().releasing
    widened = half.astype(np.float32)
    np.testing.assert_array_equal(matrix.read_block(5, 17), widened[5:17])
    np.testing.assert_array_equal(matrix.read_rows([30, 2, 2, 11]), widened[[30, 2, 2, 11]])
    matrix.release_pages()  # hands the map's pages back; reading again faults them in from the file
    np.testing.assert_array_equal(np.vstack([b for _, b in matrix.iter_chunks(chunk_rows=3)]), widened)
    in_memory = AttributionMatrix(widened, matrix.column_ids, matrix.tasks)
    np.testing.assert_array_equal(matrix.column_stats().mean, in_memory.column_stats().mean)
    np.testing.assert_array_equal(matrix.column_stats().std, in_memory.column_stats().std)
    np.testing.assert_array_equal(matrix.normalized(), in_memory.normalized())
    save_file({"scores": half}, str(tmp_path / "half.safetensors"))
    torch.save(torch.from_numpy(half), tmp_path / "half.pt")
    for name in ("half.safetensors", "half.pt"):
        assert load_attribution(tmp_path / name, columns=small_files["columns"]).scores.dtype == np.float16
    np.save(tmp_path / "wide.npy", small_files["array"].astype(np.float64))
    assert load_attribution(tmp_path / "wide.npy", columns=small_files["columns"]).scores.dtype == np.float32


def test_a_memory_mapped_folder_saves_block_by_block_and_its_column_views_copy_nothing(small_files, tmp_path) -> None:
    half = small_files["array"].astype(np.float16)
    AttributionMatrix(half, list(range(6)), ["code", "code", "math", "math", "chat", "chat"], kind="influence").save(
        tmp_path / "a")
    matrix = load_attribution(tmp_path / "a")
    assert matrix.memory_mapped and matrix.scores.dtype == np.float16
    matrix.column_stats()
    view = matrix.select_tasks(["chat", "code"])
    assert view.scores is matrix.scores and view.stored_columns.tolist() == [0, 1, 4, 5]
    assert view.tasks == ["code", "code", "chat", "chat"] and view.n_columns == 4
    np.testing.assert_array_equal(view.read_block(0, 40), half[:, [0, 1, 4, 5]].astype(np.float32))
    np.testing.assert_array_equal(view.row(7), half[7, [0, 1, 4, 5]])
    copy = AttributionMatrix(half[:, [0, 1, 4, 5]].astype(np.float32), view.column_ids, view.tasks)
    np.testing.assert_array_equal(view.column_stats().std, copy.column_stats().std)  # the bits of a copy
    np.testing.assert_array_equal(view.select_columns([3, 0]).read_rows([1, 0]), half[[1, 0]][:, [5, 0]])
    saved = load_attribution(view.save(tmp_path / "b"))  # written block by block from the map
    assert saved.scores.dtype == np.float16
    np.testing.assert_array_equal(saved.scores, half[:, [0, 1, 4, 5]])
    assert saved.tasks == view.tasks and saved.kind == "influence"


def test_non_finite_float16_scores_are_refused_with_their_position(tmp_path) -> None:
    scores = np.ones((5, 2), np.float16)
    scores[2, 0] = np.inf
    np.save(tmp_path / "s.npy", scores)
    write_columns(tmp_path / "c.jsonl", ["a", "b"])
    with pytest.raises(PoiseError, match="row 2, column 0"):
        load_attribution(tmp_path / "s.npy", columns=tmp_path / "c.jsonl")


def _rss_file_mib() -> float:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_a_pass_over_a_large_memory_map_hands_its_pages_back(tmp_path, monkeypatch) -> None:
    """Read pages of a file mapping count in resident memory; without handing them back a pass over a 64 MiB
    map leaves all 64 MiB resident (a 2 GB matrix: 2 GB)."""
    from poise import matrix as matrix_module

    rows, columns = 32768, 1024  # 64 MiB of float16
    np.save(tmp_path / "s.npy", np.ones((rows, columns), np.float16))
    write_columns(tmp_path / "c.jsonl", ["a"] * columns)
    monkeypatch.setattr(matrix_module, "RELEASE_BYTES", 32 * 2**20)
    matrix = load_attribution(tmp_path / "s.npy", columns=tmp_path / "c.jsonl")
    matrix.release_pages()
    before = _rss_file_mib()
    for _ in matrix.iter_chunks():
        pass
    matrix.read_rows(np.arange(0, rows, 7))
    assert _rss_file_mib() - before < 16
    monkeypatch.setattr(matrix_module, "RELEASE_BYTES", 2**40)  # never hand back
    for _ in matrix.iter_chunks():
        pass
    assert _rss_file_mib() - before > 48
