"""LoRA training on transformers.Trainer: `train_lora`, the one training function (`poise warmup` and
`poise train` call it), and `run_train`, fine-tuning on a selection.

The Trainer does the loop, DDP under torchrun (gloo on CPU, NCCL on GPU), bf16, gradient checkpointing,
gradient accumulation to the effective batch and whatever else `TrainingArguments` offers (FSDP, DeepSpeed:
the `trainer:` mapping of the YAML config). poise supplies the loss of docs/design.md (the mean over a step's
examples of each example's mean token loss, on the labels features use, so an example's weight does not depend
on its length, its micro-batch or its rank), the seeded example order of each epoch (`EpochOrder`), and the
schedule (`lr_multiplier`: linear warm-up over 3% of the steps, then linear (LESS) or cosine (BIDS) decay,
every step's rate positive). While training, the Trainer keeps its own last epoch checkpoint in `out/trainer/`,
so a killed run rerun with the same command resumes there and ends with the same bits; it is deleted when
training completes.

`run_train` fine-tunes on a selection with the BIDS paper's defaults: LoRA r=128, alpha=512, dropout 0.1 on
q/k/v/o, AdamW (0.9, 0.999, 1e-8, no weight decay), lr 2e-5, 2 epochs, cosine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from poise import distributed, provenance
from poise.config import LoraTrainingConfig, TrainConfig, validate
from poise.data import ItemView, collate, tokenized_set
from poise.data.tokenized import parsed_rows
from poise.errors import PoiseError
from poise.faults import maybe_kill
from poise.files import SELECTED_FILE, SELECTION_FILE, TRAIN_LOG_FILE, TRAIN_SUMMARY_FILE
from poise.io import atomic_write_json, atomic_write_lines, read_json
from poise.losses import model_losses
from poise.progress import note, track

STAGE = "train"
TRAIN_SOURCE = "poise train"
TRAINER_DIR = "trainer"  # the Trainer's own resume checkpoint, while training


# ------------------------------------------------------------------------------------- schedule
def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Optimizer steps of linear warm-up, as transformers computes them: ceil(total * ratio)."""
    return math.ceil(total_steps * warmup_ratio)


def schedule(n_examples: int, config: LoraTrainingConfig) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warm-up steps) for `n_examples` trained `config.epochs` times."""
    steps_per_epoch = math.ceil(n_examples / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    return steps_per_epoch, total_steps, warmup_steps(total_steps, config.warmup_ratio)


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


def lr_multiplier(scheduler: str, step: int, total_steps: int, n_warmup: int) -> float:
    """The learning rate of step `step` as a fraction of the peak: `learning_rate` (linear) or its cosine twin.

    Both warm up linearly from peak / n_warmup on the first step; cosine then follows
    0.5 * (1 + cos(pi * (step - n_warmup) / (total - n_warmup))), positive on every step as well.
    """
    if scheduler == "linear" or step < n_warmup:
        return learning_rate(step, total_steps, n_warmup, 1.0)
    progress = (step - n_warmup) / max(1, total_steps - n_warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the `n` training examples in `epoch` (1-based): a permutation seeded by (seed, epoch)."""
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def micro_batching(batch_size: int, world: int, max_micro: int) -> tuple[int, int]:
    """(examples per device per forward pass, gradient accumulation steps) for `batch_size` examples per step."""
    if batch_size % world:
        raise PoiseError(f"batch_size {batch_size} must be a multiple of the number of processes ({world})")
    per_rank = batch_size // world
    micro = max(d for d in range(1, min(per_rank, max_micro) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def check_settings(config: LoraTrainingConfig) -> None:
    """A warmup or train config's fields (`validate`), and what their metadata cannot say: `trainer` a mapping
    of TrainingArguments settings. Cheap: before any data or model is read."""
    validate(config)
    name = type(config).__name__
    if config.trainer is not None:
        if not isinstance(config.trainer, dict):
            raise PoiseError(f"{name}.trainer: expected a mapping of TrainingArguments settings, got "
                             f"{config.trainer!r}")
        unknown = sorted(set(config.trainer) - set(TrainingArguments.__dataclass_fields__))
        if unknown:
            raise PoiseError(f"{name}.trainer: unknown TrainingArguments setting {unknown[0]!r}")


# ------------------------------------------------------------------------------ the training function
class Examples(torch.utils.data.Dataset):
    """The tokenised training examples, by index."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class EpochOrder(torch.utils.data.Sampler):
    """`epoch_order(n, seed, epoch)`: the same order on every rank and on a resumed run."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(epoch_order(self.n, self.seed, self.epoch + 1))


class LoraTrainer(Trainer):
    """transformers.Trainer with poise's example order, loss and learning-rate schedule.

    `seed` seeds the order of every epoch (`EpochOrder`); `multiplier(step)` is the learning rate of optimizer
    step `step` as a fraction of the peak.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, seed: int, multiplier: Callable[[int], float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order_seed = seed
        self.multiplier = multiplier

    def _get_train_sampler(self, train_dataset=None):
        return EpochOrder(len(train_dataset if train_dataset is not None else self.train_dataset), self.order_seed)

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
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.multiplier)
        return self.lr_scheduler


#: on_epoch_end(epoch, global_step, step_rates, step_losses, model, optimizer), on rank 0
EpochEnd = Callable[[int, int, list[float], list[float], Any, Any], None]


class Record(TrainerCallback):
    """Each step's rate and loss, the per-step log (`train_log.jsonl`), progress, and the epoch's end."""

    def __init__(self, log_path: Path, steps_per_epoch: int, on_epoch_end: EpochEnd | None, tracker: Any) -> None:
        self.log_path, self.steps_per_epoch, self.tracker = log_path, steps_per_epoch, tracker
        self.epoch_end = on_epoch_end  # not `on_epoch_end`: that is the callback method below
        self.rates: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.main = distributed.is_main()

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.rates[state.global_step] = float(lr_scheduler.get_last_lr()[0])  # the rate this step runs at

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        step = state.global_step
        self.losses[step - 1] = float(logs["loss"])
        if self.main:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, "epoch": round(float(state.epoch or 0), 4),
                                         "loss": float(logs["loss"]), "lr": self.rates.get(step - 1)}) + "\n")
        self.tracker.advance(step - self.tracker.done, loss=f"{float(logs['loss']):.4f}")

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        epoch = int(round(float(state.epoch)))
        steps = range((epoch - 1) * self.steps_per_epoch, epoch * self.steps_per_epoch)
        if self.epoch_end is not None and self.main:
            self.epoch_end(epoch, state.global_step, [self.rates[s] for s in steps],
                           [self.losses[s] for s in steps if s in self.losses], model, optimizer)
        distributed.barrier()

    def on_save(self, args, state, control, **kwargs):
        maybe_kill("epoch", int(round(float(state.epoch or 0))))  # tests: once the epoch's checkpoints are saved


def train_lora(config: LoraTrainingConfig, tokenizer: Any, tokenized: Sequence[Any], out: Path, label: str,
               on_epoch_end: EpochEnd | None = None, metrics: dict | None = None) -> Any:
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
    from poise.lora import adaptation, adaptation_line, attach_lora
    from poise.model import load_model  # here: the tests replace it to see when it is called

    micro, accumulation = micro_batching(config.batch_size, distributed.world_size(), config.max_batch_size)
    steps_per_epoch, total_steps, n_warmup = schedule(len(tokenized), config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padding_side = getattr(tokenizer, "padding_side", "right") or "right"
    main = distributed.is_main()

    model = load_model(config.model, dtype=config.dtype, device="cpu")
    model = attach_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        target_modules=config.target_modules, seed=config.seed)
    if main:
        note(f"{label}: {adaptation_line(adaptation(model))}")

    trainer_dir = out / TRAINER_DIR
    resume = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() and not config.overwrite else None
    resumed_step = int(resume.rsplit("-", 1)[1]) if resume else 0
    log_path = out / TRAIN_LOG_FILE
    if main:  # the log keeps the steps the resumed state has taken
        kept = []
        if log_path.exists() and resumed_step:
            kept = [line for line in log_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
        atomic_write_lines(log_path, kept)
        if resume:
            note(f"{label}: resuming at step {resumed_step + 1} of {total_steps} ({resume})")

    arguments = dict(
        output_dir=str(trainer_dir), per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs, learning_rate=config.lr, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_epsilon=config.adam_eps,
        max_grad_norm=config.max_grad_norm, optim="adamw_torch", seed=config.seed, data_seed=config.seed,
        logging_steps=1, save_strategy="epoch", save_total_limit=1, save_only_model=False, report_to=[],
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=str(config.device) == "cpu", bf16=bool(config.bf16),
        ddp_find_unused_parameters=False,
    )
    if config.gradient_checkpointing:
        arguments["activation_checkpointing"] = True
    arguments.update(config.trainer or {})

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the Trainer's own info lines while training; poise says what matters
    try:
        with track(label, total_steps, unit="steps", done=resumed_step, enabled=main) as tracker:
            trainer = LoraTrainer(
                model=model, args=TrainingArguments(**arguments), train_dataset=Examples(tokenized),
                data_collator=lambda items: collate(items, pad_id, padding_side),
                callbacks=[Record(log_path, steps_per_epoch, on_epoch_end, tracker)], seed=config.seed,
                multiplier=lambda step: lr_multiplier(config.lr_scheduler, step, total_steps, n_warmup),
            )
            trainer.remove_callback(PrinterCallback)  # it prints every log dict; poise's progress says it once
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
def selection_source(selection: str, pool: str | None) -> tuple[str, np.ndarray | None]:
    """What a selection names: (a data file or folder, None), or (the pool, the picked pool rows). Checked before
    any model is loaded: a folder that is none of these, picks without a pool, picks past the pool's end."""
    path = Path(selection)
    if not path.is_dir():
        return selection, None
    if (path / SELECTED_FILE).is_file() and pool is None:
        return str(path / SELECTED_FILE), None
    if not (path / SELECTION_FILE).is_file():
        if any(path.glob("*.jsonl")):
            return selection, None  # a folder of data files
        raise PoiseError(f"{path}: neither a selection folder ({SELECTION_FILE}) nor a folder of data files")
    if pool is None:
        raise PoiseError(f"{path}: no {SELECTED_FILE}; pass --pool (the pool in matrix row order) to take the picks "
                         f"of {SELECTION_FILE} from it")
    picks = read_json(path / SELECTION_FILE).get("indices")
    if not isinstance(picks, list) or not picks:
        raise PoiseError(f"{path / SELECTION_FILE}: no 'indices' (the picked rows)")
    n_pool = len(parsed_rows([pool]))
    if max(picks) >= n_pool:
        raise PoiseError(f"{path / SELECTION_FILE}: picks row {max(picks)}, but {pool} has {n_pool} rows")
    return pool, np.asarray(picks, dtype=np.int64)


def run_train(config: TrainConfig) -> Path:
    """Fine-tune a LoRA adapter on a selection into `config.out` (a peft adapter folder); returns it.

    Resumes a killed run from the Trainer's last epoch checkpoint; refuses a folder trained with other
    settings unless `overwrite` (which starts over); a complete folder with the same settings is reused.
    """
    from poise.lora import adaptation, planned_targets
    from poise.model import load_tokenizer

    check_settings(config)
    source, picks = selection_source(str(config.selection), config.pool)  # before any model is loaded
    parsed_rows([source])  # every row read and checked (and cached) before any model is loaded
    planned_targets(str(config.model), config.target_modules)  # LoRA targets that fit the model, before any work
    distributed.init(config.device)
    opened = provenance.open_folder(config.out, STAGE, config, collective=True)
    out = opened.folder
    main = distributed.is_main()
    if opened.complete:
        if main:
            note(f"train: {out} is already complete; nothing to do")
        return out

    tokenizer = load_tokenizer(str(config.model))
    data = tokenized_set([source], tokenizer, config.max_seq_length, template=config.template, progress=main,
                         report=picks is None)
    if picks is None:
        positions, given = np.arange(len(data)), data.n_rows
    else:  # the picked pool rows that have a target token, in the selection's order
        (positions, left_out), given = data.positions_of(picks), len(picks)
        if main:
            data.report_excluded(left_out, fatal=False)
        if not len(positions):
            raise PoiseError(f"{config.selection}: none of the {given} picked examples has a target token within "
                             f"max_seq_length {config.max_seq_length}")
    provenance.update(out, examples={"given": given, "trained": len(positions), "digest": data.ids_digest(positions)})
    tokenized = ItemView(data, positions)
    model = train_lora(config, tokenizer, tokenized, out, STAGE)
    if main:
        tmp = out / ".adapter.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
        tmp.rmdir()
        log = [json.loads(line) for line in (out / TRAIN_LOG_FILE).read_text().splitlines() if line.strip()]
        last_epoch = [row["loss"] for row in log[-math.ceil(len(tokenized) / config.batch_size):]]
        atomic_write_json(out / TRAIN_SUMMARY_FILE, {
            "source": TRAIN_SOURCE, "model": config.model, "examples": len(tokenized), "steps": len(log),
            "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
            "last_epoch_mean_loss": sum(last_epoch) / len(last_epoch) if last_epoch else None,
            "lora": adaptation(model),
        })
        provenance.mark_complete(out)
    distributed.barrier()
    return out
