"""Tiny random causal LMs of every model family poise is checked on, built from their transformers config classes.

Each family is a few thousand parameters per layer (hidden 32, 2 layers, 4 heads, vocabulary of `tiny_tokenizer`):
enough to run every code path of the real architecture (fused projections, Conv1D layers, parallel attention,
logit soft-capping and scaling, sliding windows, mixture-of-experts routing), small enough to check a family in
a second. `tests/test_families.py` runs the checks; `docs/models.md`'s table is written from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    label: str  # as users know it
    config: str  # the transformers config class
    example: str  # a real checkpoint of the family, for the docs
    extra: dict[str, Any] = field(default_factory=dict)
    required: bool = True  # one of the families issue 17 names (the others are ones users bring too)
    moe: bool = False


COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2)

FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", "LlamaConfig", "meta-llama/Llama-3.1-8B"),
    "mistral": Family("Mistral", "MistralConfig", "mistralai/Mistral-7B-v0.3", dict(sliding_window=8)),
    "qwen2": Family("Qwen2 / Qwen2.5", "Qwen2Config", "Qwen/Qwen2.5-7B"),
    "qwen3": Family("Qwen3", "Qwen3Config", "Qwen/Qwen3-8B", dict(head_dim=8)),
    "gemma2": Family("Gemma 2", "Gemma2Config", "google/gemma-2-9b",
                     dict(head_dim=8, sliding_window=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    "gemma3_text": Family("Gemma 3 (text)", "Gemma3TextConfig", "google/gemma-3-1b-pt",
                          dict(head_dim=8, sliding_window=8, final_logit_softcapping=30.0)),
    "phi3": Family("Phi-3 / Phi-4-mini", "Phi3Config", "microsoft/Phi-3-mini-4k-instruct"),
    "olmo2": Family("OLMo 2", "Olmo2Config", "allenai/OLMo-2-1124-7B"),
    "gpt_neox": Family("GPT-NeoX / Pythia", "GPTNeoXConfig", "EleutherAI/pythia-1b", dict(rotary_pct=0.5)),
    "gpt2": Family("GPT-2", "GPT2Config", "openai-community/gpt2",
                   dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64)),
    "falcon": Family("Falcon", "FalconConfig", "tiiuae/falcon-7b"),
    "mixtral": Family("Mixtral", "MixtralConfig", "mistralai/Mixtral-8x7B-v0.1", dict(num_local_experts=4, **MOE),
                      moe=True),
    "qwen3_moe": Family("Qwen3-MoE", "Qwen3MoeConfig", "Qwen/Qwen3-30B-A3B",
                        dict(num_experts=4, moe_intermediate_size=16, head_dim=8, **MOE), moe=True),
    # beyond the list: families users bring
    "granite": Family("Granite", "GraniteConfig", "ibm-granite/granite-3.3-8b-instruct",
                      dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                           attention_multiplier=0.2), required=False),
    "cohere": Family("Cohere (Command R)", "CohereConfig", "CohereLabs/c4ai-command-r-v01", dict(logit_scale=0.25),
                     required=False),
    "stablelm": Family("StableLM", "StableLmConfig", "stabilityai/stablelm-2-1_6b", required=False),
    "smollm3": Family("SmolLM3", "SmolLM3Config", "HuggingFaceTB/SmolLM3-3B", required=False),
    "phi": Family("Phi-1.5 / Phi-2", "PhiConfig", "microsoft/phi-2", required=False),
    "gpt_bigcode": Family("StarCoder (GPT-BigCode)", "GPTBigCodeConfig", "bigcode/starcoderbase-1b",
                          dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64), required=False),
    "starcoder2": Family("StarCoder2", "Starcoder2Config", "bigcode/starcoder2-3b", required=False),
    "olmoe": Family("OLMoE", "OlmoeConfig", "allenai/OLMoE-1B-7B-0924", dict(num_experts=4, **MOE), required=False,
                    moe=True),
    "qwen2_moe": Family("Qwen2-MoE", "Qwen2MoeConfig", "Qwen/Qwen1.5-MoE-A2.7B",
                        dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, **MOE),
                        required=False, moe=True),
    "bloom": Family("BLOOM", "BloomConfig", "bigscience/bloom-560m", dict(n_layer=2, n_head=4), required=False),
}


def tiny_model(name: str, tokenizer: Any, seed: int = 0) -> Any:
    """A seeded float32 model of family `name`, sized for `tokenizer`, in eval mode (as from_pretrained)."""
    import torch
    import transformers

    family = FAMILIES[name]
    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **{**COMMON, **family.extra})
    assert config.model_type == name, (config.model_type, name)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
