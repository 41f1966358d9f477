"""`poise attribute`: train and validation features of each checkpoint -> the attribution matrix (docs/design.md §2.4).

A = sum_k w_k cos(train_k, val_k), streamed over chunks of training rows into a folder that `poise.matrix`
reads (`scores.npy`, `columns.jsonl`, `rows.jsonl`, `info.json`); the weights default to each checkpoint's
mean learning rate (LESS), normalised to sum 1. Feature stores of any kind (float32, float16, int8, 1bit) are
dequantised one chunk of training rows at a time; train and validation stores may be of different kinds (the
cosine takes unit rows of whatever each store reads back), but must share model, checkpoint and projector.
With `--rds` the features are representations and the matrix is of kind `rds`, or `rds+` when they were pooled
as RDS+ pools them (`--pooling weighted-mean`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from poise.checkpoint import lr_mean
from poise.config import validate
from poise.errors import PoiseError, warn
from poise.files import ATTRIBUTION_INFO_FILE as INFO_FILE
from poise.files import COLUMNS_FILE, ROWS_FILE, SCORES_FILE
from poise.io import atomic_write_json, atomic_write_lines
from poise.progress import note
from poise.provenance import mark_complete, open_folder


# ------------------------------------------------------------------------------- features -> A
def _checkpoint_lr(info: dict) -> float | None:
    checkpoint = (info.get("settings") or {}).get("checkpoint")
    return lr_mean(checkpoint) if checkpoint else None


def _check_lr_weights(lrs: list[float], checkpoints: list[str]) -> None:
    """Explain a checkpoint whose mean learning rate (its default weight) is zero or not a valid number."""
    bad = [k for k, lr in enumerate(lrs) if not (math.isfinite(lr) and lr >= 0)]
    if bad:
        raise PoiseError(f"{checkpoints[bad[0]]}/checkpoint.json: lr_mean is {lrs[bad[0]]!r}, not a non-negative "
                         "number; fix it or pass --weights")
    zero = [k for k, lr in enumerate(lrs) if lr == 0]
    if not zero:
        return
    names = ", ".join(checkpoints[k] for k in zero)
    why = ("its epoch trained with a mean learning rate of 0 (e.g. a warmup whose epoch was a single optimizer step "
           "at the start of the learning-rate warm-up)")
    if len(zero) == len(lrs):
        raise PoiseError(f"every checkpoint has weight 0: {why}; warm up on more examples (poise warmup --examples/"
                         "--fraction, or a smaller --batch-size) or pass --weights 1,...")
    warn(f"checkpoint {names} gets weight 0 and its features count for nothing: {why}; drop it from --train/--val, "
         "or pass --weights")


def _same(key: str, a: dict, b: dict) -> bool:
    return (a.get("settings") or {}).get(key) == (b.get("settings") or {}).get(key)


def compute_attribution(config: Any, progress=None) -> Path:
    """A = sum_k w_k cos(train_k, val_k), streamed over chunks of training rows into `config.out`.

    Weights default to each checkpoint's mean learning rate (LESS), normalised to sum 1. Refuses to
    combine features from different projectors, dimensions, seeds, models or data orders; combines stores of
    different kinds (e.g. 1bit train rows with float32 validation rows).
    """
    import json

    from poise.features.store import read_features

    validate(config)
    if len(config.train) != len(config.val):
        raise PoiseError(f"{len(config.train)} train folders but {len(config.val)} val folders; give one of each "
                         "per checkpoint, in the same order")
    trains = [read_features(p) for p in config.train]
    vals = [read_features(p) for p in config.val]
    t0, v0 = trains[0], vals[0]
    for (tf, tids, tinfo), (vf, vids, vinfo), tpath, vpath in zip(trains, vals, config.train, config.val, strict=True):
        kinds = (tinfo["settings"]["kind"], vinfo["settings"]["kind"])
        if config.rds and kinds != ("reps", "reps"):
            raise PoiseError(f"AttributeConfig.rds needs representation features (kind reps); {tpath}, {vpath} "
                             f"are {kinds}")
        if not config.rds and "reps" in kinds:
            raise PoiseError(f"{tpath if kinds[0] == 'reps' else vpath}: representation features; pass --rds")
        for key in ("model", "checkpoint", "projection", "seed", "parameters", "pooling"):
            if not _same(key, tinfo, vinfo):
                raise PoiseError(f"{tpath} and {vpath}: features made with different {key}; train and validation "
                                 "features of a checkpoint must share model, checkpoint and projector")
        if tf.shape[1] != vf.shape[1]:
            raise PoiseError(f"{tpath} ({tf.shape[1]} dims) and {vpath} ({vf.shape[1]} dims) differ in dimension")
        if tids != t0[1]:
            raise PoiseError(f"{tpath}: its rows differ from {config.train[0]} (another data set or order)")
        if vids != v0[1]:
            raise PoiseError(f"{vpath}: its rows differ from {config.val[0]} (another data set or order)")
        for key in ("projection", "seed", "parameters", "model", "pooling"):
            if not _same(key, tinfo, t0[2]):
                raise PoiseError(f"{tpath}: made with a different {key} than {config.train[0]}")
    missing_task = [row["id"] for row in v0[1] if not row.get("task")]
    if missing_task:
        raise PoiseError(f"{config.val[0]}: validation example {missing_task[0]!r} has no task; give the features "
                         "stage --task, a 'task' field, or one file per task")
    if config.weights:
        if len(config.weights) != len(trains):
            raise PoiseError(f"{len(config.weights)} weights for {len(trains)} checkpoints")
        try:
            weights = [float(w) for w in config.weights]
        except ValueError:
            raise PoiseError(f"AttributeConfig.weights must be numbers, got {config.weights}") from None
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
            raise PoiseError(f"AttributeConfig.weights must be non-negative with a positive sum, got {config.weights}")
    else:
        lrs = [_checkpoint_lr(info) for _, _, info in trains]
        weights = [1.0] * len(trains) if any(lr is None for lr in lrs) else [float(lr) for lr in lrs]  # type: ignore
        _check_lr_weights(weights, [str((info.get("settings") or {}).get("checkpoint")) for _, _, info in trains])
    total = sum(weights)
    weights = [w / total for w in weights]

    kind = "influence"
    if config.rds:  # rds+: the representations were pooled as RDS+ pools them (position-weighted mean)
        kind = "rds+" if (t0[2].get("settings") or {}).get("pooling") == "weighted-mean" else "rds"
        adapted = (t0[2].get("settings") or {}).get("checkpoint")
        if kind == "rds+" and adapted:
            warn(f"{config.train[0]}: RDS+ representations from the adapted checkpoint {adapted}; the paper's RDS+ "
                 "takes them from the base model (features without --checkpoint)")
    opened = open_folder(config.out, "attribute", config, extra={"normalised_weights": weights})
    out = opened.folder
    if opened.complete:
        note(f"attribute: {out} is already complete (the same features and weights); nothing to do")
        return out
    n, m = t0[0].shape[0], v0[0].shape[0]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{SCORES_FILE}.tmp"
    val_unit = [_unit_rows(vf.rows(0, m)) for vf, _, _ in vals]  # (M, d) each: the validation set is small
    # written a block at a time with plain file writes: a writable memory map would keep every written page
    # resident in this process (4 GB at 1M x 1,000), file writes leave them to the page cache
    with open(tmp, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                      "fortran_order": False, "shape": (n, m)})
        for start in range(0, n, config.chunk_rows):
            stop = min(n, start + config.chunk_rows)
            block = np.zeros((stop - start, m), dtype=np.float32)
            for w, (tf, _, _), vu in zip(weights, trains, val_unit, strict=True):
                block += np.float32(w) * (_unit_rows(tf.rows(start, stop)) @ vu.T)  # one block dequantised at a time
            handle.write(np.ascontiguousarray(block).tobytes())
            if progress:
                progress(stop, n)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / SCORES_FILE)
    atomic_write_lines(out / COLUMNS_FILE, (json.dumps({"id": r["id"], "task": r["task"]}) for r in v0[1]))
    atomic_write_lines(out / ROWS_FILE, (json.dumps({"id": r["id"]}) for r in t0[1]))
    atomic_write_json(out / INFO_FILE, {"n_rows": n, "n_columns": m, "kind": kind, "weights": weights})
    counts: dict[str, int] = {}
    for row in v0[1]:
        counts[row["task"]] = counts.get(row["task"], 0) + 1
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name}={k}" for name, k in counts.items())
        warn(f"{config.val[0]}: tasks have unequal numbers of validation examples ({listing}); task-max uses the "
             "per-task mean (the paper's per-task sum would favour the larger tasks)")
    mark_complete(out)
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)
