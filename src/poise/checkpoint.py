"""The checkpoint folder format: the one module that writes and reads it (warmup and import-checkpoint write
it; features, attribute and the pipeline read it), so none of them imports another for it.

LESS scores a training example at checkpoint k by its gradient mapped through the Adam state of k, weighted
by the mean learning rate of epoch k. So a checkpoint keeps, beside the adapter, the optimizer's moments keyed
by parameter *name* (an index-keyed optimizer state means nothing without the model that made it):

  checkpoint-<epoch>/ adapter_model.safetensors + adapter_config.json   (the peft LoRA adapter)
                      optimizer_moments.safetensors   "<parameter name>.exp_avg" / ".exp_avg_sq", float32, for
                                                      every trainable parameter, named as in `named_parameters()`
                      checkpoint.json                 {"epoch", "step", "lr_mean", "model", "betas", "eps",
                                                       "weight_decay", "source", ...}

A folder with checkpoint.json has all the other files: they are written first, checkpoint.json last.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.files import CHECKPOINT_FILE, MOMENTS_FILE
from poise.io import atomic_write_json, read_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

#: Adam's defaults (torch, transformers, LESS): what a checkpoint.json without betas/eps was trained with.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


# ------------------------------------------------------------------------------------------- write
def parameter_order(model: Any) -> list[tuple[str, Any]]:
    """Trainable (name, parameter) pairs in `named_parameters()` order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def optimizer_moments(model: Any, optimizer: Any) -> dict[str, Any]:
    """`<name>.exp_avg` / `<name>.exp_avg_sq` (float32, CPU) of every trainable parameter of `model`."""
    import torch

    moments: dict[str, Any] = {}
    for name, p in parameter_order(model):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            value = state.get(key)
            if value is None:  # never stepped: Adam's moments start at zero
                value = torch.zeros_like(p, dtype=torch.float32)
            moments[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    return moments


def write_checkpoint(folder: str | os.PathLike, write_adapter: Callable[[Path], None], moments: dict[str, Any],
                     info: dict[str, Any]) -> Path:
    """Write the checkpoint `folder`: the adapter (`write_adapter(tmp)` writes its files into a folder), the
    moments and `info` as checkpoint.json.

    Everything is written into a hidden temporary folder first. A new folder is that one renamed; into an
    existing one (an `arguments.json` there stays) the files move one by one, an old checkpoint.json removed
    first and the new one moved last. Either way a folder with checkpoint.json always has all its files.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_adapter(tmp)
    save_file(moments, str(tmp / MOMENTS_FILE), metadata={"format": "pt"})
    atomic_write_json(tmp / CHECKPOINT_FILE, info)
    if not folder.exists():
        os.replace(tmp, folder)
        return folder
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == CHECKPOINT_FILE):
        target = folder / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()
    return folder


# -------------------------------------------------------------------------------------------- read
def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Does `folder` hold a whole poise checkpoint (checkpoint.json and the moments)?"""
    folder = Path(folder)
    return (folder / CHECKPOINT_FILE).is_file() and (folder / MOMENTS_FILE).is_file()


def read_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's checkpoint.json; {} for a folder without one (a plain peft adapter)."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return {}
    info = read_json(path)
    if not isinstance(info, dict):
        raise PoiseError(f"{path}: expected a JSON object")
    return info


def lr_mean(folder: str | os.PathLike) -> float | None:
    """The mean learning rate of the checkpoint's epoch (its default weight in the attribution); None when the
    folder has no checkpoint.json or it names none."""
    value = read_info(folder).get("lr_mean")
    return float(value) if value is not None else None


def base_model(folder: str | os.PathLike) -> str | None:
    """The base model a checkpoint (or any peft adapter folder) was trained on: checkpoint.json's `model`,
    else adapter_config.json's `base_model_name_or_path`; None when neither names one."""
    folder = Path(folder)
    name = read_info(folder).get("model")
    if not name and (folder / ADAPTER_CONFIG).is_file():
        config = read_json(folder / ADAPTER_CONFIG)
        name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(name) if name else None


@dataclass
class Moments:
    """A checkpoint's Adam state: the moments by parameter name (float32, stored shape) and the optimizer's
    betas, eps and step count (None when checkpoint.json does not say)."""

    exp_avg: dict[str, Any]
    exp_avg_sq: dict[str, Any]
    betas: tuple[float, float]
    eps: float
    step: int | None


def read_moments(folder: str | os.PathLike, names: list[str], device: str = "cpu") -> Moments:
    """The moments of the parameters `names` (as in the peft model's `named_parameters()`) in `folder`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / MOMENTS_FILE
    if not path.is_file():
        raise PoiseError(
            f"{folder}: no {MOMENTS_FILE}; --kind adam needs the optimizer moments of a poise checkpoint "
            "(poise warmup) or an imported HF-Trainer one (poise import-checkpoint); use --kind sgd for a plain adapter"
        )
    tensors = load_file(str(path), device=device)
    missing = [n for n in names if f"{n}.exp_avg" not in tensors or f"{n}.exp_avg_sq" not in tensors]
    if missing:
        raise PoiseError(f"{path}: no moments for {len(missing)} LoRA parameter(s), e.g. {missing[0]}")
    info = read_info(folder)
    betas = tuple(float(b) for b in info.get("betas", ADAM_BETAS))
    step = info.get("step")
    return Moments({n: tensors[f"{n}.exp_avg"].float() for n in names},
                   {n: tensors[f"{n}.exp_avg_sq"].float() for n in names},
                   (betas[0], betas[1]), float(info.get("eps", ADAM_EPS)), None if step is None else int(step))
