"""The feature store: one preallocated (N x d) `.npy` memmap, row ids, settings, and resumable progress.

Layout of a features folder:
  features.npy        (N, d) float32 or float16, rows in input order (created once, by rank 0)
  ids.jsonl           one {"id", "task"} per row
  info.json           what the features are (kind, model, checkpoint, projector; attribute checks them)
  progress/rank-R.log the batches rank R has finished, one id per line

A batch is recorded in its rank's log only after its rows are written and flushed to disk, so a killed
run restarts where it stopped; recomputed batches are identical, so the finished file is the same byte
for byte. Ranks write disjoint rows of the same file and never need to talk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from poise import distributed
from poise.errors import PoiseError
from poise.faults import maybe_kill
from poise.files import FEATURES_FILE, IDS_FILE, PROGRESS_DIR
from poise.files import FEATURES_INFO_FILE as INFO_FILE
from poise.io import atomic_write_json, atomic_write_lines, read_json
from poise.provenance import mark_complete


class FeatureStore:
    """Rows of per-example features on disk, written by one or many ranks, resumable."""

    def __init__(self, folder: Path, features: np.memmap, info: dict[str, Any]):
        self.folder, self.features, self.info = folder, features, info
        self._log = None

    # ------------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls, folder: str | os.PathLike, settings: dict[str, Any], ids: list[dict[str, Any]], dim: int,
        dtype: str = "float32", resume: bool = False,
    ) -> FeatureStore:
        """Create the store in `folder` (rank 0) or, with `resume`, reopen the one there; every rank returns a
        writable store. The folder has been opened by poise.provenance, which refuses other settings; `settings`
        is what the features are (kind, model, checkpoint, projection ...), kept in info.json for attribution."""
        folder = Path(folder)
        info = {"settings": settings, "n_rows": len(ids), "dim": dim, "dtype": dtype}
        if distributed.is_main():
            existing = folder / INFO_FILE
            if not (resume and existing.exists() and (folder / FEATURES_FILE).exists()):
                for log in (folder / PROGRESS_DIR).glob("*.log"):
                    log.unlink()
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{FEATURES_FILE}.tmp"
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(len(ids), dim)).flush()
                os.replace(tmp, folder / FEATURES_FILE)
                atomic_write_lines(folder / IDS_FILE, (json.dumps(row) for row in ids))
                atomic_write_json(folder / INFO_FILE, {**info, "complete": False})
            (folder / PROGRESS_DIR).mkdir(exist_ok=True)
        distributed.barrier()
        features = np.load(folder / FEATURES_FILE, mmap_mode="r+")
        if features.shape != (len(ids), dim):
            raise PoiseError(f"{folder}/{FEATURES_FILE}: shape {features.shape}, expected {(len(ids), dim)}")
        return cls(folder, features, info)

    # ------------------------------------------------------------------------------ progress
    def done_batches(self) -> set[int]:
        """Batches finished by any rank (a torn last line from a kill is ignored)."""
        done: set[int] = set()
        for log in (self.folder / PROGRESS_DIR).glob("rank-*.log"):
            for line in log.read_text().splitlines():
                if line.strip().isdigit():
                    done.add(int(line))
        return done

    def write_batch(self, batch_id: int, rows: np.ndarray, values: np.ndarray) -> None:
        """Write rows, flush them to disk, then record the batch as done."""
        self.features[rows] = values.astype(self.features.dtype, copy=False)
        self.features.flush()
        maybe_kill("writes")  # tests: POISE_KILL_AT=writes:n dies here, the n-th batch flushed but not logged
        if self._log is None:
            self._log = open(self.folder / PROGRESS_DIR / f"rank-{distributed.rank()}.log", "a")  # noqa: SIM115
        self._log.write(f"{batch_id}\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def finish(self, n_batches: int) -> bool:
        """After all ranks are done (barrier), rank 0 marks the store complete. Returns completeness."""
        if self._log is not None:
            self._log.close()
            self._log = None
        distributed.barrier()
        complete = len(self.done_batches()) == n_batches
        if complete and distributed.is_main():
            atomic_write_json(self.folder / INFO_FILE, {**self.info, "complete": True})
            mark_complete(self.folder, rows=int(self.features.shape[0]), dim=int(self.features.shape[1]))
        distributed.barrier()
        return complete


def read_features(folder: str | os.PathLike) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """(features memmap, ids, info) of a finished features folder."""
    folder = Path(folder)
    if not (folder / INFO_FILE).exists():
        raise PoiseError(f"{folder}: not a poise features folder (no {INFO_FILE})")
    info = read_json(folder / INFO_FILE)
    if not info.get("complete"):
        raise PoiseError(f"{folder}: features are incomplete (the run was interrupted); rerun the same command")
    features = np.load(folder / FEATURES_FILE, mmap_mode="r", allow_pickle=False)
    ids = [json.loads(line) for line in (folder / IDS_FILE).read_text().splitlines() if line.strip()]
    if features.shape[0] != len(ids):
        raise PoiseError(f"{folder}: {features.shape[0]} feature rows but {len(ids)} ids")
    return features, ids, info
