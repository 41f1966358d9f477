"""Benchmark of `poise train`'s training function against a bare PyTorch loop over the same batches.

Claim measured: moving training onto transformers.Trainer (poise's loss, sampler, schedule and callbacks
around it) costs little: `train_lora` trains at >= 0.9x the examples/s of a bare loop that does only the
work any LoRA training must do: forward, the loss (mean of per-example mean token losses), backward,
AdamW step, zero_grad, over the same batches in the same order.

Setup, the same for both: SmolLM2-135M-Instruct (`smollm2-135m`, float32, CPU) with the BIDS LoRA
(r=128, alpha=512, dropout 0.1 on q/k/v/o), the quickstart pool (examples/quickstart/pool.jsonl,
chat-template rendered, ~70 tokens each), `--batch-size` examples per optimizer step in one forward pass,
`--epochs` epochs. Model loading and tokenisation are outside the timing: the bare loop is timed around
its loop, poise around `Trainer.train` (its own `train_runtime`, which includes the epoch checkpoints poise
writes and the Trainer's own epoch checkpoint). The two run alternately `--repeat` times; the ratio of
each pair is printed, since the machine is shared and noisy.

    .venv/bin/python benchmarks/bench_train.py --repeat 2
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from poise.config import TrainConfig
from poise.data import collate, read_examples, tokenize_examples
from poise.lora import attach_lora
from poise.losses import per_example_losses
from poise.model import load_model, load_tokenizer
from poise.train import epoch_order, lr_multiplier, train_lora, warmup_steps

ROOT = Path(__file__).resolve().parent.parent


def bare_loop(config: TrainConfig, tokenizer, items) -> float:
    """Seconds for the training loop alone (model loaded before the clock starts)."""
    model = attach_lora(load_model(config.model), r=config.lora_r, alpha=config.lora_alpha,
                        dropout=config.lora_dropout, target_modules=config.target_modules, seed=config.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps = math.ceil(len(items) / config.batch_size)
    total, n_warmup = steps * config.epochs, warmup_steps(steps * config.epochs, config.warmup_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier("cosine", s, total, n_warmup))
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order = epoch_order(len(items), config.seed, epoch)
        for s in range(steps):
            batch = collate([items[i] for i in order[s * config.batch_size:(s + 1) * config.batch_size]],
                            tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False).logits
            per_example_losses(logits, batch["labels"]).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def poise_loop(config: TrainConfig, tokenizer, items) -> float:
    metrics: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        train_lora(config, tokenizer, items, Path(folder), "train", metrics=metrics)
    return float(metrics["train_runtime"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    config = TrainConfig(model=args.model, selection="-", out="-", batch_size=args.batch_size,
                         max_batch_size=args.batch_size, epochs=args.epochs)
    tokenizer = load_tokenizer(config.model)
    _, items, _ = tokenize_examples(read_examples(ROOT / "examples/quickstart/pool.jsonl"), tokenizer, 2048,
                                    progress=False)
    n = len(items) * config.epochs
    tokens = sum(len(t.input_ids) for t in items) * config.epochs
    print(f"{args.model}, BIDS LoRA r={config.lora_r}, {len(items)} examples x {config.epochs} epoch(s), "
          f"{tokens // config.epochs} tokens per epoch, batch {config.batch_size}, torch threads "
          f"{torch.get_num_threads()}")
    print("| pass | bare loop examples/s | poise train examples/s | poise / bare |")
    print("|---|---|---|---|")
    for k in range(args.repeat):
        bare = bare_loop(config, tokenizer, items)
        mine = poise_loop(config, tokenizer, items)
        print(f"| {k + 1} | {n / bare:.2f} | {n / mine:.2f} | {bare / mine:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
