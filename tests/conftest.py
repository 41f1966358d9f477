"""Shared fixtures: small attribution matrices written the ways users hand them to poise, and one tiny model
folder (ChatML tokenizer + seeded tiny Llama) built once per session for the tests that only read it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracles.py


def write_columns(path: Path, tasks: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"v{j}", "task": t}) + "\n" for j, t in enumerate(tasks)))
    return path


@pytest.fixture
def small_files(tmp_path: Path) -> dict[str, Path]:
    """scores.npy (40 x 6, three tasks of different scales), columns.jsonl, rows.jsonl, pool.jsonl."""
    rng = np.random.default_rng(7)
    scores = (rng.normal(size=(40, 6)) * np.array([1, 1, 10, 10, 0.1, 0.1])).astype(np.float32)
    np.save(tmp_path / "scores.npy", scores)
    write_columns(tmp_path / "columns.jsonl", ["code", "code", "math", "math", "chat", "chat"])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"id": f"ex{i}"}) + "\n" for i in range(40)))
    (tmp_path / "pool.jsonl").write_text(
        "".join(json.dumps({"id": f"ex{i}", "messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                for i in range(40))
    )
    return {
        "dir": tmp_path,
        "scores": tmp_path / "scores.npy",
        "columns": tmp_path / "columns.jsonl",
        "rows": tmp_path / "rows.jsonl",
        "pool": tmp_path / "pool.jsonl",
        "array": scores,
    }


@pytest.fixture(scope="session", autouse=True)
def own_poise_cache(tmp_path_factory):
    """poise's cache (the tokenised data sets) in a folder of this session, not the user's; converted GGUF
    models still come from (and go to) the user's cache, whose `gguf/` is linked in: converting SmolLM2 takes
    a minute, and the conversion is what the model tests check, not where it lives."""
    import os

    from poise.io import cache_dir

    user_gguf = cache_dir() / "gguf"
    user_gguf.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("poise-cache")
    (cache / "gguf").symlink_to(user_gguf, target_is_directory=True)
    previous = os.environ.get("POISE_CACHE")
    os.environ["POISE_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("POISE_CACHE", None)
    else:
        os.environ["POISE_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """`tiny_tokenizer()` and `tiny_llama(tokenizer)` saved once as a model folder; read-only for the tests."""
    from tiny import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("shared") / "model"
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
