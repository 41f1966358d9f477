"""bfloat16, the dtype users run on GPUs, checked against float32 on the CPU: features with `--dtype bfloat16`,
training with `--dtype bfloat16` and with `--bf16` (transformers.Trainer's mixed precision).

The tolerance follows from bfloat16's precision. Its unit roundoff is u = 2**-8 (8 significant bits), so each
rounding of a weight or an activation moves it by a relative u at most. A feature (a gradient) passes through
k roundings on its way, one per matrix product and normalisation, forward and backward: for this Llama,
k = 2 * (layers * 11 + 1) = 46 (per layer q, k, v, o, QK^T, AV, gate, up, down and two RMSNorms; then the
head). Independent rounding errors add in quadrature, so a result's norm-wise relative error is about
u * sqrt(k) = 0.027; we allow twice that for the worst row and the bound itself for the mean. A real bug (a
LoRA weight left in bfloat16 and not updated, a wrong scale, a layer computed on the wrong input) moves a
gradient by its own size, far beyond it. The same test runs on a GPU with POISE_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import write_checkpoint, write_pool

from poise.config import FeaturesConfig, TrainConfig
from poise.features.stage import run_features
from poise.train import run_train

DEVICE = os.environ.get("POISE_TEST_DEVICE", "cpu")
UNIT_ROUNDOFF_BFLOAT16 = 2.0**-8
LAYERS = 2  # tiny_llama's
ROUNDINGS = 2 * (LAYERS * 11 + 1)
TYPICAL = UNIT_ROUNDOFF_BFLOAT16 * math.sqrt(ROUNDINGS)  # 0.027
WORST = 2 * TYPICAL


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16")
    return {"root": root, "model": tiny_model_dir, "checkpoint": write_checkpoint(root / "checkpoint", tiny_model_dir),
            "pool": write_pool(root / "pool.jsonl")}


def features(setup, kind: str, dtype: str) -> np.ndarray:
    out = setup["root"] / f"features-{kind}-{dtype}"
    run_features(FeaturesConfig(data=[str(setup["pool"])], out=str(out), checkpoint=str(setup["checkpoint"]),
                                model=str(setup["model"]), kind=kind, dtype=dtype, projection="none",
                                max_seq_length=64, device=DEVICE, output_dtype="float32"))
    return np.load(out / "features.npy").astype(np.float64)


def norm_wise_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_bfloat16_features_match_float32_to_bfloat16_precision(setup, kind) -> None:
    reference, bf16 = features(setup, kind, "float32"), features(setup, kind, "bfloat16")
    assert not np.array_equal(reference, bf16)  # bfloat16 did run
    errors = norm_wise_errors(bf16, reference)
    assert errors.max() <= WORST and errors.mean() <= TYPICAL, (errors.max(), errors.mean())


def train(setup, tag: str, **settings) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out = setup["root"] / f"train-{tag}"
    run_train(TrainConfig(model=str(setup["model"]), selection=str(setup["pool"]), out=str(out), epochs=2, lr=1e-3,
                          lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=4, max_seq_length=64, device=DEVICE,
                          **settings))
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    return np.array(losses), load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("settings", [{"bf16": True}, {"dtype": "bfloat16"}], ids=["bf16-mixed", "bfloat16-model"])
def test_bf16_training_matches_float32_to_bfloat16_precision(setup, settings) -> None:
    """12 optimizer steps: every step's loss, and every trained LoRA tensor (lora_B starts at zero, so it is all
    update), agree with float32 training within the same bound; the LoRA weights themselves stay float32."""
    losses32, weights32 = train(setup, "float32")
    losses, weights = train(setup, "-".join(f"{k}-{v}" for k, v in settings.items()), **settings)
    assert len(losses) == len(losses32) == 12
    assert np.max(np.abs(losses - losses32) / losses32) <= TYPICAL
    assert sorted(weights) == sorted(weights32)
    assert all(w.dtype == torch.float32 for w in weights.values())
    errors = np.array([float((weights[k].double() - weights32[k].double()).norm() / weights32[k].double().norm())
                       for k in weights32])
    assert 0 < errors.max() <= WORST and errors.mean() <= TYPICAL, (errors.max(), errors.mean())
