"""Benchmark of the feature store's kinds (docs/design.md §2.3): how much each saves on disk and what it changes
in the attribution matrix and in the selections made from it.

Claim measured: a float16 store (the default, LESS's 16 KB per example per checkpoint at d = 8192) changes
the attribution matrix by float16 rounding only and the selections hardly at all; int8 (a quarter of
float32) and 1bit (1/32, QLESS) trade larger changes for smaller stores.

Setup (built once into `--cache`, reused by later runs with the same arguments):
- data: poise's demo data (`poise data demo`: reasoning-gym questions; 6 capabilities, 30% of the pool
  serving none) with `--n` pool rows and `--val-per-task` validation rows per capability;
- model: a random-init Llama built in code (tests/tiny.py's `tiny_llama`: hidden 128, `--layers` 2, 4 heads,
  2 KV heads) with a byte-level BPE of 2,048 tokens trained on the data's own text, saved as a folder;
- checkpoint: `poise warmup` on 5% of the pool, LoRA r = 64 on q/k/v/o (57,344 LoRA parameters a layer:
  114,688 for 2 layers, so the sketch to d = 8192 compresses 14x), one epoch, lr 1e-3: one checkpoint;
- features: `poise features` with `output_dtype=float32`, sjlt to `--dim` (default 8192): adam for the
  pool, sgd for the validation rows.

Then, for every store kind, the float32 rows are written into a store of that kind through `FeatureStore`
(quantised in `write_batch`, as the features stage does), `poise attribute` runs on it, and BIDS and
task-max select 5% and 15% of the pool. Printed per kind: bytes per example per checkpoint (from the files
on disk), max |A_kind - A_float32| (and relative to the standard deviation of A_float32's entries), and the
Jaccard overlap of each selection with float32's. Rows "train X + val float32" keep the small validation
set in float32 (stores of different kinds may be mixed). The last row, float32 features sketched with
projection seed 1 instead of 0, is the scale to read the others against: the noise the sjlt projection
itself puts into A and the picks (a second features run; `--no-seed-reference` skips it).

Run from the repository root:

    nice .venv/bin/python benchmarks/bench_store.py --cache /tmp/poise-bench-store --markdown /tmp/store.md
    .venv/bin/python benchmarks/bench_store.py --n 600 --dim 1024 --cache /tmp/bs-quick    # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KINDS = ("float32", "float16", "int8", "1bit")
MIXED = (("int8", "float32"), ("1bit", "float32"))
METHODS = ("bids", "task-max")


def build(args: argparse.Namespace) -> dict[str, Path]:
    """Data, model, checkpoint and float32 features in `args.cache` (each skipped when already complete)."""
    from poise.config import FeaturesConfig, WarmupConfig
    from poise.data.demo import write_demo_data
    from poise.features.stage import run_features
    from poise.warmup import run_warmup

    root = Path(args.cache) / f"n{args.n}-v{args.val_per_task}-l{args.layers}"
    data, model = root / "data", root / "model"
    if not (data / "sources.json").exists():
        write_demo_data(data, pool_size=args.n, validation_per_task=args.val_per_task, heldout_per_task=1)
    if not (model / "config.json").exists():
        from tiny import tiny_llama

        tokenizer = data_tokenizer([data / "pool.jsonl", *sorted((data / "validation").glob("*.jsonl"))])
        tiny_llama(tokenizer, seed=0, hidden=128, layers=args.layers, heads=4, kv_heads=2).save_pretrained(model)
        tokenizer.save_pretrained(model)
    common = {"max_seq_length": args.max_seq_length}
    [checkpoint] = run_warmup(WarmupConfig(model=str(model), data=[str(data / "pool.jsonl")], out=str(root / "warmup"),
                                           fraction=0.05, epochs=1, lr=1e-3, lora_r=64, lora_alpha=128,
                                           batch_size=16, **common))
    paths = {"root": root, "checkpoint": checkpoint}
    for seed in (0, 1) if args.seed_reference else (0,):
        for split, source, kind in (("train", data / "pool.jsonl", "adam"), ("val", data / "validation", "sgd")):
            out = root / f"features-d{args.dim}" / (split if seed == 0 else f"{split}-seed{seed}")
            started = time.perf_counter()
            run_features(FeaturesConfig(data=[str(source)], out=str(out), checkpoint=str(checkpoint), kind=kind,
                                        projection="sjlt", dim=args.dim, seed=seed, output_dtype="float32", **common))
            print(f"features {split}, projection seed {seed}: {time.perf_counter() - started:.0f} s (0 if cached)",
                  flush=True)
            paths[split if seed == 0 else f"{split}-seed{seed}"] = out
    return paths


def data_tokenizer(files: list[Path], vocab: int = 2048):
    """A byte-level BPE of `vocab` tokens trained on the data's own text (as tests/tiny.py builds its own, with its
    special tokens and ChatML template): the demo questions take ~40 tokens instead of ~100."""
    from tiny import CHATML_TEMPLATE, SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for f in files for line in f.read_text().splitlines() if line.strip()
             for m in json.loads(line)["messages"]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                                           show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def write_store(source: Path, out: Path, kind: str, block: int = 4096) -> Path:
    """The float32 features of `source` written into a `kind` store in `out`, through FeatureStore."""
    from poise.config import FeaturesConfig
    from poise.features.store import FeatureStore, read_features
    from poise.provenance import open_folder

    reader, ids, info = read_features(source)
    config = FeaturesConfig(data=[str(source)], out=str(out), output_dtype=kind, overwrite=True)
    opened = open_folder(out, "features", config, extra={"from": str(source)})
    if opened.complete:
        return out
    store = FeatureStore.open(opened.folder, info["settings"], ids, reader.shape[1], dtype=kind)
    starts = range(0, len(reader), block)
    for k, start in enumerate(starts):
        stop = min(len(reader), start + block)
        store.write_batch(k, np.arange(start, stop), reader.rows(start, stop))
    assert store.finish(len(starts))
    return out


def disk_bytes_per_example(folder: Path) -> float:
    """Bytes of features.npy (+ scales.npy) per row, without the .npy headers."""
    total, rows = 0, None
    for name in ("features.npy", "scales.npy"):
        if (folder / name).exists():
            array = np.load(folder / name, mmap_mode="r")
            total, rows = total + array.nbytes, array.shape[0]
    return total / rows


def attribute(train: Path, val: Path, out: Path):
    from poise.attribution import compute_attribution
    from poise.config import AttributeConfig
    from poise.matrix import load_attribution

    started = time.perf_counter()
    compute_attribution(AttributeConfig(train=[str(train)], val=[str(val)], out=str(out), overwrite=True))
    return load_attribution(out), time.perf_counter() - started


def picks(matrix) -> dict[tuple[str, float], set[int]]:
    import warnings

    from poise.selection import select

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in METHODS:
            for budget in (0.05, 0.15):
                out[(method, budget)] = set(select(matrix, method, budget).indices.tolist())
    return out


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/poise-bench-store", help="folder for data, model, features")
    parser.add_argument("--n", type=int, default=20000, help="pool rows (default 20000)")
    parser.add_argument("--val-per-task", type=int, default=16, help="validation rows per capability")
    parser.add_argument("--dim", type=int, default=8192, help="projection dimension")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2, help="layers of the tiny Llama (57,344 LoRA parameters each)")
    parser.add_argument("--markdown", help="also write the results table here")
    parser.add_argument("--no-seed-reference", dest="seed_reference", action="store_false",
                        help="skip the float32 features of a second projection seed (a second features run)")
    args = parser.parse_args(argv)

    paths = build(args)
    work = paths["root"] / f"stores-d{args.dim}"
    matrices, seconds = {}, {}
    for kind in KINDS:
        train = paths["train"] if kind == "float32" else write_store(paths["train"], work / kind / "train", kind)
        val = paths["val"] if kind == "float32" else write_store(paths["val"], work / kind / "val", kind)
        paths[f"train-{kind}"], paths[f"val-{kind}"] = train, val
    combos = [(k, k) for k in KINDS] + list(MIXED)
    if args.seed_reference:  # float32 features of another sketch: the noise the projection itself brings
        combos.append(("seed1", "seed1"))
    for tk, vk in combos:
        matrices[(tk, vk)], seconds[(tk, vk)] = attribute(paths[f"train-{tk}"], paths[f"val-{vk}"],
                                                         work / f"attribution-{tk}-{vk}")
    reference = np.asarray(matrices[("float32", "float32")].scores, dtype=np.float64)
    spread = float(reference.std())
    chosen = {combo: picks(m) for combo, m in matrices.items()}
    n, v = reference.shape
    lines = [f"N = {n} pool rows, V = {v} validation rows ({len(matrices[('float32', 'float32')].task_names)} tasks), "
             f"d = {args.dim}, one checkpoint; std of A_float32's entries {spread:.4g}", "",
             "| store (train + val) | bytes / example / checkpoint | max abs(A - A_float32) | "
             "max abs(A - A_float32) / std(A) | "
             + " | ".join(f"Jaccard {m} {int(b * 100)}%" for m in METHODS for b in (0.05, 0.15))
             + " | attribute s |",
             "|---|---:|---:|---:|" + "---:|" * (2 * len(METHODS)) + "---:|"]
    for tk, vk in combos:
        scores = np.asarray(matrices[(tk, vk)].scores, dtype=np.float64)
        diff = float(np.abs(scores - reference).max())
        name = tk if tk == vk else f"train {tk} + val {vk}"
        name = "float32, projection seed 1 (sketch noise)" if tk == "seed1" else name
        size = disk_bytes_per_example(paths[f"train-{tk}"])
        overlaps = " | ".join(f"{jaccard(chosen[(tk, vk)][key], chosen[('float32', 'float32')][key]):.3f}"
                              for key in ((m, b) for m in METHODS for b in (0.05, 0.15)))
        lines.append(f"| {name} | {size:,.0f} | {diff:.2e} | {diff / spread:.3f} | {overlaps} | "
                     f"{seconds[(tk, vk)]:.1f} |")
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    lines += ["", f"Command: `{command}`"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
