"""LoRA adapters on any causal LM: which modules get one, and nothing adapted, or loaded, only in part.

Default targets (no `target_modules` given): every linear layer of the model's attention blocks, as LESS adapts
q/k/v/o. The attention blocks are found from peft's own per-architecture mapping
(`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, which names each family's attention input projections:
`q_proj`/`v_proj`, GPT-2's `c_attn`, Falcon's and GPT-NeoX's `query_key_value`, ...): a module that peft's
entry for the model type names (or, for a type peft does not list, any name its mapping uses) whose parent is
an attention block marks that block, and all of the block's linear layers are adapted. So Llama gets
q/k/v/o_proj, Phi-3 qkv_proj + o_proj, GPT-NeoX and Falcon query_key_value + dense, GPT-2 c_attn + attn.c_proj
(qualified: `c_proj` alone would also match the MLP's). The default is refused, with the model's linear
layers listed, when it cannot find the attention, when an attention block of the model is left out, or when a
block holds a weight matrix that LoRA would not cover.

Given targets must each match a module (peft's rule: the module's name, or its name's last dotted parts); one
that matches nothing is an error naming the model's linear layers. Expert weights of a mixture-of-experts
layer stored as fused 3-D tensors are refused (peft's LoRA wraps modules, not those tensors).

Loading an adapter is strict: its weights must land in the model exactly, every LoRA weight of the model
from the file and every weight of the file in the model. peft itself only warns about missing or unexpected
keys and goes on with freshly initialised LoRA weights (an adapter trained on another base, renamed modules).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poise.errors import PoiseError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


# ------------------------------------------------------------------------------------------- the model's layers
def _is_linear(module: Any) -> bool:
    """A layer peft's LoRA wraps as a linear map: `nn.Linear` (and subclasses) or transformers' `Conv1D` (GPT-2)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _output_head_names(model: Any) -> set[str]:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def linear_layers(model: Any) -> dict[str, Any]:
    """Full module name -> linear layer, in model order, without the output head (the LM head)."""
    heads = _output_head_names(model)
    return {name: module for name, module in model.named_modules() if _is_linear(module) and name not in heads}


def _short_names(names: Sequence[str]) -> list[str]:
    """Distinct last name parts, in order of first appearance."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in names))


def candidates_line(model: Any) -> str:
    """The model's linear layers for an error message: `q_proj, k_proj, ... (attention); gate_proj, ...`."""
    layers = linear_layers(model)
    attention = {name for block in _attention_blocks(model) for name in _linear_children(model, block)}
    inside = _short_names([n for n in layers if n in attention])
    outside = [n for n in _short_names([n for n in layers if n not in attention]) if n not in inside]
    parts = []
    if inside:
        parts.append(", ".join(inside) + " (attention)")
    if outside:
        parts.append(", ".join(outside))
    return "; ".join(parts) if parts else "none"


def matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's full name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def _model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def _is_attention(module: Any) -> bool:
    return "attention" in type(module).__name__.lower()


def _attention_blocks(model: Any) -> list[str]:
    """Names of the outermost attention modules (class name says Attention) that hold a linear layer."""
    blocks: list[str] = []
    for name, module in model.named_modules():
        if not name or not _is_attention(module) or any(name.startswith(b + ".") for b in blocks):
            continue
        if any(_is_linear(child) for child in module.modules()):
            blocks.append(name)
    return blocks


def _linear_children(model: Any, block: str) -> list[str]:
    module = model.get_submodule(block)
    return [f"{block}.{name}" for name, child in module.named_children() if _is_linear(child)]


# ------------------------------------------------------------------------------------------- default targets
def _peft_attention_names(model_type: str) -> set[str]:
    """peft's LoRA target names for `model_type`; for a type it does not list, every name its mapping uses."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    entry = MAPPING.get(model_type)
    if isinstance(entry, list | tuple):
        return set(entry)
    return {name for value in MAPPING.values() if isinstance(value, list | tuple) for name in value}


def default_targets(model: Any) -> list[str]:
    """The `target_modules` poise uses when none are given: every linear layer of every attention block.

    Raises PoiseError, listing the model's linear layers, when that cannot be done completely.
    """
    kind = _model_type(model)
    known = _peft_attention_names(kind)
    found: dict[str, None] = {}
    for name, module in model.named_modules():
        parent, _, last = name.rpartition(".")
        if last in known and parent and _is_linear(module) and _is_attention(model.get_submodule(parent)):
            found.setdefault(parent)
    if not found:
        raise PoiseError(f"cannot tell the attention projections of this {kind} model (peft's mapping names none of "
                         f"its modules); pass target_modules (--target-modules) from its linear layers: "
                         f"{candidates_line(model)}")
    missed = [b for b in _attention_blocks(model) if b not in found]
    if missed:
        raise PoiseError(f"the default LoRA targets of this {kind} model would cover only part of its attention "
                         f"({len(found)} blocks found, not {', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}"
                         f"); pass target_modules (--target-modules) from: {candidates_line(model)}")
    chosen = [name for block in found for name in _linear_children(model, block)]
    for block in found:  # a weight matrix inside the block that is not one of its linear layers stays frozen
        covered = [n for n in chosen if n.startswith(block + ".")]
        stray = [f"{block}.{p}" for p, param in model.get_submodule(block).named_parameters()
                 if param.dim() >= 2 and not any(f"{block}.{p}".startswith(c + ".") for c in covered)]
        if stray:
            raise PoiseError(f"the default LoRA targets of this {kind} model would cover only part of its attention: "
                             f"{stray[0]} is not a linear layer LoRA can wrap; pass target_modules (--target-modules) "
                             f"from: {candidates_line(model)}")
    return _qualified(model, chosen)


def _qualified(model: Any, chosen: list[str]) -> list[str]:
    """Target names that match exactly the modules `chosen`: a module's last name part where no other module
    ends with it, else its last two parts (GPT-2: `attn.c_proj`, since `mlp.c_proj` exists)."""
    chosen_set = set(chosen)
    all_names = [name for name, _ in model.named_modules()]
    targets: dict[str, None] = {}
    for name in chosen:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            target = ".".join(parts[-depth:])
            hits = {n for n in all_names if matches(n, target)}
            if hits <= chosen_set:
                targets.setdefault(target)
                break
    return list(targets)


# ------------------------------------------------------------------------------------------- given targets
def check_targets(model: Any, targets: Sequence[str]) -> None:
    """Every name in `targets` matches a module of `model` that LoRA can wrap; else one PoiseError line."""
    kind = _model_type(model)
    modules = dict(model.named_modules())
    unmatched = [t for t in targets if not any(matches(name, t) for name in modules)]
    if unmatched:
        raise PoiseError(f"target_modules {', '.join(unmatched)}: no module of this {kind} model is named so; its "
                         f"linear layers: {candidates_line(model)}")
    for target in targets:
        for name, module in modules.items():
            if not matches(name, target) or _is_linear(module):
                continue
            fused = [p for p, param in module.named_parameters() if param.dim() == 3]
            if fused:
                raise PoiseError(f"target_modules {target}: {name} ({type(module).__name__}) holds its experts' "
                                 f"weights as fused 3-D tensors ({', '.join(fused)}), which peft's LoRA does not wrap "
                                 "as modules; on mixture-of-experts models poise adapts the attention (the default)")
            raise PoiseError(f"target_modules {target}: {name} is a {type(module).__name__}, not a linear layer "
                             f"LoRA can wrap; this {kind} model's linear layers: {candidates_line(model)}")


def resolve_targets(model: Any, targets: Sequence[str] | None) -> list[str]:
    """`targets` checked against the model, or the default when none are given."""
    if not targets:
        return default_targets(model)
    check_targets(model, list(targets))
    return list(targets)


def skeleton(model_name: str) -> Any:
    """The causal LM `model_name` built from its config on the meta device: its modules without weights, to
    check LoRA targets in a second or two before any weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from poise.model import model_folder

    folder = model_folder(model_name)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise PoiseError(f"model {model_name!r}: cannot read its config ({_first_line(exc)})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def planned_targets(model_name: str, targets: Sequence[str] | None) -> list[str]:
    """The LoRA targets `attach_lora` will use on `model_name`, checked on its skeleton (PoiseError if unusable)."""
    return resolve_targets(skeleton(model_name), targets)


# ------------------------------------------------------------------------------------------- attach, describe
def attach_lora(model: Any, r: int = 128, alpha: int = 512, dropout: float = 0.1,
                target_modules: Sequence[str] | None = None, seed: int = 0):
    """A fresh LoRA adapter (peft) on `target_modules` of `model` (none: `default_targets`); lora_A initialised
    from `seed`, lora_B zero (peft's default)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = resolve_targets(model, target_modules)
    matched = [m for n, m in model.named_modules() if any(matches(n, t) for t in targets)]
    conv1d = bool(matched) and all(isinstance(m, Conv1D) for m in matched)  # GPT-2's layers store W transposed
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                        fan_in_fan_out=conv1d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise PoiseError(f"cannot attach LoRA: {str(exc).splitlines()[0]}") from None


def adapted_modules(model: Any, adapter: str = "default") -> list[str]:
    """Names of the modules that carry LoRA layers of `adapter` (without peft's `base_model.model.` prefix)."""
    from peft.tuners.lora import LoraLayer

    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            names.append(re.sub(r"^base_model\.model\.", "", name))
    return names


def adaptation(model: Any, adapter: str = "default") -> dict[str, Any]:
    """What LoRA adapts in `model`: modules (count, target names, short names), LoRA parameters and their share
    of the model's parameters (LoRA included). Recorded in checkpoints, train folders and features' info.json."""
    modules = adapted_modules(model, adapter)
    if not modules:
        raise PoiseError("the model has no LoRA layers (attach or load a peft LoRA adapter first)")
    lora = sum(p.numel() for n, p in model.named_parameters() if f".lora_A.{adapter}." in n
               or f".lora_B.{adapter}." in n)
    total = sum(p.numel() for p in model.parameters())
    config = getattr(model, "peft_config", {}).get(adapter)
    targets = getattr(config, "target_modules", None)
    targets = sorted(targets) if isinstance(targets, set | list | tuple) else targets
    return {"modules": len(modules), "names": _short_names(modules), "targets": targets,
            "lora_parameters": int(lora), "model_parameters": int(total), "share": lora / total if total else 0.0}


def adaptation_line(info: dict[str, Any]) -> str:
    """One line: `LoRA on 8 modules (q_proj, k_proj, v_proj, o_proj): 12,288 parameters, 3.10% of 396,544`."""
    return (f"LoRA on {info['modules']} modules ({', '.join(info['names'])}): {info['lora_parameters']:,} "
            f"parameters, {100 * info['share']:.2f}% of the model's {info['model_parameters']:,}")


# ------------------------------------------------------------------------------------------- load, strictly
def _saved_keys(folder: Path) -> set[str]:
    safetensors_file = folder / ADAPTER_WEIGHT_FILES[0]
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as handle:
            return set(handle.keys())
    bin_file = folder / ADAPTER_WEIGHT_FILES[1]
    if bin_file.is_file():
        import torch

        return set(torch.load(str(bin_file), map_location="cpu", weights_only=True))
    raise PoiseError(f"{folder}: no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)})")


def _listed(keys: Sequence[str], limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_adapter(model: Any, adapter: str | os.PathLike, trainable: bool = True):
    """Load a peft LoRA adapter folder onto `model` (trainable: its LoRA weights require grad), strictly: an
    adapter whose weights do not all land in the model, or that leaves a LoRA weight of it unloaded, is refused
    (PoiseError) instead of going on with freshly initialised weights."""
    import json

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    folder = Path(adapter)
    if not (folder / ADAPTER_CONFIG).exists():
        raise PoiseError(f"{folder}: not a peft adapter folder (no {ADAPTER_CONFIG})")
    saved = _saved_keys(folder)
    try:
        adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise PoiseError(f"{folder / ADAPTER_CONFIG}: not readable JSON ({exc})") from None
    kind = _model_type(model)
    base = adapter_config.get("base_model_name_or_path")
    trained = f" (trained on {base})" if base else ""
    targets = adapter_config.get("target_modules")
    if isinstance(targets, list):
        modules = [name for name, _ in model.named_modules()]
        absent = [t for t in targets if not any(matches(n, t) for n in modules)]
        if absent:
            raise PoiseError(f"{folder}: this adapter{trained} targets {', '.join(absent)}, which this "
                             f"{kind} model does not have; its linear layers: {candidates_line(model)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(missing adapter keys|unexpected).*")
        try:
            loaded = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
        except (RuntimeError, ValueError) as exc:
            raise PoiseError(f"{folder}: the adapter{trained} does not fit this {kind} model: "
                             f"{_first_line(exc, prefer='size mismatch')}") from None
    expected = set(get_peft_model_state_dict(loaded).keys())
    missing, unexpected = expected - saved, saved - expected
    if missing or unexpected:
        detail = []
        if unexpected:
            detail.append(f"{len(unexpected)} of its weights have no place in this model ({_listed(unexpected)})")
        if missing:
            detail.append(f"{len(missing)} LoRA weights of the model are not in it ({_listed(missing)})")
        raise PoiseError(f"{folder}: the adapter{trained} does not match this {kind} model: "
                         f"{'; '.join(detail)}; peft would go on with freshly initialised LoRA weights")
    return loaded


def _first_line(exc: BaseException, prefer: str = "") -> str:
    """The exception's first line, or its first line containing `prefer` (a torch load error's useful line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    preferred = [line for line in lines if prefer and prefer in line]
    return (preferred or lines or [type(exc).__name__])[0]


def lora_parameters(model: Any) -> dict[str, Any]:
    """Trainable parameters by name, in `named_parameters()` order (the order HF optimizers index by)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
