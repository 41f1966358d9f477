"""A tiny model folder, a LoRA checkpoint with Adam moments, and small data sets, written in code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny import tiny_llama, tiny_tokenizer, write_jsonl

from poise.lora import attach_lora

WORDS = ["apple", "river", "seven", "blue", "code", "sum", "proof", "list", "tree", "fast", "print", "moon"]


def conversation(i: int, n_words: int) -> dict:
    user = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))
    answer = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(1 + (i * 7) % 9))
    return {"id": f"ex{i}", "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_pool(path: Path, n: int = 24) -> Path:
    write_jsonl(path, [conversation(i, 2 + (i * 5) % 13) for i in range(n)])
    return path


def write_validation(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "math.jsonl", [conversation(100 + i, 3 + i) for i in range(3)])
    write_jsonl(folder / "code.jsonl", [conversation(200 + i, 4 + 2 * i) for i in range(3)])
    return folder


def write_model(folder: Path, seed: int = 0, padding_side: str = "right") -> Path:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if padding_side != "right":
        # transformers 5's save_pretrained leaves padding_side out of the tokenizer's config: write it there
        import json

        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": padding_side}))
    return folder


def write_checkpoint(folder: Path, model_folder: Path, seed: int = 0, moments: bool = True, r: int = 8) -> Path:
    """A poise checkpoint: a LoRA adapter with random (nonzero) A and B, Adam moments, checkpoint.json."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model = attach_lora(base, r=r, alpha=2 * r, dropout=0.1, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            tensors[f"{name}.exp_avg"] = torch.randn(p.shape, generator=generator) * 1e-3
            tensors[f"{name}.exp_avg_sq"] = torch.rand(p.shape, generator=generator) * 1e-5
    model.save_pretrained(folder)
    if moments:
        save_file(tensors, str(folder / "optimizer_moments.safetensors"))
    (folder / "checkpoint.json").write_text(json.dumps(
        {"epoch": 1, "step": 10, "lr_mean": 1.5e-5, "model": str(model_folder), "betas": [0.9, 0.999], "eps": 1e-8}
    ))
    return folder
