"""RDS+ (Ivison et al. 2025): `--pooling weighted-mean` representations equal the reference's batch-size-1 formula
whichever side a padded batch is padded on; `poise attribute --rds` on them writes an `rds+` matrix; a run config
with a method that needs `rds+` builds base-model representations (no warmup) and `attribution-rds+`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import conversation, write_model, write_pool, write_validation
from tiny import write_jsonl

from poise.config import AttributeConfig, FeaturesConfig
from poise.errors import PoiseError
from poise.features.stage import run_features
from poise.io import disk_size

MAX_SEQ_LENGTH = 64
# Both sides run the same float32 forward of the same tokens at the same positions (poise passes position ids
# counted from each example's first real token); a padded batch changes only the blocking and order of the
# float32 reductions, and the masked keys add exp(-large) = 0 exactly to the softmax. Through the tiny model's
# two layers that moves a hidden state by a few dozen units of float32 roundoff (u = 6e-8), and the pooling,
# a sum of at most 64 terms with positive weights, adds at most gamma_64 = 64u = 3.8e-6 relative. 1e-5
# (~170u) bounds both, the tolerance tests/test_features.py uses for the same batched-vs-batch-size-1
# comparison of gradients; the nearest wrong formulas (the unweighted mean, weights by padded-batch column)
# miss the reference by far more (asserted below).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rds-plus")
    model = write_model(root / "model")
    left = write_model(root / "model-left", padding_side="left")
    from poise.model import load_tokenizer

    assert load_tokenizer(str(left)).padding_side == "left" and load_tokenizer(str(model)).padding_side == "right"
    return {"root": root, "model": model, "model_left": left, "pool": write_pool(root / "pool.jsonl"),
            "validation": write_validation(root / "validation")}


def reference_rds_plus(model_folder: Path, pool: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The RDS+ representation of each example, one example at a time (no padding), as the reference computes it:
    hamishivi/automated-instruction-selection, minimal_multitask/compute_influence_cosinesim.py at commit
    df71a044d567976e37bebeae53cd59f992b1ea09, lines 132-138 (train) and 163-169 (test), run with batch size 1.

    Restated: with h_0 .. h_{T-1} the final-layer hidden states of an example of T tokens, weights
    w_p = (p+1) / sum_{q<T} (q+1); the representation is sum_p w_p h_p, then divided by its L2 norm. The
    weighted sum is taken here in float64 from the float32 hidden states. Also returns two wrong formulas
    (plain mean; weights by column of a left-padded batch of width 64) to show the tolerance tells them apart.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poise.data import read_examples, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    _, tokenized, _ = tokenize_examples(read_examples(pool), tokenizer, MAX_SEQ_LENGTH, progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    rows, means, shifted = [], [], []
    for item in tokenized:
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([item.input_ids]), output_hidden_states=True).hidden_states[-1]
        h = hidden[0].double().numpy()  # (T, hidden)
        t = h.shape[0]
        weights = np.arange(t, dtype=np.float64) + 1
        rows.append((weights / weights.sum()) @ h)
        means.append(h.mean(0))
        columns = np.arange(MAX_SEQ_LENGTH - t, MAX_SEQ_LENGTH, dtype=np.float64) + 1  # padded-batch positions
        shifted.append((columns / columns.sum()) @ h)

    def unit(x: list[np.ndarray]) -> np.ndarray:
        a = np.stack(x)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return unit(rows), {"mean": unit(means), "padded columns": unit(shifted)}


def padded_batches(model_folder: Path, pool: Path, max_batch_size: int) -> int:
    """How many of the features stage's batches hold examples of different lengths (so are padded)."""
    from transformers import AutoTokenizer

    from poise.data import batch_plan, read_examples, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    _, tokenized, _ = tokenize_examples(read_examples(pool), tokenizer, MAX_SEQ_LENGTH, progress=False)
    lengths = [len(item.input_ids) for item in tokenized]
    plan = batch_plan(lengths, FeaturesConfig.max_tokens, max_batch_size)
    return sum(len({lengths[i] for i in plan[k]}) > 1 for k in range(len(plan)))


def reps(setup, out: Path, data: Path, **overrides) -> np.ndarray:
    settings = {"model": str(setup["model"]), "kind": "reps", "pooling": "weighted-mean",
                "max_seq_length": MAX_SEQ_LENGTH, "output_dtype": "float32", **overrides}
    run_features(FeaturesConfig(data=[str(data)], out=str(out), **settings))
    return np.load(out / "features.npy")


@pytest.mark.parametrize("side", ["right", "left"])
def test_weighted_mean_equals_the_rds_plus_batch_size_1_formula_for_either_padding_side(setup, tmp_path,
                                                                                         side) -> None:
    folder = setup["model" if side == "right" else "model_left"]
    assert padded_batches(folder, setup["pool"], 8) >= 2
    got = reps(setup, tmp_path / "reps", setup["pool"], model=str(folder), max_batch_size=8)
    ref, wrong = reference_rds_plus(folder, setup["pool"])
    assert got.shape == ref.shape == (24, 32)
    errors = np.linalg.norm(got - ref, axis=1)  # both rows are unit vectors: absolute = relative error
    assert errors.max() < TOLERANCE, f"worst row differs by {errors.max():.3g}"
    for name, other in wrong.items():
        assert np.linalg.norm(other - ref, axis=1).max() > 100 * TOLERANCE, name
    info = json.loads((tmp_path / "reps" / "info.json").read_text())
    assert info["settings"]["pooling"] == "weighted-mean" and info["settings"]["checkpoint"] is None


def test_left_and_right_padding_give_the_same_weighted_mean(setup, tmp_path) -> None:
    right = reps(setup, tmp_path / "right", setup["pool"], max_batch_size=8)
    left = reps(setup, tmp_path / "left", setup["pool"], model=str(setup["model_left"]), max_batch_size=8)
    one = reps(setup, tmp_path / "one", setup["pool"], max_batch_size=1)
    assert np.linalg.norm(right - left, axis=1).max() < 2 * TOLERANCE
    assert np.linalg.norm(right - one, axis=1).max() < 2 * TOLERANCE


def test_attribute_rds_on_weighted_mean_reps_writes_an_rds_plus_matrix(setup, tmp_path) -> None:
    from poise.attribution import compute_attribution
    from poise.matrix import load_attribution
    from poise.selection import select

    for pooling, kind in (("weighted-mean", "rds+"), ("last", "rds")):
        train = tmp_path / pooling / "train"
        val = tmp_path / pooling / "val"
        reps(setup, train, setup["pool"], pooling=pooling)
        reps(setup, val, setup["validation"], pooling=pooling)
        out = tmp_path / pooling / "attribution"
        compute_attribution(AttributeConfig(train=[str(train)], val=[str(val)], out=str(out), rds=True))
        assert json.loads((out / "info.json").read_text())["kind"] == kind
        assert load_attribution(out).kind == kind
    with pytest.raises(PoiseError, match="--pooling weighted-mean") as error:
        select(load_attribution(tmp_path / "last" / "attribution"), "rds+", 4)
    assert "\n" not in str(error.value)
    with pytest.raises(PoiseError, match="needs a rds matrix"):
        select(load_attribution(tmp_path / "weighted-mean" / "attribution"), "rds", 4)


def test_rds_plus_representations_of_an_adapted_checkpoint_are_said_not_to_be_the_papers(setup, tmp_path) -> None:
    """RDS+ takes its representations from the base model; weighted-mean reps of a warmup checkpoint still make
    an rds+ matrix, with one warning line that this is not the paper's RDS+."""
    from pipeline_fixtures import write_checkpoint

    from poise.attribution import compute_attribution

    checkpoint = write_checkpoint(tmp_path / "checkpoint", setup["model"])
    for split, data in (("train", setup["pool"]), ("val", setup["validation"])):
        reps(setup, tmp_path / split, data, checkpoint=str(checkpoint))
    with pytest.warns(Warning, match="the paper's RDS\\+ takes them from the base model"):
        compute_attribution(AttributeConfig(train=[str(tmp_path / "train")], val=[str(tmp_path / "val")],
                                            out=str(tmp_path / "attribution"), rds=True))
    assert json.loads((tmp_path / "attribution" / "info.json").read_text())["kind"] == "rds+"


def test_mixing_poolings_across_checkpoints_is_refused(setup, tmp_path) -> None:
    from poise.attribution import compute_attribution

    folders = {}
    for pooling in ("weighted-mean", "last"):
        for split, data in (("train", setup["pool"]), ("val", setup["validation"])):
            folders[pooling, split] = tmp_path / pooling / split
            reps(setup, folders[pooling, split], data, pooling=pooling)
    config = AttributeConfig(train=[str(folders["weighted-mean", "train"]), str(folders["last", "train"])],
                             val=[str(folders["weighted-mean", "val"]), str(folders["last", "val"])],
                             out=str(tmp_path / "a"), rds=True, weights=["1", "1"])
    with pytest.raises(PoiseError, match="made with a different pooling"):
        compute_attribution(config)


# --------------------------------------------------------------------------------------------- poise run
@pytest.fixture
def rds_plus_method(monkeypatch):
    """The registry's `rds+` method (a stand-in with requires_kind="rds+" where it is not registered yet)."""
    from poise.options import SELECTION_METHODS
    from poise.selection.registry import METHODS, Method

    if "rds+" not in METHODS:
        rds = METHODS["rds"]
        monkeypatch.setitem(METHODS, "rds+", Method("rds+", rds.fn, False, "rds+", "stand-in"))
    if "rds+" not in SELECTION_METHODS:
        pytest.skip("options.SelectionMethod does not list rds+ yet")
    return METHODS["rds+"]


def run_inputs(root: Path, model: Path) -> dict:
    write_pool(root / "pool.jsonl", 24)
    for k, task in enumerate(("math", "code")):
        write_jsonl(root / "validation" / f"{task}.jsonl", [conversation(100 + 10 * k + i, 3 + i) for i in range(3)])
    return {"model": str(model), "pool": str(root / "pool.jsonl"), "validation": str(root / "validation"),
            "out": str(root / "run"), "max_seq_length": MAX_SEQ_LENGTH,
            "warmup": {"epochs": 2, "fraction": 0.5, "batch_size": 4, "lora_r": 4, "lora_alpha": 8},
            "features": {"dim": 2048, "max_batch_size": 4},
            "select": {"methods": ["bids", "rds+"], "budgets": ["0.25"]},
            "train": {"methods": ["bids"]}, "evaluate": {"base": False}}


def test_run_builds_base_model_rds_plus_units_that_need_no_warmup(setup, tmp_path, rds_plus_method) -> None:
    from poise import pipeline

    data = run_inputs(tmp_path, setup["model"])
    run_config = pipeline.parse_config(data, "config")
    found = pipeline.check_inputs(run_config, data["pool"], data["validation"], None)
    units = {u.name: u for u in pipeline.build_units(run_config, tmp_path / "run", found)}
    for split in ("train", "val"):
        unit = units[f"features/reps-rds+/{split}"]
        assert unit.needs == [] and unit.config.kind == "reps" and unit.config.pooling == "weighted-mean"
        assert unit.config.checkpoint is None and unit.config.model == str(setup["model"])
    attribution = units["attribution-rds+"]
    assert attribution.needs == ["features/reps-rds+/train", "features/reps-rds+/val"] and attribution.config.rds
    assert units["selections/rds+-0.25"].needs == ["attribution-rds+"]
    assert units["selections/bids-0.25"].needs == ["attribution"]
    assert not any(name.startswith("features/reps/") or name == "attribution-rds" for name in units)
    # `poise run --plan` estimates them (a forward pass of the base model; a matrix of hidden-size cosines)
    from poise.pipeline.estimate import Throughput, estimate_units

    estimates, _ = estimate_units(run_config, found, list(units.values()),
                                  throughput=Throughput(1e3, 3e3, 1e3, 1e9, "given"))
    planned = {e.unit: e for e in estimates}
    # the matrix's time: 2 N_train N_val flops per dimension, and a representation has the hidden size (32)
    assert planned["attribution-rds+"].seconds == pytest.approx(2 * 24 * 6 * 32 / 1e9)
    # the units run before (and without) the warmup: nothing under warmup/ exists
    for name in ("features/reps-rds+/train", "features/reps-rds+/val", "attribution-rds+",
                 "selections/rds+-0.25"):
        units[name].run()
        assert units[name].done(), name
    run = tmp_path / "run"
    assert not (run / "warmup").exists()
    for split in ("train", "val"):
        settings = json.loads((run / "features" / "reps-rds+" / split / "info.json").read_text())["settings"]
        assert settings["pooling"] == "weighted-mean" and settings["checkpoint"] is None
    assert json.loads((run / "attribution-rds+" / "info.json").read_text())["kind"] == "rds+"
    for name in ("features/reps-rds+/train", "features/reps-rds+/val", "attribution-rds+"):
        # rows of the hidden size (32), not of features.dim (2048: 64x the disk); within the fixed overhead of a
        # folder's small files, which dominates at 24 examples (tests/test_plan.py checks 10% at 240)
        actual = disk_size(run / name)
        assert abs(planned[name].disk - actual) <= 1024, (name, planned[name].disk, actual)


def test_run_with_rds_and_weighted_mean_features_pooling_is_one_error_line(setup, tmp_path) -> None:
    from poise import pipeline

    data = run_inputs(tmp_path, setup["model"])
    data["select"]["methods"] = ["bids", "rds"]
    data["features"]["pooling"] = "weighted-mean"
    run_config = pipeline.parse_config(data, "config")
    found = pipeline.check_inputs(run_config, data["pool"], data["validation"], None)
    with pytest.raises(PoiseError, match="select rds\\+ instead of rds") as error:
        pipeline.build_units(run_config, tmp_path / "run", found)
    assert "\n" not in str(error.value)
