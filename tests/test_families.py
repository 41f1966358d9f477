"""Every model family users bring (tests/families.py), built tiny from its transformers config class:

- the default LoRA targets cover every linear layer of its attention, and nothing is adapted in part;
- poise's per-example LoRA gradients (hooks, one padded batch) equal a batch-size-1 autograd loop of the same
  loss, on right- and left-padded batches;
- the loss takes the target-position logits path, or a fallback that the test names;
- on mixture-of-experts models the features are gradients of the language-model loss alone (no router loss).

The table of docs/models.md is written from these checks: `POISE_WRITE_MODELS_DOC=1 pytest tests/test_families.py`
(`make models-doc`) rewrites it, and `test_the_models_doc_is_the_family_checks` fails when it is stale.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from families import FAMILIES, tiny_model
from pipeline_fixtures import conversation
from tiny import tiny_tokenizer

from poise.data import collate, tokenize_examples
from poise.data.formats import Example
from poise.features.capture import backward_per_example, capture_lora_gradients
from poise.lora import adaptation, adapted_modules, attach_lora, default_targets, linear_layers
from poise.losses import GATHERED, model_losses, per_example_losses

DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"
BEGIN, END = "<!-- families: begin (written by tests/test_families.py) -->", "<!-- families: end -->"

#: float32 relative error (per example, over all LoRA weights) of batched hooks vs the batch-size-1 loop: the two
#: compute the same sums in other orders (padded shapes, batched matmuls), so they agree to a few hundred units of
#: float32's roundoff (2**-24 = 6e-8) summed over the depth of a 2-layer model; a missing term, a wrong scale or a
#: gradient leaking between examples is of the order of the gradient itself.
TOLERANCE = 1e-5


def examples() -> list[Example]:
    rows = [conversation(i, n) for i, n in enumerate((3, 9, 14))]
    return [Example(id=r["id"], messages=r["messages"], input_ids=None, labels=None, task=None, where=f"row {i}")
            for i, r in enumerate(rows)]


def tokenized_batch(tokenizer) -> list:
    _, items, _ = tokenize_examples(examples(), tokenizer, 64, progress=False)
    assert len({len(item.input_ids) for item in items}) == 3  # three lengths: the batch is padded
    return items


def lora_model(name: str):
    """The family's tiny model with poise's default LoRA attached, every LoRA weight random (B too, so that
    the gradients of A are not zero)."""
    tokenizer = tiny_tokenizer()
    model = attach_lora(tiny_model(name, tokenizer), r=4, alpha=8, dropout=0.0, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def per_example_gradients(model, items, padding_side: str) -> dict[str, torch.Tensor]:
    batch = collate(items, tiny_tokenizer().pad_token_id, padding_side)
    got: dict[str, torch.Tensor] = {}
    with capture_lora_gradients(model, lambda name, grad: got.__setitem__(name, grad.clone())):
        backward_per_example(model, batch)
    return got


def loop_gradients(model, items) -> dict[str, torch.Tensor]:
    """The oracle: one example at a time, no padding, plain autograd of its mean target-token loss."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    rows: dict[str, list] = {n: [] for n in names}
    for item in items:
        ids = torch.tensor([item.input_ids])
        with torch.enable_grad():
            loss = per_example_losses(model(input_ids=ids, use_cache=False).logits, torch.tensor([item.labels]))
            grads = torch.autograd.grad(loss.sum(), params)
        for n, g in zip(names, grads, strict=True):
            rows[n].append(g)
    return {n: torch.stack(gs) for n, gs in rows.items()}


def relative_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> torch.Tensor:
    assert sorted(got) == sorted(ref)  # a gradient for every LoRA weight
    flat_got = torch.cat([got[n].flatten(1) for n in ref], dim=1).double()
    flat_ref = torch.cat([ref[n].flatten(1) for n in ref], dim=1).double()
    assert bool((flat_ref.norm(dim=1) > 0).all())
    return (flat_got - flat_ref).norm(dim=1) / flat_ref.norm(dim=1)


@functools.cache
def check(name: str) -> dict:
    """Run the family's checks once (the tests and the docs table share them); returns what they found."""
    tokenizer = tiny_tokenizer()
    plain = tiny_model(name, tokenizer)
    targets = default_targets(plain)
    model = lora_model(name)
    items = tokenized_batch(tokenizer)
    reference = loop_gradients(model, items)
    errors = {side: float(relative_errors(per_example_gradients(model, items, side), reference).max())
              for side in ("right", "left")}
    path: dict[str, str] = {}
    with torch.no_grad():
        model_losses(model, collate(items, tokenizer.pad_token_id), path=path)
    return {"targets": targets, "adapted": adapted_modules(model), "lora": adaptation(model), "errors": errors,
            "logits": path["logits"], "attention": _attention_linears(plain)}


def _attention_linears(model) -> list[str]:
    """Every linear layer of the (plain) model that sits in a module whose class says Attention."""
    out = []
    for name in linear_layers(model):
        parts = name.split(".")
        parents = [model.get_submodule(".".join(parts[:k])) for k in range(1, len(parts))]
        if any("attention" in type(p).__name__.lower() for p in parents):
            out.append(name)
    return out


def _strip(name: str) -> str:
    return name.removeprefix("base_model.model.")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_default_lora_covers_every_linear_layer_of_the_attention_and_nothing_else(name) -> None:
    found = check(name)
    attention = sorted(_strip(n) for n in found["attention"])
    assert attention, "the family's attention has no linear layer"
    assert sorted(found["adapted"]) == attention
    assert found["lora"]["modules"] == len(attention)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_per_example_gradients_equal_the_batch_size_1_loop(name) -> None:
    errors = check(name)["errors"]
    assert errors["right"] < TOLERANCE, errors
    assert errors["left"] < TOLERANCE, errors


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_takes_the_target_position_logits_path(name) -> None:
    assert check(name)["logits"] == GATHERED  # docs/models.md says which families would fall back, if any


def test_fused_and_conv1d_attention_get_their_own_default_targets() -> None:
    assert check("phi3")["targets"] == ["o_proj", "qkv_proj"] or check("phi3")["targets"] == ["qkv_proj", "o_proj"]
    assert set(check("gpt2")["targets"]) == {"c_attn", "attn.c_proj"}  # c_proj alone would match mlp.c_proj too
    assert set(check("falcon")["targets"]) == {"query_key_value", "dense"}
    assert set(check("gpt_neox")["targets"]) == {"query_key_value", "dense"}
    assert check("llama")["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]  # LESS's q/k/v/o


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.moe])
def test_moe_features_are_gradients_of_the_language_model_loss_alone(name) -> None:
    """With the router's auxiliary loss switched on in the config, the per-example gradients do not change:
    poise's loss is the LM loss from the logits (no labels reach the forward), as LESS's features are."""
    tokenizer = tiny_tokenizer()
    items = tokenized_batch(tokenizer)
    model = lora_model(name)
    before = per_example_gradients(model, items, "right")
    model.config.output_router_logits = True
    model.base_model.model.config.output_router_logits = True
    assert float(getattr(model.config, "router_aux_loss_coef", 0.0)) > 0
    after = per_example_gradients(model, items, "right")
    for key in before:
        assert torch.equal(before[key], after[key]), key


# ------------------------------------------------------------------------------------------- docs/models.md
def _targets_cell(targets: list[str]) -> str:
    return ", ".join(f"`{t}`" for t in targets)


def table() -> str:
    lines = ["| family | config class | e.g. | default LoRA targets | adapted (2 layers) | logits | "
             "per-example gradients vs batch-size-1 loop |",
             "|---|---|---|---|---|---|---|"]
    for name, family in FAMILIES.items():
        found = check(name)
        status = f"equal (within {TOLERANCE:.0e})" if max(found["errors"].values()) < TOLERANCE else "**differs**"
        logits = "target positions" if found["logits"] == GATHERED else f"fallback: {found['logits']}"
        label = family.label + (" (MoE: attention only)" if family.moe else "")
        lines.append(f"| {label} | `{family.config}` | `{family.example}` | {_targets_cell(found['targets'])} | "
                     f"{found['lora']['modules']} modules ({', '.join(found['lora']['names'])}) | {logits} | "
                     f"{status} |")
    return "\n".join(lines) + "\n"


def test_the_models_doc_is_the_family_checks() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lost its table markers"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    fresh = f"{head}{BEGIN}\n{table()}{END}{tail}"
    if os.environ.get("POISE_WRITE_MODELS_DOC") == "1":
        DOC.write_text(fresh)
        return
    assert text == fresh, "docs/models.md is stale: run `make models-doc`"


# ------------------------------------------------------------------------------------------- smoke: every stage
@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    from pipeline_fixtures import write_pool, write_validation
    from tiny import write_jsonl

    root = tmp_path_factory.mktemp("families")
    write_pool(root / "pool.jsonl", n=8)
    write_validation(root / "validation")
    write_jsonl(root / "held" / "math.jsonl", [{"id": "h0", "prompt": "What is two plus two?", "answer": "four"}])
    return root


@pytest.mark.parametrize("name", list(FAMILIES))
def test_warmup_features_train_evaluate_run_on_every_family(name, smoke_data, tmp_path, capsys) -> None:
    """The commands a user runs, with default LoRA targets, on the family's tiny model saved as a folder."""
    import json

    from poise.cli import main

    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(name, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model, pool = str(model_dir), str(smoke_data / "pool.jsonl")
    lora = ["--lora-r", "4", "--lora-alpha", "8", "--batch-size", "4", "--max-seq-length", "64"]
    assert main(["warmup", "--model", model, "--data", pool, "--out", str(tmp_path / "w"), "--fraction", "1",
                 "--epochs", "1", "--lr", "1e-3", *lora]) == 0
    checkpoint = tmp_path / "w" / "checkpoint-1"
    assert main(["features", "--checkpoint", str(checkpoint), "--data", pool, "--kind", "adam", "--dim", "64",
                 "--out", str(tmp_path / "f")]) == 0
    assert main(["train", "--model", model, "--selection", pool, "--out", str(tmp_path / "t"), "--epochs", "1",
                 "--lr", "1e-3", *lora]) == 0
    assert main(["evaluate", "--model", model, "--adapter", str(tmp_path / "t"), "--data", str(smoke_data / "held"),
                 "--out", str(tmp_path / "e"), "--max-gen-toks", "2"]) == 0
    err = capsys.readouterr().err
    expected = check(name)["lora"]
    said = f"LoRA on {expected['modules']} modules ({', '.join(expected['names'])})"
    assert f"warmup: {said}" in err and f"features: {said}" in err and f"train: {said}" in err
    recorded = [json.loads((checkpoint / "checkpoint.json").read_text())["lora"],
                json.loads((tmp_path / "f" / "info.json").read_text())["settings"]["lora"],
                json.loads((tmp_path / "t" / "train_summary.json").read_text())["lora"]]
    assert all(r["modules"] == expected["modules"] and r["names"] == expected["names"] for r in recorded)
    features = np.load(tmp_path / "f" / "features.npy")
    assert features.shape == (8, 64) and np.isfinite(features).all()
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())["scores"]["math"]
    assert np.isfinite(scores["nll"]["value"])
