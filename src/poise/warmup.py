"""`poise warmup`: LoRA training on a seeded random part of the pool, a poise checkpoint per epoch (the
checkpoints LESS takes its gradient features at; poise.checkpoint holds their format).

LESS's defaults: LoRA r=128, alpha=512, dropout 0.1 on q/k/v/o, a seeded random 5% of the pool, 4 epochs,
AdamW (0.9, 0.999, 1e-8, no weight decay), lr 2e-5, 128 examples per step, linear decay. The run folder holds
arguments.json (poise.provenance; its info: the examples trained on and the schedule), examples.jsonl (their
ids), train_log.jsonl and checkpoint-<epoch>/. A killed run rerun with the same settings resumes after its
last saved epoch; the folder is complete once every epoch's checkpoint is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from poise import distributed, provenance
from poise.checkpoint import is_complete_checkpoint, optimizer_moments, write_checkpoint
from poise.config import WarmupConfig
from poise.data import ItemView, tokenized_set
from poise.data.tokenized import parsed_rows
from poise.errors import PoiseError, warn
from poise.files import EXAMPLES_FILE
from poise.io import atomic_write_lines
from poise.lora import planned_targets
from poise.progress import note
from poise.train import check_settings, schedule, train_lora

STAGE = "warmup"
WARMUP_SOURCE = "poise warmup"


def subset_indices(n_pool: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct pool indices drawn uniformly with `seed`, in pool order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_pool, size=count, replace=False)).astype(np.int64)


def warmup_count(n_pool: int, config: WarmupConfig) -> int:
    """How many pool examples the warmup trains on; warns when that is less than one optimizer step's batch."""
    if config.examples is not None:
        count = config.examples
        if count > n_pool:
            raise PoiseError(f"WarmupConfig.examples={count}: the pool has only {n_pool} examples")
        source = f"--examples {count}"
    else:
        count = max(1, math.floor(config.fraction * n_pool))
        source = f"--fraction {config.fraction:g} of {n_pool} pool examples"
    if count < config.batch_size and distributed.is_main():
        warn(f"warmup trains on {count} examples ({source}), fewer than one batch (--batch-size "
             f"{config.batch_size}): every epoch is a single optimizer step, so each checkpoint's Adam moments come "
             f"from {config.epochs} steps at most; for a small pool pass --examples N (or --fraction 1.0) and a "
             "--batch-size that gives several steps per epoch")
    return count


def checkpoint_folders(out: str | Path, epochs: int) -> list[Path]:
    """The run's checkpoint folders, `out/checkpoint-1..epochs`."""
    return [Path(out) / f"checkpoint-{k}" for k in range(1, epochs + 1)]


def completed_epochs(out: str | Path, epochs: int) -> int:
    """The last epoch k such that checkpoints 1..k are all complete."""
    done = 0
    for folder in checkpoint_folders(out, epochs):
        if not is_complete_checkpoint(folder):
            break
        done += 1
    return done


def run_warmup(config: WarmupConfig) -> list[Path]:
    """Train the warmup LoRA adapter; returns the checkpoint folders `out/checkpoint-1..epochs`.

    Resumes after the last complete checkpoint of a run with the same settings; refuses a run folder made with
    other settings, or whose checkpoints were trained on other examples, unless `overwrite` (which starts over).
    """
    check_settings(config)
    # the data first: a missing file or a warmup set too small to train on is said before any model is loaded
    pool = parsed_rows(config.data)  # parsed once into poise's cache: every row checked, counted, nothing held
    count = warmup_count(len(pool), config)
    planned_targets(str(config.model), config.target_modules)  # LoRA targets that fit the model, before any work

    distributed.init(config.device)
    opened = provenance.open_folder(config.out, STAGE, config, collective=True)
    out = opened.folder
    checkpoints = checkpoint_folders(out, config.epochs)
    if opened.resumed and completed_epochs(out, config.epochs) == config.epochs:
        if not opened.complete:  # every checkpoint is there: the folder is complete
            provenance.mark_complete(out)
        if distributed.is_main():
            note(f"warmup: {out} is already complete ({config.epochs} checkpoints); nothing to do")
        return checkpoints
    _train(config, out, checkpoints, len(pool), count)
    provenance.mark_complete(out)
    distributed.barrier()
    return checkpoints


def _train(config: WarmupConfig, out: Path, checkpoints: list[Path], n_pool: int, count: int) -> None:
    from poise.lora import adaptation
    from poise.model import load_tokenizer  # here: the tests replace it to see that nothing loads it too early

    # the warmup examples: a seeded random part of the pool, tokenised (the pool's tokens, memory-mapped)
    tokenizer = load_tokenizer(str(config.model))
    data = tokenized_set(config.data, tokenizer, config.max_seq_length, template=config.template,
                         progress=distributed.is_main(), report=False)
    chosen = subset_indices(n_pool, count, config.seed)  # rows of the pool
    positions, left_out = data.positions_of(chosen)
    if distributed.is_main():
        data.report_excluded(left_out, fatal=False)
    n = len(positions)
    if n == 0:
        raise PoiseError(f"none of the {count} warmup examples has a target token within --max-seq-length "
                         f"{config.max_seq_length}")
    digest = data.ids_digest(positions)
    steps_per_epoch, total_steps, n_warmup = schedule(n, config)

    # a resumed folder: its checkpoints must have been trained on these examples
    previous = (((provenance.stored(out) or {}).get("info") or {}).get("examples") or {}).get("digest")
    if previous is not None and previous != digest:
        raise PoiseError(f"{out}: its checkpoints were trained on other examples (the data changed); use another "
                         "output folder or overwrite")
    distributed.barrier()  # every rank has read arguments.json before rank 0 adds to it
    if distributed.is_main():
        provenance.update(out, examples={"pool": n_pool, "chosen": count, "trained": n, "digest": digest,
                                         "file": EXAMPLES_FILE},
                          schedule={"steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                                    "warmup_steps": n_warmup})
        atomic_write_lines(out / EXAMPLES_FILE,
                           (json.dumps({"id": row["id"]}) for row in data.columns(["id"], positions)))
    distributed.barrier()

    def save_epoch(epoch: int, step: int, rates: list[float], losses: list[float], model: Any,
                   optimizer: Any) -> None:
        info = {
            "epoch": epoch,
            "step": step,
            "lr_mean": sum(rates) / len(rates),
            "model": config.model,
            "betas": [float(config.adam_beta1), float(config.adam_beta2)],
            "eps": float(config.adam_eps),
            "weight_decay": float(config.weight_decay),
            "source": WARMUP_SOURCE,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "examples": n,
            "lora": adaptation(model),
        }
        write_checkpoint(checkpoints[epoch - 1], lambda tmp: model.save_pretrained(str(tmp)),
                         optimizer_moments(model, optimizer), info)

    train_lora(config, tokenizer, ItemView(data, positions), out, STAGE, on_epoch_end=save_epoch)
