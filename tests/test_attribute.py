"""Features -> attribution matrix, and `poise select` on it with no conversion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pipeline_fixtures import write_checkpoint, write_model, write_pool, write_validation
from tolerances import assert_same_sums

from poise.attribution import compute_attribution
from poise.config import AttributeConfig, FeaturesConfig
from poise.errors import PoiseError
from poise.features.stage import run_features
from poise.features.store import read_features
from poise.matrix import load_attribution


def stored_rows(folder: Path) -> np.ndarray:
    """A features folder's rows as float32, read back from its store (float16 by default)."""
    reader = read_features(folder)[0]
    return reader.rows(0, reader.shape[0])


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Two checkpoints; train (adam) and validation (sgd) features of each (the default float16 store);
    representations."""
    root = tmp_path_factory.mktemp("attribute")
    model = write_model(root / "model")
    pool, val = write_pool(root / "pool.jsonl"), write_validation(root / "validation")
    paths: dict[str, Path] = {"root": root, "model": model, "pool": pool}
    for k in (1, 2):
        ckpt = write_checkpoint(root / f"checkpoint-{k}", model, seed=k)
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        meta["lr_mean"] = [3e-5, 1e-5][k - 1]
        (ckpt / "checkpoint.json").write_text(json.dumps(meta))
        for split, data, kind in (("train", pool, "adam"), ("val", val, "sgd")):
            out = root / "features" / f"checkpoint-{k}" / split
            run_features(FeaturesConfig(data=[str(data)], out=str(out), checkpoint=str(ckpt), kind=kind,
                                        projection="sjlt", dim=256, max_seq_length=64))
            paths[f"{split}{k}"] = out
    for split, data in (("train", pool), ("val", val)):
        out = root / "features" / "reps" / split
        run_features(FeaturesConfig(data=[str(data)], out=str(out), model=str(model), kind="reps", max_seq_length=64))
        paths[f"reps-{split}"] = out
    return paths


def test_attribution_is_the_lr_weighted_sum_of_cosines(run, tmp_path) -> None:
    out = compute_attribution(AttributeConfig(train=[str(run["train1"]), str(run["train2"])],
                                              val=[str(run["val1"]), str(run["val2"])], out=str(tmp_path / "a")))
    matrix = load_attribution(out)
    assert json.loads((run["train1"] / "info.json").read_text())["store"] == "float16"
    # float16 rows are unit vectors only to float16 precision: the cosine normalises them again
    t1, t2, v1, v2 = (unit(stored_rows(run[name]).astype(np.float64)) for name in ("train1", "train2", "val1", "val2"))
    expected = 0.75 * (t1 @ v1.T) + 0.25 * (t2 @ v2.T)  # lr 3e-5 and 1e-5, normalised to sum 1
    # float32 normalisation (d squares) and dot products of d terms, then the weighted sum: the bound of
    # tests/tolerances.py
    abs_sums = 0.75 * (np.abs(t1) @ np.abs(v1).T) + 0.25 * (np.abs(t2) @ np.abs(v2).T)
    assert_same_sums(matrix.scores, expected, abs_sums, n_terms=t1.shape[1] + 4)
    assert matrix.kind == "influence" and matrix.task_names == ["code", "math"]
    assert matrix.row_id(0) == "ex0" and matrix.n_rows == 24 and matrix.n_columns == 6


def test_streaming_over_row_chunks_gives_the_same_matrix(run, tmp_path) -> None:
    args = dict(train=[str(run["train1"])], val=[str(run["val1"])])
    a = compute_attribution(AttributeConfig(**args, out=str(tmp_path / "a")))
    b = compute_attribution(AttributeConfig(**args, out=str(tmp_path / "b"), chunk_rows=5))
    # BLAS blocks differently for other chunk shapes: equal up to float32 rounding, not bit for bit
    t, v = stored_rows(run["train1"]), stored_rows(run["val1"])
    assert_same_sums(np.load(a / "scores.npy"), np.load(b / "scores.npy"), np.abs(t) @ np.abs(v).T,
                     n_terms=t.shape[1])


def test_poise_select_runs_on_the_attribute_output_with_no_conversion(run, tmp_path) -> None:
    attribution = tmp_path / "attribution"
    command = [sys.executable, "-m", "poise"]
    made = subprocess.run([*command, "attribute", "--train", f"{run['train1']},{run['train2']}",
                           "--val", f"{run['val1']},{run['val2']}", "--out", str(attribution)],
                          capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    picked = subprocess.run([*command, "select", "--attribution", str(attribution), "--method", "bids",
                             "--budget", "0.25", "--pool", str(run["pool"]), "--out", str(tmp_path / "sel")],
                            capture_output=True, text=True, check=False)
    assert picked.returncode == 0, picked.stderr
    selection = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert len(selection["indices"]) == 6 and {p["task"] for p in selection["trace"]} <= {"code", "math"}
    pool = run["pool"].read_text().splitlines()
    assert (tmp_path / "sel" / "selected.jsonl").read_text().splitlines() == [pool[i] for i in selection["indices"]]


def test_rds_matrix_from_representations_feeds_the_rds_method(run, tmp_path) -> None:
    from poise import select

    out = compute_attribution(AttributeConfig(train=[str(run["reps-train"])], val=[str(run["reps-val"])],
                                              out=str(tmp_path / "rds"), rds=True))
    matrix = load_attribution(out)
    assert matrix.kind == "rds"
    assert np.all(np.abs(matrix.scores) <= 1.0 + 1e-5)
    assert len(select(matrix, "rds", 5).indices) == 5
    with pytest.raises(PoiseError, match="pass --rds"):
        compute_attribution(AttributeConfig(train=[str(run["reps-train"])], val=[str(run["reps-val"])],
                                            out=str(tmp_path / "x")))


def test_features_of_mismatched_settings_are_refused_in_one_line(run, tmp_path) -> None:
    # validation features of checkpoint 2 with train features of checkpoint 1
    with pytest.raises(PoiseError, match="different checkpoint"):
        compute_attribution(
            AttributeConfig(train=[str(run["train1"])], val=[str(run["val2"])], out=str(tmp_path / "x"))
        )
    # another projection dimension
    other = tmp_path / "dim64"
    run_features(FeaturesConfig(data=[str(run["pool"])], out=str(other), checkpoint=str(run["root"] / "checkpoint-1"),
                                kind="adam", projection="sjlt", dim=64, max_seq_length=64))
    result = subprocess.run(
        [sys.executable, "-m", "poise", "attribute", "--train", str(other), "--val", str(run["val1"]),
         "--out", str(tmp_path / "y")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poise: error:") and "projection" in lines[0]


def test_a_checkpoint_with_zero_mean_learning_rate_is_explained(run, tmp_path) -> None:
    ckpt = Path(json.loads((run["train2"] / "info.json").read_text())["settings"]["checkpoint"]) / "checkpoint.json"
    original = ckpt.read_text()
    try:
        ckpt.write_text(json.dumps({**json.loads(original), "lr_mean": 0.0}))
        with pytest.warns(UserWarning, match=r"checkpoint-2 gets weight 0 and its features count for nothing: its "
                                             r"epoch trained with a mean learning rate of 0"):
            compute_attribution(AttributeConfig(train=[str(run["train1"]), str(run["train2"])],
                                                val=[str(run["val1"]), str(run["val2"])], out=str(tmp_path / "a")))
        with pytest.raises(PoiseError, match="every checkpoint has weight 0: .* warm up on more examples") as info:
            compute_attribution(AttributeConfig(train=[str(run["train2"])], val=[str(run["val2"])],
                                                out=str(tmp_path / "b")))
        assert "\n" not in str(info.value)
    finally:
        ckpt.write_text(original)
