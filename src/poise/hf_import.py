"""`poise import-checkpoint`: a LoRA checkpoint written by `transformers.Trainer` -> a poise checkpoint.

The Trainer saves the optimizer state keyed by the *index* of the trainable parameter (optimizer.pt) or, under
FSDP, by its wrapped name (optimizer.bin); poise's checkpoint (poise.checkpoint) keys the Adam moments by the
parameter's name in the peft model. Import rebuilds that model on the meta device (no weights) to match the
two, and takes the epoch's mean learning rate from trainer_state.json's log.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from poise import provenance
from poise.checkpoint import (
    ADAM_BETAS,
    ADAM_EPS,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    base_model,
    is_complete_checkpoint,
    parameter_order,
    write_checkpoint,
)
from poise.config import ImportConfig, validate
from poise.errors import PoiseError
from poise.files import CHECKPOINT_FILE
from poise.io import read_json

STAGE = "import-checkpoint"
IMPORT_SOURCE = "hf-trainer import"

#: Wrapper segments that FSDP, activation checkpointing, torch.compile and DDP put into parameter names.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

#: transformers.Trainer puts parameters whose (lower-cased) name matches one of these, or that belong to a
#: LayerNorm, in its second (no weight decay) parameter group (`Trainer.get_decay_parameter_names`).
_HF_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def import_checkpoint(config: ImportConfig) -> Path:
    """Convert an HF-Trainer LoRA checkpoint into a poise checkpoint folder `config.out`; returns it.

    The same import again finds the folder complete and returns it; a folder made from another source (or
    epoch, or model) is refused unless `overwrite`; a folder that is not a poise checkpoint is never written.
    """
    validate(config)
    source = Path(str(config.checkpoint))
    if not source.is_dir():
        raise PoiseError(f"checkpoint folder {str(source)!r} does not exist")
    if not (source / ADAPTER_CONFIG).is_file():
        raise PoiseError(f"{source}: no {ADAPTER_CONFIG} (not a peft LoRA checkpoint)")
    if not (source / ADAPTER_WEIGHTS).is_file() and not (source / "adapter_model.bin").is_file():
        raise PoiseError(f"{source}: no {ADAPTER_WEIGHTS} (the adapter weights)")
    state_path = source / "trainer_state.json"
    if not state_path.is_file():
        raise PoiseError(f"{source}: no trainer_state.json (needed for the step and the learning rates)")
    optimizer_path = next((source / n for n in ("optimizer.pt", "optimizer.bin") if (source / n).is_file()), None)
    if optimizer_path is None:
        sharded = " (a sharded FSDP optimizer_0/ folder is not supported: save a full state dict)" \
            if (source / "optimizer_0").is_dir() else ""
        raise PoiseError(f"{source}: no optimizer.pt or optimizer.bin{sharded}; the Adam moments are needed")
    model_name = config.model or base_model(source)
    if not model_name:
        raise PoiseError(f"{source}/{ADAPTER_CONFIG} names no base model; pass --model")
    trainer_state = read_json(state_path)
    if config.epoch is not None:
        epoch = int(config.epoch)
    elif trainer_state.get("epoch") is not None:
        epoch = int(round(float(trainer_state["epoch"])))
    else:
        raise PoiseError(f"{state_path}: no 'epoch'; pass --epoch")
    if epoch < 1:
        raise PoiseError(f"epoch must be at least 1, got {epoch}")
    lr_mean = _hf_lr_mean(trainer_state, epoch, state_path)
    out = Path(str(config.out))
    if out.is_dir() and any(out.iterdir()) and provenance.stored(out) is None \
            and not (out / CHECKPOINT_FILE).exists():
        raise PoiseError(f"{out}: exists and is not a poise checkpoint folder; choose a new folder")

    derived: dict[str, Any] = {"epoch": epoch}  # what the checkpoint folder and trainer_state.json decide
    if config.model is None:
        derived["model"] = model_name
    opened = provenance.open_folder(out, STAGE, config, extra=derived)
    if opened.complete and is_complete_checkpoint(out):
        return out
    try:
        moments, group = _named_moments(str(model_name), source, optimizer_path)
    except PoiseError:
        if not opened.resumed:  # a failed import leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    info = {
        "epoch": epoch,
        "step": int(trainer_state.get("global_step", 0)),
        "lr_mean": lr_mean,
        "model": str(model_name),
        "betas": [float(b) for b in group.get("betas", ADAM_BETAS)],
        "eps": float(group.get("eps", ADAM_EPS)),
        "weight_decay": float(group.get("weight_decay", 0.0)),
        "source": IMPORT_SOURCE,
        "imported_from": str(source.resolve()),
    }

    def write_adapter(tmp: Path) -> None:
        shutil.copyfile(source / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
        if (source / ADAPTER_WEIGHTS).is_file():
            shutil.copyfile(source / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
            return
        from safetensors.torch import save_file

        weights = _load_weights(source / "adapter_model.bin")
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})

    write_checkpoint(out, write_adapter, moments, info)
    provenance.mark_complete(out)
    return out


def _named_moments(model_name: str, source: Path, optimizer_path: Path) -> tuple[dict[str, Any], dict]:
    """(`<name>.exp_avg` / `<name>.exp_avg_sq` of every trainable parameter, the first parameter group)."""
    import torch

    shapes, meta_model = _trainable_shapes(model_name, source)
    names = [n for n, _ in shapes]
    state = _load_optimizer_file(optimizer_path)
    if any(isinstance(k, str) and not k.isdigit() for k in state["state"]):  # FSDP: keyed by parameter name
        by_name = _moments_by_name(state, names, optimizer_path)
    else:
        by_name = _moments_by_index(state, names, meta_model, optimizer_path)
    moments: dict[str, Any] = {}
    for name, shape in shapes:
        entry = by_name[name]
        for key in ("exp_avg", "exp_avg_sq"):
            value = entry.get(key) if isinstance(entry, dict) else None
            if not isinstance(value, torch.Tensor):
                raise PoiseError(f"{optimizer_path}: no {key} for {name} (not an Adam/AdamW state)")
            if tuple(value.shape) != shape:
                raise PoiseError(f"{optimizer_path}: {key} of {name} has shape {tuple(value.shape)}, the parameter "
                                 f"{shape} (another adapter, or a flattened/sharded FSDP state?)")
            moments[f"{name}.{key}"] = value.detach().to(torch.float32).contiguous()
    group = next((g for g in state.get("param_groups", []) if isinstance(g, dict)), {})
    return moments, group


def _canonical(name: str) -> str:
    """A parameter name without wrapper segments, DDP's `module.`, peft's `base_model.model.` or `.default`."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".default.", ".")


def _load_optimizer_file(path: Path) -> dict:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported object"
        raise PoiseError(f"{path}: holds pickled objects that a weights-only load refuses ({first}); "
                         "poise never unpickles arbitrary objects") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise PoiseError(f"{path}: cannot read ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})") \
            from None
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise PoiseError(f"{path}: not an optimizer state_dict (expected a mapping with 'state' and 'param_groups')")
    return state


def _trainable_shapes(model_name: str, adapter_folder: Path) -> tuple[list[tuple[str, tuple[int, ...]]], Any]:
    """(name, shape) of the trainable parameters of base model + adapter, in `named_parameters()` order.

    Built on the meta device from the model's config and the adapter's config: no weights are loaded.
    """
    import torch
    from peft import PeftConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from poise.model import model_folder

    try:
        peft_config = PeftConfig.from_pretrained(str(adapter_folder))
    except (OSError, ValueError, TypeError) as exc:
        raise PoiseError(f"{adapter_folder}/{ADAPTER_CONFIG}: cannot read ({str(exc).splitlines()[0]})") from None
    peft_config.inference_mode = False
    try:
        base_config = AutoConfig.from_pretrained(model_folder(model_name))
    except (OSError, ValueError) as exc:
        raise PoiseError(f"model {model_name!r}: cannot read its config ({str(exc).splitlines()[0]})") from None
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(base_config)
        try:
            model = get_peft_model(base, peft_config)
        except ValueError as exc:
            raise PoiseError(f"{adapter_folder}: the adapter does not fit model {model_name!r} "
                             f"({str(exc).splitlines()[0]})") from None
    return [(name, tuple(p.shape)) for name, p in parameter_order(model)], model


def _hf_index_order(names: list[str], model: Any, group_sizes: list[int], path: Path) -> list[str]:
    """Parameter names in the order transformers.Trainer indexes its optimizer state.

    Trainer makes two groups, weight decay then no weight decay, each in `named_parameters()` order; with a
    LoRA adapter alone the second group is empty and index i is the i-th trainable parameter.
    """
    if len(names) != sum(group_sizes):
        raise PoiseError(f"{path}: the optimizer has {sum(group_sizes)} parameters, the adapter "
                         f"{len(names)} trainable ones (another adapter or model?)")
    if sum(1 for size in group_sizes if size) <= 1:
        return names
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], list(_HF_NO_DECAY_PATTERNS)))
    order = [n for n in names if n in decay] + [n for n in names if n not in decay]
    if len(group_sizes) != 2 or group_sizes[0] != sum(1 for n in names if n in decay):
        raise PoiseError(f"{path}: parameter groups of sizes {group_sizes} do not match transformers.Trainer's "
                         "grouping of this adapter's parameters; cannot tell which state belongs to which parameter")
    return order


def _moments_by_index(state: dict, names: list[str], model: Any, path: Path) -> dict[str, dict]:
    groups = state.get("param_groups") or []
    group_sizes = [len(g.get("params", [])) for g in groups if isinstance(g, dict)]
    if not group_sizes:
        group_sizes = [len(state["state"])]
    order = _hf_index_order(names, model, group_sizes, path)
    indices = [i for g in groups for i in g.get("params", [])] if groups else sorted(state["state"])
    by_name: dict[str, dict] = {}
    for position, name in enumerate(order):
        index = indices[position]
        entry = state["state"].get(index, state["state"].get(str(index)))
        if entry is None:
            raise PoiseError(f"{path}: no optimizer state for parameter {index} ({name})")
        by_name[name] = entry
    return by_name


def _moments_by_name(state: dict, names: list[str], path: Path) -> dict[str, dict]:
    wanted = {}
    for name in names:
        key = _canonical(name)
        if key in wanted:
            raise PoiseError(f"{path}: two trainable parameters share the name {key!r} once wrappers are removed")
        wanted[key] = name
    by_name: dict[str, dict] = {}
    unknown = []
    for key, entry in state["state"].items():
        name = wanted.get(_canonical(str(key)))
        if name is None:
            unknown.append(str(key))
            continue
        if name in by_name:
            raise PoiseError(f"{path}: two optimizer entries for parameter {name}")
        by_name[name] = entry
    if unknown:
        raise PoiseError(f"{path}: optimizer state for {len(unknown)} parameter(s) the adapter does not have as "
                         f"trainable, e.g. {unknown[0]!r}")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise PoiseError(f"{path}: no optimizer state for {len(missing)} trainable parameter(s), e.g. {missing[0]}")
    return by_name


def _hf_lr_mean(trainer_state: dict, epoch: int, path: Path) -> float:
    rates = [float(entry["learning_rate"]) for entry in trainer_state.get("log_history", [])
             if isinstance(entry, dict) and "learning_rate" in entry and "epoch" in entry
             and epoch - 1 < float(entry["epoch"]) <= epoch + 1e-9]
    if not rates:
        raise PoiseError(f"{path}: no learning_rate logged in epoch {epoch} (log_history entries with epoch in "
                         f"({epoch - 1}, {epoch}]); train with logging_steps small enough to log every epoch")
    return sum(rates) / len(rates)


def _load_weights(path: Path) -> dict:
    """A weights-only torch file holding a flat {name: tensor} mapping (an old adapter_model.bin)."""
    import pickle

    import torch

    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError) as exc:
        raise PoiseError(f"{path}: cannot read as weights only ({str(exc).strip().splitlines()[0]})") from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise PoiseError(f"{path}: expected a mapping of parameter names to tensors")
    return weights
