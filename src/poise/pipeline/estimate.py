"""`poise run CONFIG --plan`: what a run will do, how many tokens each unit processes, the disk it writes and
how long it takes, before any of it runs. Every figure is an estimate and is labelled so.

Tokens come from the tokenised set when it is cached (exact), else from a sample of the pool (up to 2,000 rows,
evenly spaced) scaled to its size. Disk follows from the output formats: a checkpoint is the adapter and two
Adam moments (12 bytes per LoRA parameter), a features folder its rows at the store's bytes per row plus the
ids, the attribution matrix 4 bytes per entry, a selection its picked pool lines, a training its adapter.
Time on the CPU (or a visible GPU) comes from this machine's measured throughput on the run's model at its
sequence length (the median of five passes after two warm-up ones): LoRA forward+backward (warmup, training),
the features stage's own loop (per-example gradients by hooks and the projection) and forward passes
(representations, evaluation). For a GPU that is not here, from FLOPs (6 x parameters per trained token,
2 x per forward token, features 1.3 times training as measured in docs/benchmarks.md) at a stated share of
the card's peak.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.io import human_size

FEATURES_OVER_TRAINING = 1.3
SAMPLE_ROWS = 2000
GPU_PEAK_FLOPS = {"H100": 989e12}  # dense bf16
GPU_EFFICIENCY = 0.4
#: float operations per matrix entry of a selection (a few passes over the matrix: normalisation, the rules)
SELECT_FLOPS_PER_ENTRY = 100
#: an evaluation item's prompt, in tokens (the items are not tokenised for the plan)
PROMPT_TOKENS = 128
#: a generated token costs about this many tokens of a batched forward pass (one position per step)
DECODE_COST = 16
#: the fixed files of a folder (arguments.json, info.json, logs): small next to the data but counted
FOLDER_OVERHEAD = 1500
#: a saved peft adapter beside its weights: README.md (peft's model card) and adapter_config.json
ADAPTER_FILES = 6500
#: a safetensors header entry (name, dtype, shape, offsets) per tensor
TENSOR_HEADER = 150
#: selection.json per pick: the index and its trace entry (column and task served, gain)
PICK_BYTES = 200
#: an evaluation folder beside its samples: lm-eval's results.json and the task files poise writes
EVALUATION_FILES = 20_000
#: seconds a unit spends beside its tokens (model load, the Trainer's or lm-eval's set-up)
UNIT_SECONDS = {"warmup": 2.0, "features": 1.0, "train": 2.0, "evaluate": 3.0, "report": 3.0}


@dataclass
class DataStats:
    rows: int
    kept: int
    tokens: int  # of the kept examples
    line_bytes: float  # mean bytes of a row of the source file(s) (what selected.jsonl copies)
    id_bytes: float  # mean bytes of a {"id", "task"} line (features' ids.jsonl)
    row_bytes: float  # mean bytes of an {"id"} line (the attribution's rows.jsonl)
    exact: bool

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.kept if self.kept else 0.0


@dataclass
class Throughput:
    train: float  # tokens/s of a LoRA forward+backward
    forward: float  # tokens/s of a forward pass
    features: float  # tokens/s of per-example gradient features (hooks, the projection)
    matmul: float  # float32 FLOP/s of numpy matrix products (attribution, selection)
    basis: str


@dataclass
class Estimate:
    unit: str
    stage: str
    tokens: int
    disk: int
    seconds: float


def data_stats(paths: list[str], tokenizer: Any, max_seq_length: int, template: str, task: str | None = None,
               ) -> DataStats:
    """Rows, kept examples and tokens of `paths`: exact from the tokenised cache, else from a sample."""
    import numpy as np

    from poise.data.formats import Example
    from poise.data.templates import tokenize_examples
    from poise.data.tokenized import META_FILE, cache_key, parsed_rows
    from poise.io import cache_dir, read_json

    rows = parsed_rows(paths, task)
    n = len(rows)
    source_bytes = sum(_size(Path(p)) for p in paths)
    line_bytes = source_bytes / n if source_bytes else 0.0
    table = rows.table()
    positions = np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).astype(np.int64))
    sample = table.select_columns(["id", "task", "where", "messages", "input_ids", "labels"]).data.table.take(positions)
    columns = {name: sample.column(name).to_pylist() for name in sample.column_names}
    import json

    id_bytes = float(np.mean([len(json.dumps({"id": i, "task": t})) + 1 for i, t in zip(columns["id"],
                                                                                      columns["task"], strict=True)]))
    row_bytes = float(np.mean([len(json.dumps({"id": i})) + 1 for i in columns["id"]]))
    folder = cache_dir() / "tokenized" / cache_key(rows.key, tokenizer, max_seq_length, template)
    if (folder / META_FILE).is_file():
        meta = read_json(folder / META_FILE)
        return DataStats(n, int(meta["kept"]), int(meta["tokens"]), line_bytes, id_bytes, row_bytes, True)
    examples = [Example(i, json.loads(m) if m is not None else None, ids, labels, t, w)
                for i, t, w, m, ids, labels in zip(columns["id"], columns["task"], columns["where"],
                                                   columns["messages"], columns["input_ids"], columns["labels"],
                                                   strict=True)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            kept, tokenized, _ = tokenize_examples(examples, tokenizer, max_seq_length, template=template,
                                                   progress=False)
        except PoiseError:  # the whole sample without a target token
            kept, tokenized = [], []
    share = len(kept) / len(examples)
    mean = sum(len(t.input_ids) for t in tokenized) / len(tokenized) if tokenized else 0.0
    return DataStats(n, round(share * n), round(share * n * mean), line_bytes, id_bytes, row_bytes,
                     len(examples) == n)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def lora_parameters(model_name: str, targets: list[str], r: int) -> tuple[int, int, int]:
    """(LoRA parameters, LoRA tensors, base model parameters) from the model's skeleton (no weights read)."""
    from poise.lora import linear_layers, matches, resolve_targets, skeleton

    model = skeleton(model_name)
    targets = resolve_targets(model, targets)
    lora = tensors = 0
    for name, module in linear_layers(model).items():
        if any(matches(name, t) for t in targets):
            tensors += 2
            weight = module.weight
            fan_out, fan_in = weight.shape if weight.dim() == 2 else (weight.numel(), 1)
            if type(module).__name__ == "Conv1D":
                fan_in, fan_out = fan_out, fan_in
            lora += r * (fan_in + fan_out)
    return lora, tensors, sum(p.numel() for p in model.parameters())


def measure_throughput(config: Any, warmup: Any, features: Any = None) -> Throughput:
    """Tokens per second of LoRA forward+backward, of forward and of gradient features (`features`: a features
    stage config, for its projection), measured here on the run's model (or FLOPs for a GPU that is not
    visible), and numpy's matrix-product rate."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    started = time.perf_counter()
    for _ in range(3):
        a @ a
    matmul = 3 * 2 * 1024**3 / (time.perf_counter() - started)
    device = str(config.device)
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        _, _, params = lora_parameters(config.model, warmup.target_modules, warmup.lora_r)
        name = "H100"  # the card the run will get is not known here: an H100's dense bf16 peak, said in the basis
        peak = GPU_PEAK_FLOPS[name]
        rate = GPU_EFFICIENCY * peak
        return Throughput(rate / (6 * params), rate / (2 * params), rate / (6 * params) / FEATURES_OVER_TRAINING,
                          matmul,
                          f"FLOPs at {GPU_EFFICIENCY:.0%} of {name}'s {peak / 1e12:.0f} TFLOP/s (no GPU visible here)")
    from poise.lora import attach_lora
    from poise.model import load_model

    model = attach_lora(load_model(config.model, dtype=config.dtype, device=device), r=warmup.lora_r,
                        alpha=warmup.lora_alpha, dropout=0.0, target_modules=warmup.target_modules)
    length = min(int(config.max_seq_length), 512)
    batch = max(1, 2048 // length)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, length), device=device)

    def timed(train: bool, warm: int = 2, reps: int = 5) -> float:
        """Tokens/s: the median of `reps` timed passes after `warm` untimed ones (the first passes of a process
        run slower: allocation, thread start-up)."""
        rates = []
        for k in range(warm + reps):
            started = time.perf_counter()
            if train:
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if k >= warm:
                rates.append(batch * length / (time.perf_counter() - started))
        return float(sorted(rates)[len(rates) // 2])

    model.train()
    train = timed(True)
    model.eval()
    forward = timed(False)
    rate = train / FEATURES_OVER_TRAINING
    if features is not None:
        rate = _features_rate(model, ids, features, device)
    return Throughput(train, forward, rate, matmul, f"measured on this machine ({device}, {batch} x {length} tokens)")


def _features_rate(model: Any, ids: Any, config: Any, device: str, warm: int = 2, reps: int = 5) -> float:
    """Tokens/s of the features stage's inner loop (per-example gradients by hooks, projected) on `ids`."""
    import torch

    from poise.features.capture import backward_per_example, capture_lora_gradients, lora_linear_modules
    from poise.features.projection import make_projector

    shapes = {name: tuple(m.weight.shape) for name, m in lora_linear_modules(model).items()}
    projector = make_projector(config.projection, config.dim, config.seed, shapes, device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "position_ids": torch.arange(ids.shape[1], device=ids.device).expand_as(ids)}
    rates = []
    for k in range(warm + reps):
        out = torch.zeros(ids.shape[0], projector.dim, device=device)
        started = time.perf_counter()
        with capture_lora_gradients(model, lambda name, grad, out=out: projector.add(
                name, grad.reshape(grad.shape[0], -1), out)):
            backward_per_example(model, batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if k >= warm:
            rates.append(ids.numel() / (time.perf_counter() - started))
    return float(sorted(rates)[len(rates) // 2])


def estimate_units(config: Any, inputs: Any, units: list[Any], throughput: Throughput | None = None,
                   ) -> tuple[list[Estimate], Throughput]:
    """An `Estimate` per unit (see the module docstring)."""
    from poise.features.store import bytes_per_example
    from poise.model import load_tokenizer
    from poise.selection.registry import parse_budget

    warmup = next(u.config for u in units if u.stage == "warmup")
    tokenizer = load_tokenizer(str(config.model))
    pool = data_stats([str(inputs.pool)], tokenizer, config.max_seq_length, config.template)
    validation = data_stats([str(p) for p in inputs.validation], tokenizer, config.max_seq_length, config.template)
    lora, tensors, _ = lora_parameters(config.model, warmup.target_modules, warmup.lora_r)
    adapter = 4 * lora + tensors * TENSOR_HEADER + ADAPTER_FILES  # a saved adapter
    moments = 8 * lora + 2 * tensors * TENSOR_HEADER
    features = next((u.config for u in units if u.stage == "features" and u.config.kind != "reps"), None)
    speed = throughput or measure_throughput(config, warmup, features)
    counted = ("counted in the tokenised cache" if pool.exact
               else f"from a sample of {min(pool.rows, SAMPLE_ROWS):,} rows")
    speed = dataclasses.replace(speed, basis=f"{speed.basis}; pool tokens {counted}")
    out: list[Estimate] = []
    n_val = validation.kept
    for unit in units:
        c, tokens, disk, seconds = unit.config, 0, FOLDER_OVERHEAD, 0.0
        if unit.stage == "warmup":
            count = c.examples if c.examples is not None else max(1, math.floor(c.fraction * pool.rows))
            trained = count * pool.kept / pool.rows
            tokens = round(trained * pool.mean_tokens * c.epochs)
            disk += c.epochs * (adapter + moments + 600) + round(trained * (pool.id_bytes - 10)) + 60 * math.ceil(
                tokens / c.epochs / max(pool.mean_tokens, 1) / c.batch_size) * c.epochs  # + examples, log lines
            seconds = tokens / speed.train
        elif unit.stage == "features":
            data = pool if unit.name.endswith("/train") else validation
            tokens = data.tokens
            if c.kind == "reps":  # a forward pass, at a checkpoint (rds) or of the base model (rds+)
                disk += round(data.kept * bytes_per_example(c.output_dtype, _hidden_size(config.model)))
                seconds = tokens / speed.forward
            else:
                disk += round(data.kept * bytes_per_example(c.output_dtype, c.dim))
                seconds = tokens / speed.features
            disk += round(data.kept * data.id_bytes)
        elif unit.stage == "attribute":
            dims = _hidden_size(config.model) if c.rds else next(
                (u.config.dim for u in units if u.stage == "features" and str(u.config.out) in c.train), 8192)
            disk += pool.kept * n_val * 4 + round(pool.kept * pool.row_bytes)
            seconds = 2 * pool.kept * n_val * dims * len(c.train) / speed.matmul
        elif unit.stage == "select":
            picks = parse_budget(c.budget, pool.kept)
            disk += round(picks * (pool.line_bytes + PICK_BYTES))
            seconds = SELECT_FLOPS_PER_ENTRY * pool.kept * n_val / speed.matmul
        elif unit.stage == "train":
            picks = _picks(unit, units, pool)
            tokens = round(picks * pool.mean_tokens * c.epochs)
            disk += adapter + 60 * math.ceil(picks / c.batch_size) * c.epochs
            seconds = tokens / speed.train
        elif unit.stage == "evaluate":
            items = sum(_lines(Path(p)) for p in c.data)
            tokens = items * (PROMPT_TOKENS + c.max_gen_toks)
            disk += EVALUATION_FILES + items * 400
            seconds = items * (PROMPT_TOKENS + DECODE_COST * c.max_gen_toks) / speed.forward
        elif unit.stage == "report":
            disk += 750_000
        seconds += UNIT_SECONDS.get(unit.stage, 0.0)
        out.append(Estimate(unit.name, unit.stage, tokens, disk, seconds))
    return out, speed


def _hidden_size(model: str) -> int:
    """The width of the model's final-layer states (the dimension of representation features)."""
    import transformers

    return int(transformers.AutoConfig.from_pretrained(_folder(model)).hidden_size)


def _folder(model: str) -> str:
    from poise.model import model_folder

    return model_folder(model)


def _lines(path: Path) -> int:
    if path.is_dir():
        return sum(_lines(p) for p in path.glob("*.jsonl"))
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _picks(unit: Any, units: list[Any], pool: DataStats) -> int:
    """Examples a training unit trains on: its selection unit's budget, or the whole pool."""
    from poise.selection.registry import parse_budget

    selection = str(Path(unit.config.selection))
    for other in units:
        if other.stage == "select" and str(Path(other.config.out)) == selection:
            return parse_budget(other.config.budget, pool.kept)
    return pool.kept


def print_plan(estimates: list[Estimate], speed: Throughput, console: Any, done: set[str]) -> None:
    """The plan as a table, one row per stage (units, tokens, disk, time) and the total, labelled estimates."""
    from rich.table import Table

    table = Table(title="poise run --plan (estimates)", title_justify="left")
    for column in ("stage", "units", "to run", "tokens", "disk", "time"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    stages = list(dict.fromkeys(e.stage for e in estimates))
    total_disk = total_seconds = 0.0
    for stage in stages:
        rows = [e for e in estimates if e.stage == stage]
        todo = [e for e in rows if e.unit not in done]
        disk, seconds = sum(e.disk for e in rows), sum(e.seconds for e in todo)
        total_disk += disk
        total_seconds += seconds
        table.add_row(stage, str(len(rows)), str(len(todo)), f"{sum(e.tokens for e in todo):,}", human_size(disk),
                      _duration(seconds))
    table.add_row("total", str(len(estimates)), str(sum(e.unit not in done for e in estimates)), "",
                  human_size(total_disk), _duration(total_seconds), style="bold")
    console.print(table)
    console.print(f"time: {speed.basis}; {speed.train:,.0f} tokens/s LoRA forward+backward, {speed.features:,.0f} "
                  f"gradient features, {speed.forward:,.0f} forward. Every figure is an estimate; nothing was run.")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
