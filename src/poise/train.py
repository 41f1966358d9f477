"""LoRA training on transformers.Trainer: warmup (a checkpoint per epoch), training on a selection, and import
of HF-Trainer checkpoints.

LESS scores a training example at checkpoint k by its gradient mapped through the Adam state of k
(m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, Gamma = m'/sqrt(v'+eps)), weighted by the mean learning rate
of epoch k. So a warmup checkpoint keeps, beside the adapter, the optimizer's moments keyed by parameter
*name* (an index-keyed optimizer state means nothing without the model that made it) and the mean
learning rate. A checkpoint folder `checkpoint-<epoch>/` holds:

  adapter_model.safetensors, adapter_config.json   the peft adapter (`save_pretrained`)
  optimizer_moments.safetensors                    `<name>.exp_avg`, `<name>.exp_avg_sq`, float32, for every
                                                   trainable parameter, named as in `model.named_parameters()`
  checkpoint.json                                  epoch, step, lr_mean, model, betas, eps, weight_decay, source

`train_lora` is the one training function (warmup and `poise train` call it): the Trainer does the loop,
DDP under torchrun (gloo on CPU, NCCL on GPU), bf16, gradient checkpointing, gradient accumulation to the
effective batch and whatever else `TrainingArguments` offers (FSDP, DeepSpeed: the `trainer:` mapping of
the YAML config). poise supplies the loss of docs/design.md (the mean over a step's examples of each
example's mean token loss, on the labels features use, so an example's weight does not depend on its
length, its micro-batch or its rank), the seeded example order of each epoch, and the schedule
(`lr_multiplier`: linear warm-up over 3% of the steps, then linear (LESS) or cosine (BIDS) decay, every
step's rate positive). While training, the Trainer keeps its own last epoch checkpoint in `out/trainer/`,
so a killed run rerun with the same command resumes there and ends with the same bits; it is deleted when
training completes, so the moments are stored once per poise checkpoint.

`run_warmup` trains with LESS's defaults: LoRA r=128, alpha=512, dropout 0.1 on q/k/v/o, a seeded random 5%
of the pool, 4 epochs, AdamW (0.9, 0.999, 1e-8, no weight decay), lr 2e-5, 128 examples per step.
`run_train` fine-tunes on a selection with the BIDS paper's: the same LoRA and AdamW, 2 epochs, cosine.

`import_checkpoint` converts a checkpoint written by `transformers.Trainer` (optimizer.pt, keyed by the
index of the trainable parameter; or an FSDP optimizer.bin, keyed by name) into the same layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from poise import distributed
from poise.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_FILE, MOMENTS_FILE
from poise.config import ImportConfig, TrainConfig, WarmupConfig, to_dict
from poise.errors import PoiseError
from poise.io import atomic_write_json, atomic_write_lines, read_json
from poise.options import LR_SCHEDULERS
from poise.version import __version__

ARGUMENTS_FILE = "arguments.json"
EXAMPLES_FILE = "examples.jsonl"
LOG_FILE = "train_log.jsonl"
WARMUP_SOURCE = "poise warmup"
IMPORT_SOURCE = "hf-trainer import"

#: Settings that only change how a step is computed (micro-batching, placement), not what it computes:
#: they may change between a run and its resumption (e.g. a smaller --max-tokens after running out of memory).
_EXECUTION_SETTINGS = ("overwrite", "device", "max_batch_size")

#: Wrapper segments that FSDP, activation checkpointing, torch.compile and DDP put into parameter names.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

#: transformers.Trainer puts parameters whose (lower-cased) name matches one of these, or that belong to a
#: LayerNorm, in its second (no weight decay) parameter group (`Trainer.get_decay_parameter_names`).
_HF_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


# ------------------------------------------------------------------------------------- schedule
def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Optimizer steps of linear warm-up, as transformers computes them: ceil(total * ratio)."""
    return math.ceil(total_steps * warmup_ratio)


def schedule(n_examples: int, hyper: Any) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warm-up steps) for `n_examples` trained `hyper.epochs` times."""
    steps_per_epoch = math.ceil(n_examples / hyper.batch_size)
    total_steps = steps_per_epoch * hyper.epochs
    return steps_per_epoch, total_steps, warmup_steps(total_steps, hyper.warmup_ratio)


def learning_rate(step: int, total_steps: int, n_warmup: int, peak: float) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then linear decay; never 0.

    Warm-up step s runs at peak * (s + 1) / n_warmup, reaching the peak on the last warm-up step; then step s
    runs at peak * (total - s) / (total - n_warmup), down to peak / (total - n_warmup) on the last step.
    transformers' `get_linear_schedule_with_warmup` is the same schedule one step earlier: its first step
    runs at lr 0 and moves nothing (only Adam's moments), and with one step per epoch that epoch's mean
    learning rate, hence its checkpoint's weight in the attribution, is 0. Here every step, so every
    epoch, has a positive learning rate.
    """
    if step < n_warmup:
        return peak * (step + 1) / n_warmup
    return peak * (total_steps - step) / max(1, total_steps - n_warmup)


# ----------------------------------------------------------------------------------- checkpoints
def _parameter_order(model: Any) -> list[tuple[str, Any]]:
    """Trainable (name, parameter) pairs in `named_parameters()` order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def optimizer_moments(model: Any, optimizer: Any) -> dict[str, Any]:
    """`<name>.exp_avg` / `<name>.exp_avg_sq` (float32, CPU) of every trainable parameter of `model`."""
    import torch

    moments: dict[str, Any] = {}
    for name, p in _parameter_order(model):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            value = state.get(key)
            if value is None:  # never stepped: Adam's moments start at zero
                value = torch.zeros_like(p, dtype=torch.float32)
            moments[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    return moments


def write_checkpoint(folder: str | os.PathLike, write_adapter: Callable[[Path], None], moments: dict[str, Any],
                     info: dict[str, Any], extra_json: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically: everything goes into a hidden temporary folder that is then renamed.

    `write_adapter(tmp)` writes the adapter files into the temporary folder; `extra_json` maps further file
    names to JSON objects. A folder under the final name always has all its files.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_adapter(tmp)
    save_file(moments, str(tmp / MOMENTS_FILE), metadata={"format": "pt"})
    for name, obj in (extra_json or {}).items():
        atomic_write_json(tmp / name, obj)
    atomic_write_json(tmp / CHECKPOINT_FILE, info)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def is_complete_checkpoint(folder: Path) -> bool:
    return (folder / CHECKPOINT_FILE).is_file() and (folder / MOMENTS_FILE).is_file()


# ---------------------------------------------------------------------------------------- warmup
def _as_float(config: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    value = getattr(config, name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PoiseError(f"--{name.replace('_', '-')}: expected a number, got {value!r}") from None
    if not (low < number if low_open else low <= number) or not number <= high or math.isnan(number):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise PoiseError(f"--{name.replace('_', '-')}: must be in {interval}, got {value!r}")
    return number


def _as_positive_int(config: Any, name: str) -> int:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PoiseError(f"--{name.replace('_', '-')}: must be a positive whole number, got {value!r}")
    return value


class _Hyper:
    """Validated numbers of a WarmupConfig or TrainConfig (floats may arrive as text from YAML, e.g. `lr: 2e-5`)."""

    def __init__(self, config: WarmupConfig):
        if hasattr(config, "fraction"):  # warmup: a part of the pool
            self.fraction = _as_float(config, "fraction", 0.0, 1.0, low_open=True)
            self.examples = None if config.examples is None else _as_positive_int(config, "examples")
        self.lora_r = _as_positive_int(config, "lora_r")
        self.lora_alpha = _as_float(config, "lora_alpha", 0.0, math.inf, low_open=True)
        self.lora_dropout = _as_float(config, "lora_dropout", 0.0, 1.0)
        self.epochs = _as_positive_int(config, "epochs")
        self.lr = _as_float(config, "lr", 0.0, math.inf)
        self.warmup_ratio = _as_float(config, "warmup_ratio", 0.0, 1.0)
        self.weight_decay = _as_float(config, "weight_decay", 0.0, math.inf)
        self.betas = (_as_float(config, "adam_beta1", 0.0, 1.0), _as_float(config, "adam_beta2", 0.0, 1.0))
        self.eps = _as_float(config, "adam_eps", 0.0, math.inf)
        self.batch_size = _as_positive_int(config, "batch_size")
        self.max_grad_norm = _as_float(config, "max_grad_norm", 0.0, math.inf)
        if config.lr_scheduler not in LR_SCHEDULERS:
            raise PoiseError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {config.lr_scheduler!r}")
        if config.trainer is not None and not isinstance(config.trainer, dict):
            raise PoiseError(f"trainer: expected a mapping of TrainingArguments settings, got {config.trainer!r}")
        if not config.target_modules:
            raise PoiseError("--target-modules: name at least one module")


def _settings(config: WarmupConfig | TrainConfig) -> dict[str, Any]:
    """The settings that determine the checkpoints (data paths made absolute)."""
    settings = to_dict(config)
    for key in (*_EXECUTION_SETTINGS, "out"):  # the folder itself may move
        settings.pop(key)
    model_path = Path(str(config.model)).expanduser()
    if model_path.exists():
        settings["model"] = str(model_path.resolve())
    if hasattr(config, "data"):
        settings["data"] = [str(Path(p).resolve()) if Path(p).exists() else p for p in config.data]
    if getattr(config, "pool", None):
        settings["pool"] = str(Path(config.pool).resolve())
    return settings


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def subset_indices(n_pool: int, count: int, seed: int) -> list[int]:
    """`count` distinct pool indices drawn uniformly with `seed`, in pool order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_pool, size=count, replace=False))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the `n` warmup examples in `epoch` (1-based): a permutation seeded by (seed, epoch)."""
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def _open_run(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse a run folder made with other settings (unless overwrite: then clear its checkpoints)."""
    existing = out / ARGUMENTS_FILE
    stale = existing.exists() and read_json(existing).get("settings") != settings
    if stale and not overwrite:
        differing = _differences(read_json(existing).get("settings") or {}, settings)
        raise PoiseError(f"{out}: holds a warmup run made with other settings ({', '.join(differing) or 'unknown'}); "
                         "use another --out or pass --overwrite")
    checkpoint_folders = [f for f in out.glob("checkpoint-*") if f.is_dir() and re.fullmatch(r"checkpoint-\d+", f.name)]
    if checkpoint_folders and not existing.exists() and not overwrite:
        raise PoiseError(f"{out}: holds checkpoint folders but no {ARGUMENTS_FILE} (not a poise warmup run); "
                         "use another --out or pass --overwrite")
    distributed.barrier()  # every rank has checked before rank 0 changes anything
    if distributed.is_main() and overwrite:
        for folder in [*checkpoint_folders, out / "trainer"]:
            if folder.exists():
                shutil.rmtree(folder)
    distributed.barrier()


def _completed_epochs(out: Path, epochs: int) -> int:
    """The last epoch k such that checkpoints 1..k are all complete."""
    done = 0
    while done < epochs and is_complete_checkpoint(out / f"checkpoint-{done + 1}"):
        done += 1
    return done


def run_warmup(config: WarmupConfig) -> list[Path]:
    """Train the warmup LoRA adapter; returns the checkpoint folders `out/checkpoint-1..epochs`.

    Resumes from the last complete checkpoint of a run with the same settings; refuses a run folder made
    with other settings unless `overwrite` (which starts over).
    """
    if not config.data:
        raise PoiseError("--data is required")
    if not config.model:
        raise PoiseError("--model is required")
    if not config.out:
        raise PoiseError("--out is required")
    hyper = _Hyper(config)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise PoiseError(f"--out {str(out)!r} is a file, not a folder")
    settings = _settings(config)
    checkpoints = [out / f"checkpoint-{k}" for k in range(1, hyper.epochs + 1)]

    # the data first: a missing file or a warmup set too small to train on is said before any model is loaded
    from poise.data import read_examples

    examples = [e for path in config.data for e in read_examples(path)]
    if not examples:
        raise PoiseError(f"no examples in {', '.join(config.data)}")
    count = warmup_count(len(examples), hyper)

    distributed.init(config.device)
    _open_run(out, settings, config.overwrite)
    if not config.overwrite and _completed_epochs(out, hyper.epochs) == hyper.epochs:
        if distributed.is_main():
            from poise.progress import note

            note(f"warmup: {out} is already complete ({hyper.epochs} checkpoints); nothing to do")
        return checkpoints
    return _train(config, hyper, settings, out, checkpoints, examples, count)


def warmup_count(n_pool: int, hyper: Any) -> int:
    """How many pool examples the warmup trains on; warns when that is less than one optimizer step's batch."""
    if hyper.examples is not None:
        count = hyper.examples
        if count > n_pool:
            raise PoiseError(f"--examples {count}: the pool has only {n_pool} examples")
        source = f"--examples {count}"
    else:
        count = max(1, math.floor(hyper.fraction * n_pool))
        source = f"--fraction {hyper.fraction:g} of {n_pool} pool examples"
    if count < hyper.batch_size and distributed.is_main():
        from poise.errors import warn

        warn(f"warmup trains on {count} examples ({source}), fewer than one batch (--batch-size "
             f"{hyper.batch_size}): every epoch is a single optimizer step, so each checkpoint's Adam moments come "
             f"from {hyper.epochs} steps at most; for a small pool pass --examples N (or --fraction 1.0) and a "
             "--batch-size that gives several steps per epoch")
    return count


def _train(config: WarmupConfig, hyper: _Hyper, settings: dict[str, Any], out: Path,
           checkpoints: list[Path], examples: list[Any], count: int) -> list[Path]:

    from poise.data import tokenize_examples
    from poise.model import load_tokenizer

    # -- the warmup examples: a seeded random part of the pool, tokenised
    chosen = [examples[i] for i in subset_indices(len(examples), count, config.seed)]
    tokenizer = load_tokenizer(config.model)
    kept, tokenized, _excluded = tokenize_examples(chosen, tokenizer, config.max_seq_length,
                                                   template=config.template, progress=distributed.is_main())
    ids = [chosen[i].id for i in kept]
    ids_digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]

    n = len(tokenized)
    if n == 0:
        raise PoiseError(f"none of the {count} warmup examples has a target token within --max-seq-length "
                         f"{config.max_seq_length}")
    steps_per_epoch, total_steps, n_warmup = schedule(n, hyper)

    # -- the run folder: same settings and same examples, else refuse
    arguments_path = out / ARGUMENTS_FILE
    if arguments_path.exists() and not config.overwrite:
        previous = read_json(arguments_path).get("examples", {}).get("digest")
        if previous is not None and previous != ids_digest:
            raise PoiseError(f"{out}: its checkpoints were trained on other examples (the data changed); "
                             "use another --out or pass --overwrite")
    distributed.barrier()
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(arguments_path, {
            "poise_version": __version__,
            "settings": settings,
            "arguments": to_dict(config),
            "examples": {"pool": len(examples), "chosen": count, "trained": n, "digest": ids_digest,
                         "file": EXAMPLES_FILE},
            "schedule": {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": n_warmup},
        })
        atomic_write_lines(out / EXAMPLES_FILE, (json.dumps({"id": i}) for i in ids))
    distributed.barrier()

    def save_epoch(epoch: int, step: int, rates: list[float], losses: list[float], model: Any,
                   optimizer: Any) -> None:
        info = {
            "epoch": epoch,
            "step": step,
            "lr_mean": sum(rates) / len(rates),
            "model": config.model,
            "betas": list(hyper.betas),
            "eps": hyper.eps,
            "weight_decay": hyper.weight_decay,
            "source": WARMUP_SOURCE,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "examples": n,
        }
        write_checkpoint(checkpoints[epoch - 1], lambda tmp: model.save_pretrained(str(tmp)),
                         optimizer_moments(model, optimizer), info)

    train_lora(config, hyper, tokenizer, tokenized, out, "warmup", on_epoch_end=save_epoch)
    return checkpoints


# ------------------------------------------------------------------------------ the training function
def lr_multiplier(scheduler: str, step: int, total_steps: int, n_warmup: int) -> float:
    """The learning rate of step `step` as a fraction of the peak: `learning_rate` (linear) or its cosine twin.

    Both warm up linearly from peak / n_warmup on the first step; cosine then follows
    0.5 * (1 + cos(pi * (step - n_warmup) / (total - n_warmup))), positive on every step as well.
    """
    if scheduler == "linear" or step < n_warmup:
        return learning_rate(step, total_steps, n_warmup, 1.0)
    progress = (step - n_warmup) / max(1, total_steps - n_warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batching(batch_size: int, world: int, max_micro: int) -> tuple[int, int]:
    """(examples per device per forward pass, gradient accumulation steps) for `batch_size` examples per step."""
    if batch_size % world:
        raise PoiseError(f"--batch-size {batch_size} must be a multiple of the number of processes ({world})")
    per_rank = batch_size // world
    micro = max(d for d in range(1, min(per_rank, max_micro) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def train_lora(config: Any, hyper: Any, tokenizer: Any, tokenized: Sequence[Any], out: Path, label: str,
               on_epoch_end: Callable[..., None] | None = None, metrics: dict | None = None) -> Any:
    """LoRA-train `config.model` on `tokenized` with transformers.Trainer; returns the trained peft model.

    The Trainer (accelerate underneath) does the loop, DDP under torchrun, bf16, gradient checkpointing and
    any extra `TrainingArguments` of `config.trainer`. poise supplies the loss (the mean over the step's
    examples of each example's mean token loss, exactly as features differentiate it), the example order
    (`epoch_order`), the schedule (`lr_multiplier`: every step's rate is positive) and, per epoch,
    `on_epoch_end(epoch, global_step, step_rates, step_losses, model, optimizer)` on rank 0. The Trainer's
    own checkpoint (one, the last epoch's) lives in `out/trainer/` while training, so a killed run rerun with
    the same command resumes there; it is removed when training completes. `metrics`, when given, receives
    the Trainer's own (train_runtime, train_samples_per_second, ...).
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from poise.data import collate
    from poise.losses import model_losses
    from poise.model import attach_lora, load_model
    from poise.progress import note, track

    world = distributed.world_size()
    micro, accumulation = micro_batching(hyper.batch_size, world, config.max_batch_size)
    n = len(tokenized)
    steps_per_epoch, total_steps, n_warmup = schedule(n, hyper)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padding_side = getattr(tokenizer, "padding_side", "right") or "right"
    main = distributed.is_main()

    model = load_model(config.model, dtype=config.dtype, device="cpu")
    model = attach_lora(model, r=hyper.lora_r, alpha=hyper.lora_alpha, dropout=hyper.lora_dropout,
                        target_modules=config.target_modules, seed=config.seed)

    class Examples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, index: int) -> Any:
            return tokenized[index]

    class EpochOrder(torch.utils.data.Sampler):
        """`epoch_order(n, seed, epoch)`: the same order on every rank and on a resumed run."""

        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __len__(self) -> int:
            return n

        def __iter__(self):
            return iter(epoch_order(n, config.seed, self.epoch + 1))

    class LoraTrainer(Trainer):
        loss_is_scaled_for_ga = True

        def _get_train_sampler(self, train_dataset=None):
            return EpochOrder()

        def _get_num_items_in_batch(self, batch_samples, device):
            """The examples of this optimizer step, summed over ranks (not Trainer's token count)."""
            count = torch.tensor(sum(int(b["input_ids"].shape[0]) for b in batch_samples), device=device)
            if self.accelerator.num_processes > 1:
                count = self.accelerator.gather(count).sum()
            return count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            losses, output = model_losses(model, inputs)  # (b,); logits at target positions only
            # sum_i loss_i / (examples in the step); times the processes, whose gradients DDP averages
            loss = losses.sum() * self.accelerator.num_processes / num_items_in_batch
            return (loss, output) if return_outputs else loss

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda step: lr_multiplier(config.lr_scheduler, step, total_steps, n_warmup))
            return self.lr_scheduler

    trainer_dir = out / "trainer"
    resume = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() and not config.overwrite else None
    log_path = out / LOG_FILE
    resumed_step = int(resume.rsplit("-", 1)[1]) if resume else 0

    class Record(TrainerCallback):
        """Step rates and losses, the per-step log, progress, the epoch's poise checkpoint."""

        def __init__(self) -> None:
            self.rates: dict[int, float] = {}
            self.losses: dict[int, float] = {}
            self.tracker: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            if main:
                kept = []
                if log_path.exists() and resumed_step:
                    kept = [line for line in log_path.read_text().splitlines()
                            if line.strip() and json.loads(line)["step"] <= resumed_step]
                atomic_write_lines(log_path, kept)
                if resume:
                    note(f"{label}: resuming at step {resumed_step + 1} of {total_steps} ({resume})")

        def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            self.rates[state.global_step] = float(lr_scheduler.get_last_lr()[0])  # the rate this step runs at

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                step = state.global_step
                self.losses[step - 1] = float(logs["loss"])
                if main:
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"step": step, "epoch": round(float(state.epoch or 0), 4),
                                                 "loss": float(logs["loss"]), "lr": self.rates.get(step - 1)})
                                     + "\n")
                if self.tracker is not None:
                    self.tracker.advance(step - self.tracker.done, loss=f"{float(logs['loss']):.4f}")

        def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            epoch = int(round(float(state.epoch)))
            steps = range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch)
            if on_epoch_end is not None and main:
                on_epoch_end(epoch, state.global_step, [self.rates[s] for s in steps],
                             [self.losses[s] for s in steps if s in self.losses], model, optimizer)
            distributed.barrier()
            kill_after = os.environ.get("POISE_KILL_AFTER_EPOCH")  # tests: a SIGKILL right after this epoch's save
            self.kill = kill_after is not None and int(kill_after) == epoch

        def on_save(self, args, state, control, **kwargs):
            if getattr(self, "kill", False):
                import signal

                os.kill(os.getpid(), signal.SIGKILL)

    extra = dict(getattr(config, "trainer", None) or {})
    arguments = dict(
        output_dir=str(trainer_dir), per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        num_train_epochs=hyper.epochs, learning_rate=hyper.lr, weight_decay=hyper.weight_decay,
        adam_beta1=hyper.betas[0], adam_beta2=hyper.betas[1], adam_epsilon=hyper.eps,
        max_grad_norm=hyper.max_grad_norm, optim="adamw_torch", seed=config.seed, data_seed=config.seed,
        logging_steps=1, save_strategy="epoch", save_total_limit=1, save_only_model=False, report_to=[],
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=str(config.device) == "cpu", bf16=bool(config.bf16),
        ddp_find_unused_parameters=False,
    )
    if config.gradient_checkpointing:
        arguments["activation_checkpointing"] = True
    unknown = sorted(set(extra) - set(TrainingArguments.__dataclass_fields__))
    if unknown:
        raise PoiseError(f"trainer: unknown TrainingArguments setting {unknown[0]!r}")
    arguments.update(extra)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the Trainer's own info lines while training; poise says what matters
    record = Record()
    trainer = LoraTrainer(
        model=model, args=TrainingArguments(**arguments), train_dataset=Examples(),
        data_collator=lambda items: collate(items, pad_id, padding_side), callbacks=[record],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; poise's progress says it once
    with track(label, total_steps, unit="steps", done=resumed_step, enabled=main) as tracker:
        record.tracker = tracker
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        finally:
            hf_logging.set_verbosity(verbosity)
    if metrics is not None:
        metrics.update(result.metrics)
    distributed.barrier()
    if main and trainer_dir.exists():
        shutil.rmtree(trainer_dir)  # complete: the Trainer's resume state is no longer needed
    return trainer.model


# --------------------------------------------------------------------------------- train on a selection
SUMMARY_FILE = "train_summary.json"
TRAIN_SOURCE = "poise train"


def selection_examples(selection: str, pool: str | None) -> list[Any]:
    """The examples a selection names: its `selected.jsonl`, or its picks taken from `pool`; or a data file."""
    from poise.data import read_examples

    path = Path(selection)
    if not path.is_dir():
        return read_examples(selection)
    if (path / "selected.jsonl").is_file() and pool is None:
        return read_examples(path / "selected.jsonl")
    if not (path / "selection.json").is_file():
        if any(path.glob("*.jsonl")):
            return read_examples(path)  # a folder of data files
        raise PoiseError(f"{path}: neither a selection folder (selection.json) nor a folder of data files")
    if pool is None:
        raise PoiseError(f"{path}: no selected.jsonl; pass --pool (the pool in matrix row order) to take the picks "
                         "of selection.json from it")
    picks = read_json(path / "selection.json").get("indices")
    if not isinstance(picks, list) or not picks:
        raise PoiseError(f"{path / 'selection.json'}: no 'indices' (the picked rows)")
    rows = read_examples(pool)
    if max(picks) >= len(rows):
        raise PoiseError(f"{path / 'selection.json'}: picks row {max(picks)}, but {pool} has {len(rows)} rows")
    return [rows[i] for i in picks]


def run_train(config: TrainConfig) -> Path:
    """Fine-tune a LoRA adapter on a selection into `config.out` (a peft adapter folder); returns it.

    Resumes a killed run from the Trainer's last epoch checkpoint; refuses a folder trained with other
    settings unless `overwrite`; a complete folder with the same settings is reused.
    """
    missing = [f"--{k}" for k in ("selection", "model", "out") if not getattr(config, k)]
    if missing:
        raise PoiseError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    hyper = _Hyper(config)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise PoiseError(f"--out {str(out)!r} is a file, not a folder")
    examples = selection_examples(config.selection, config.pool)  # before any model is loaded
    if not examples:
        raise PoiseError(f"{config.selection}: no examples")
    settings = _settings(config)
    settings["selection"] = str(Path(config.selection).resolve())
    distributed.init(config.device)
    from poise.progress import note

    previous = read_json(out / ARGUMENTS_FILE) if (out / ARGUMENTS_FILE).is_file() else None
    if previous is not None and previous.get("settings") != settings and not config.overwrite:
        differing = _differences(previous.get("settings") or {}, settings)
        raise PoiseError(f"{out}: holds a training run made with other settings ({', '.join(differing)}); "
                         "use another --out or pass --overwrite")
    if previous is None and out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise PoiseError(f"{out}: not empty and not a poise training folder; use another --out or pass --overwrite")
    if previous is not None and not config.overwrite and (out / SUMMARY_FILE).is_file():
        if distributed.is_main():
            note(f"train: {out} is already complete; nothing to do")
        return out
    distributed.barrier()
    if distributed.is_main() and config.overwrite and out.is_dir():
        for name in (SUMMARY_FILE, LOG_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "trainer", ignore_errors=True)
    distributed.barrier()

    from poise.data import tokenize_examples
    from poise.model import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    kept, tokenized, _ = tokenize_examples(examples, tokenizer, config.max_seq_length, template=config.template,
                                           progress=distributed.is_main())
    ids = [examples[i].id for i in kept]
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / ARGUMENTS_FILE, {
            "poise_version": __version__, "settings": settings, "arguments": to_dict(config),
            "examples": {"given": len(examples), "trained": len(ids),
                         "digest": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]},
        })
    distributed.barrier()
    model = train_lora(config, hyper, tokenizer, tokenized, out, "train")
    if distributed.is_main():
        tmp = out / ".adapter.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
        tmp.rmdir()
        log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines() if line.strip()]
        last_epoch = [row["loss"] for row in log[-math.ceil(len(tokenized) / hyper.batch_size):]]
        atomic_write_json(out / SUMMARY_FILE, {
            "source": TRAIN_SOURCE, "model": config.model, "examples": len(tokenized), "steps": len(log),
            "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
            "last_epoch_mean_loss": sum(last_epoch) / len(last_epoch) if last_epoch else None,
        })
    distributed.barrier()
    return out


# ----------------------------------------------------------------------------------------- import
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
    return [(name, tuple(p.shape)) for name, p in _parameter_order(model)], model


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


def import_checkpoint(config: ImportConfig) -> Path:
    """Convert an HF-Trainer LoRA checkpoint into a poise checkpoint folder `config.out`; returns it."""
    import torch

    if not config.checkpoint:
        raise PoiseError("--checkpoint is required")
    if not config.out:
        raise PoiseError("--out is required")
    source = Path(config.checkpoint)
    out = Path(config.out)
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

    adapter_config = read_json(source / ADAPTER_CONFIG)
    model_name = config.model or adapter_config.get("base_model_name_or_path")
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

    settings = {"checkpoint": str(source.resolve()), "model": model_name, "epoch": epoch}
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CHECKPOINT_FILE).exists())):
        raise PoiseError(f"--out {str(out)!r} exists and is not a poise checkpoint folder; choose a new folder")
    if (out / CHECKPOINT_FILE).exists() and not config.overwrite:
        previous = read_json(out / ARGUMENTS_FILE).get("settings") if (out / ARGUMENTS_FILE).exists() else None
        if previous == settings and is_complete_checkpoint(out):
            return out
        raise PoiseError(f"{out}: already holds a checkpoint from another source; use another --out or "
                         "pass --overwrite")

    shapes, meta_model = _trainable_shapes(str(model_name), source)
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
    betas = [float(b) for b in group.get("betas", (0.9, 0.999))]
    info = {
        "epoch": epoch,
        "step": int(trainer_state.get("global_step", 0)),
        "lr_mean": _hf_lr_mean(trainer_state, epoch, state_path),
        "model": str(model_name),
        "betas": betas,
        "eps": float(group.get("eps", 1e-8)),
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

    out.parent.mkdir(parents=True, exist_ok=True)
    arguments = {"poise_version": __version__, "settings": settings, "arguments": to_dict(config)}
    write_checkpoint(out, write_adapter, moments, info, extra_json={ARGUMENTS_FILE: arguments})
    return out


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
