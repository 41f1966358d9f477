"""Per-example gradient features: exact against a batch-size-1 autograd loop, distributed = one process,
killed-and-resumed = uninterrupted, and one clear error line per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import write_checkpoint, write_model, write_pool, write_validation

from poise.config import FeaturesConfig
from poise.errors import PoiseError
from poise.features.stage import run_features

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    model = write_model(root / "model")
    left = write_model(root / "model-left", padding_side="left")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(left).padding_side == "left"
    return {
        "root": root,
        "model": model,
        "model_left": left,
        "checkpoint": write_checkpoint(root / "checkpoint", model),
        "pool": write_pool(root / "pool.jsonl"),
        "validation": write_validation(root / "validation"),
    }


def features(setup, out: Path, **overrides) -> np.ndarray:
    """float32 features (the store's default is float16): these tests check the gradients themselves."""
    settings = {"model": str(setup["model"]), "projection": "none", "max_seq_length": 64, "output_dtype": "float32",
                **overrides}
    config = FeaturesConfig(data=[str(setup["pool"])], out=str(out), checkpoint=str(setup["checkpoint"]), **settings)
    run_features(config)
    return np.load(out / "features.npy")


def reference_gradients(setup, model_folder: Path, kind: str) -> np.ndarray:
    """A plain autograd loop, one example at a time, float64 Adam map: the oracle."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poise.data import read_examples, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    _, tokenized, _ = tokenize_examples(read_examples(setup["pool"]), tokenizer, 64, progress=False)
    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(setup["checkpoint"]), is_trainable=True).eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    from safetensors.torch import load_file

    moments = load_file(str(setup["checkpoint"] / "optimizer_moments.safetensors"))
    rows = []
    for item in tokenized:
        model.zero_grad()
        ids = torch.tensor([item.input_ids])
        labels = torch.tensor([item.labels])
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        loss.backward()
        parts = []
        for n in names:
            g = params[n].grad.double().flatten()
            if kind == "adam":
                m = 0.9 * moments[f"{n}.exp_avg"].double().flatten() + 0.1 * g
                v = 0.999 * moments[f"{n}.exp_avg_sq"].double().flatten() + 0.001 * g * g
                g = m / torch.sqrt(v + 1e-8)
            parts.append(g)
        rows.append(torch.cat(parts).numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def references(setup) -> dict:
    return {(kind, side): reference_gradients(setup, setup["model" if side == "right" else "model_left"], kind)
            for kind in ("sgd", "adam") for side in ("right", "left")}


def relative_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_per_example_gradients_equal_a_batch_size_1_loop(setup, references, tmp_path, kind, side, batch_size):
    model = setup["model" if side == "right" else "model_left"]
    got = features(setup, tmp_path / "f", kind=kind, max_batch_size=batch_size, model=str(model))
    ref = references[(kind, side)]
    assert got.shape == ref.shape
    assert np.all(np.linalg.norm(ref, axis=1) > 0)
    assert relative_errors(got, ref).max() < TOLERANCE


def test_batch_size_invariance_of_projected_features(setup, tmp_path) -> None:
    a = features(setup, tmp_path / "a", kind="adam", projection="sjlt", dim=64, max_batch_size=1)
    b = features(setup, tmp_path / "b", kind="adam", projection="sjlt", dim=64, max_batch_size=8)
    # The gradients of two batch sizes differ by float32 rounding, at most TOLERANCE of their norm (the test
    # above); a projection that nearly preserves norms (JL, d=64: within a factor 1.5) followed by
    # normalisation keeps that, per row: compare row norms of the difference, not single entries (an entry
    # near 0 has no relative precision of its own).
    assert relative_errors(a, b).max() < 3 * TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


def test_ids_info_and_reps(setup, tmp_path) -> None:
    out = tmp_path / "reps"
    run_features(FeaturesConfig(data=[str(setup["validation"])], out=str(out), model=str(setup["model"]),
                                kind="reps", max_seq_length=64, output_dtype="float32"))
    reps = np.load(out / "features.npy")
    ids = [json.loads(line) for line in (out / "ids.jsonl").read_text().splitlines()]
    assert reps.shape == (6, 32) and {row["task"] for row in ids} == {"math", "code"}
    np.testing.assert_allclose(np.linalg.norm(reps, axis=1), 1.0, rtol=1e-5)
    info = json.loads((out / "info.json").read_text())
    assert info["complete"] and info["settings"]["kind"] == "reps"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poise", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})


def _feature_args(setup, out: Path, *extra: str) -> list[str]:
    return ["features", "--data", str(setup["pool"]), "--checkpoint", str(setup["checkpoint"]),
            "--model", str(setup["model"]), "--kind", "adam", "--projection", "sjlt", "--dim", "128",
            "--max-seq-length", "64", "--max-batch-size", "2", "--out", str(out), *extra]


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
@pytest.mark.parametrize("store", ["float16", "int8"])
def test_killed_run_restarted_gives_byte_identical_features(setup, tmp_path, store) -> None:
    reference = _cli(*_feature_args(setup, tmp_path / "whole", "--output-dtype", store))
    assert reference.returncode == 0, reference.stderr
    killed = _cli(*_feature_args(setup, tmp_path / "resumed", "--output-dtype", store),
                  env={"POISE_KILL_AT": "writes:4"})
    assert killed.returncode == -9  # SIGKILL, after 4 batches' rows were flushed, the 4th not yet logged
    logged = (tmp_path / "resumed" / "progress" / "rank-0.log").read_text().split()
    assert len(logged) == 3
    assert not json.loads((tmp_path / "resumed" / "info.json").read_text())["complete"]
    resumed = _cli(*_feature_args(setup, tmp_path / "resumed", "--output-dtype", store))
    assert resumed.returncode == 0, resumed.stderr
    for name in ("features.npy", "scales.npy") if store == "int8" else ("features.npy",):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # said, not silent: where it resumed, progress lines in a log (no terminal here), and a finished folder
    assert "poise: features: resuming at " in resumed.stderr and "(3 of " in resumed.stderr
    assert "examples (100%)" in reference.stderr and "tokens/s" in reference.stderr
    again = _cli(*_feature_args(setup, tmp_path / "resumed", "--output-dtype", store))
    assert again.returncode == 0 and "is already complete" in again.stderr


def test_two_rank_torchrun_writes_the_same_features_as_one_process(setup, tmp_path) -> None:
    single = _cli(*_feature_args(setup, tmp_path / "single"), env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "poise", *_feature_args(setup, tmp_path / "two")],
        capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = sorted((tmp_path / "two" / "progress").glob("rank-*.log"))
    assert [p.name for p in logs] == ["rank-0.log", "rank-1.log"]
    assert all(p.read_text().split() for p in logs)  # both ranks did work
    a = np.load(tmp_path / "single" / "features.npy")
    b = np.load(tmp_path / "two" / "features.npy")
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------ bad input
def _one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("poise: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_checkpoint_without_moments_asked_for_adam_is_one_error_line(setup, tmp_path) -> None:
    bare = write_checkpoint(tmp_path / "bare", setup["model"], moments=False)
    args = _feature_args(setup, tmp_path / "o")
    args[args.index("--checkpoint") + 1] = str(bare)
    _one_error_line(_cli(*args), "optimizer_moments.safetensors", "--kind adam")


def test_model_path_that_does_not_exist_is_one_error_line(setup, tmp_path) -> None:
    args = _feature_args(setup, tmp_path / "o")
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    _one_error_line(_cli(*args), "no-such-model", "does not exist")


def test_malformed_jsonl_line_is_one_error_line_with_file_and_line(setup, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(setup["pool"].read_text().splitlines()[0] + "\n{not json\n")
    args = _feature_args(setup, tmp_path / "o")
    args[args.index("--data") + 1] = str(bad)
    _one_error_line(_cli(*args), "bad.jsonl:2")


def test_unknown_role_is_one_error_line(setup, tmp_path) -> None:
    bad = tmp_path / "roles.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    args = _feature_args(setup, tmp_path / "o")
    args[args.index("--data") + 1] = str(bad)
    _one_error_line(_cli(*args), "roles.jsonl:1", "bot")


def test_prompt_filling_max_seq_length_is_reported_and_excluded(setup, tmp_path) -> None:
    rows = [json.loads(line) for line in setup["pool"].read_text().splitlines()[:3]]
    rows[1]["messages"][0]["content"] = " ".join(["apple river"] * 80)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _feature_args(setup, tmp_path / "o")
    args[args.index("--data") + 1] = str(data)
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "long.jsonl:2" in line]
    assert len(warnings) == 1 and "max_seq_length" in warnings[0]
    ids = [json.loads(line)["id"] for line in (tmp_path / "o" / "ids.jsonl").read_text().splitlines()]
    assert ids == [rows[0]["id"], rows[2]["id"]]


def test_folder_made_with_other_settings_is_refused(setup, tmp_path) -> None:
    assert _cli(*_feature_args(setup, tmp_path / "o")).returncode == 0
    args = _feature_args(setup, tmp_path / "o")
    args[args.index("--dim") + 1] = "64"
    _one_error_line(_cli(*args), "other settings")


def test_features_without_checkpoint_for_gradients_is_refused(setup, tmp_path) -> None:
    with pytest.raises(PoiseError, match="FeaturesConfig.kind=sgd needs a checkpoint"):
        run_features(FeaturesConfig(data=[str(setup["pool"])], out=str(tmp_path / "o"), model=str(setup["model"]),
                                    kind="sgd"))


def test_reps_without_model_or_checkpoint_is_refused(setup, tmp_path) -> None:
    with pytest.raises(PoiseError, match="model is required"):
        run_features(FeaturesConfig(data=[str(setup["pool"])], out=str(tmp_path / "o"), kind="reps"))
