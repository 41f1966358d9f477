"""LoRA targets and adapters: nothing is adapted or loaded in part, and what was adapted is said.

A target that matches no module, an MoE expert tensor, a default that cannot cover the whole attention, and an
adapter whose weights do not all land in the model (another base, renamed modules, other layer counts) are
each one PoiseError line; peft alone would stop on some of these and go on with fresh LoRA weights on others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import tiny_model
from tiny import tiny_llama, tiny_tokenizer

from poise.errors import PoiseError
from poise.lora import (
    adaptation,
    adaptation_line,
    attach_lora,
    check_targets,
    default_targets,
    load_adapter,
    planned_targets,
)


def saved_adapter(folder: Path, model, **lora) -> Path:
    peft_model = attach_lora(model, r=4, alpha=8, dropout=0.0, **lora)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(folder)
    return folder


def test_a_target_that_matches_nothing_names_the_model_linear_layers() -> None:
    model = tiny_model("phi3", tiny_tokenizer())
    with pytest.raises(PoiseError) as info:
        attach_lora(model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # LESS's names; Phi-3 fuses q/k/v
    assert str(info.value) == ("target_modules q_proj, k_proj, v_proj: no module of this phi3 model is named so; its "
                               "linear layers: o_proj, qkv_proj (attention); gate_up_proj, down_proj")


def test_given_targets_are_used_as_given() -> None:
    model = attach_lora(tiny_model("llama", tiny_tokenizer()), r=2, alpha=4, target_modules=["q_proj", "down_proj"])
    assert adaptation(model)["names"] == ["q_proj", "down_proj"]
    assert adaptation(model)["modules"] == 4


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_3d_expert_weights_are_refused_with_one_line(name) -> None:
    model = tiny_model(name, tiny_tokenizer())
    with pytest.raises(PoiseError, match=r"^target_modules experts: model\.layers\.0\.mlp\.experts \(\w+\) holds its "
                                         r"experts' weights as fused 3-D tensors \(gate_up_proj, down_proj\), which "
                                         r"peft's LoRA does not wrap as modules; on mixture-of-experts models poise "
                                         r"adapts the attention \(the default\)$"):
        check_targets(model, ["experts"])


def test_a_non_linear_target_is_refused() -> None:
    model = tiny_model("llama", tiny_tokenizer())
    with pytest.raises(PoiseError, match=r"^target_modules input_layernorm: model\.layers\.0\.input_layernorm is a "
                                         r"LlamaRMSNorm, not a linear layer LoRA can wrap"):
        check_targets(model, ["input_layernorm"])


def test_a_default_that_would_cover_part_of_the_attention_is_refused() -> None:
    """An attention block holding a weight matrix that is not a linear layer (here: added by hand) would be
    adapted only in part: the default refuses and lists the linear layers to choose from."""
    model = tiny_model("llama", tiny_tokenizer())
    model.model.layers[1].self_attn.register_parameter("mix", torch.nn.Parameter(torch.zeros(4, 4)))
    with pytest.raises(PoiseError, match=r"would cover only part of its attention: model\.layers\.1\.self_attn\.mix is "
                                         r"not a linear layer LoRA can wrap; pass target_modules"):
        default_targets(model)


def test_a_model_whose_attention_peft_does_not_know_is_refused_with_its_linear_layers() -> None:
    model = tiny_model("llama", tiny_tokenizer())
    for layer in model.model.layers:  # rename every projection of the attention to something no mapping names
        attention = layer.self_attn
        for old in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attention, f"w_{old[0]}", getattr(attention, old))
            delattr(attention, old)
    with pytest.raises(PoiseError, match=r"^cannot tell the attention projections of this llama model .*; pass "
                                         r"target_modules \(--target-modules\) from its linear layers: w_q, w_k, w_v, "
                                         r"w_o \(attention\); gate_proj, up_proj, down_proj$"):
        default_targets(model)


def test_planned_targets_read_only_the_config(tmp_path, tiny_model_dir) -> None:
    assert planned_targets(str(tiny_model_dir), []) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(PoiseError, match="target_modules qkv_proj: no module of this llama model"):
        planned_targets(str(tiny_model_dir), ["qkv_proj"])


def test_adaptation_says_modules_names_parameters_and_share() -> None:
    model = attach_lora(tiny_model("phi3", tiny_tokenizer()), r=4, alpha=8)
    info = adaptation(model)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["modules"] == 4 and info["names"] == ["o_proj", "qkv_proj"] and info["lora_parameters"] == lora
    assert info["targets"] == ["o_proj", "qkv_proj"]
    assert adaptation_line(info) == (f"LoRA on 4 modules (o_proj, qkv_proj): {lora:,} parameters, "
                                     f"{100 * lora / info['model_parameters']:.2f}% of the model's "
                                     f"{info['model_parameters']:,}")


# ------------------------------------------------------------------------------------------- strict loading
def test_an_adapter_loads_exactly(tmp_path) -> None:
    tokenizer = tiny_tokenizer()
    folder = saved_adapter(tmp_path / "a", tiny_llama(tokenizer))
    loaded = load_adapter(tiny_llama(tokenizer), folder, trainable=False)
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert sorted(saved) == sorted(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)


def test_an_adapter_from_another_base_is_refused_at_load(tmp_path) -> None:
    """Trained on a model of another width: peft cannot copy the weights; poise says which adapter and why."""
    tokenizer = tiny_tokenizer()
    folder = saved_adapter(tmp_path / "wide", tiny_llama(tokenizer, hidden=48))
    with pytest.raises(PoiseError, match=r"^.*wide: the adapter does not fit this llama model: size mismatch for "
                                         r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        load_adapter(tiny_llama(tokenizer), folder)


def test_an_adapter_with_weights_for_layers_the_model_lacks_is_refused(tmp_path) -> None:
    tokenizer = tiny_tokenizer()
    folder = saved_adapter(tmp_path / "deep", tiny_llama(tokenizer, layers=3))
    with pytest.raises(PoiseError, match=r"does not match this llama model: 8 of its weights have no place in this "
                                         r"model \(base_model\.model\.model\.layers\.2\..*; peft would go on"):
        load_adapter(tiny_llama(tokenizer), folder)


def test_an_adapter_missing_layers_of_the_model_is_refused(tmp_path) -> None:
    """peft only warns here and leaves layer 2's LoRA freshly initialised: features of the wrong adapter."""
    tokenizer = tiny_tokenizer()
    folder = saved_adapter(tmp_path / "shallow", tiny_llama(tokenizer, layers=2))
    with pytest.raises(PoiseError, match=r"8 LoRA weights of the model are not in it \(base_model\.model\.model\."
                                         r"layers\.2\..*; peft would go on with freshly initialised LoRA weights$"):
        load_adapter(tiny_llama(tokenizer, layers=3), folder)


def test_an_adapter_of_another_family_names_the_modules_it_lacks(tmp_path) -> None:
    tokenizer = tiny_tokenizer()
    folder = saved_adapter(tmp_path / "gpt2", tiny_model("gpt2", tokenizer))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "openai-community/gpt2"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PoiseError, match=r"gpt2: this adapter \(trained on openai-community/gpt2\) targets "
                                         r"(attn\.c_proj, c_attn|c_attn, attn\.c_proj), which this llama model does "
                                         r"not have; its linear layers: q_proj"):
        load_adapter(tiny_llama(tokenizer), folder)
