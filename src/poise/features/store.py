"""The feature store: one preallocated `.npy` memmap of rows, row ids, settings, and resumable progress.

Layout of a features folder (docs/design.md §2.3, docs/formats.md):
  features.npy        N rows in input order (created once, by rank 0), stored as one of
                        float32  (N, d) float32                        4·d bytes a row
                        float16  (N, d) float16 (the default, LESS)    2·d bytes a row
                        int8     (N, d) int8, plus scales.npy           d + 4 bytes a row
                        1bit     (N, ceil(d/8)) uint8, np.packbits of the signs   d/8 bytes a row
  scales.npy          int8 only: (N,) float32, row i = scale_i · features[i]
  ids.jsonl           one {"id", "task"} per row
  info.json           what the features are (settings: kind, model, checkpoint, projector; attribute checks
                      them) and how they are stored ("store", "bytes_per_example")
  progress/rank-R.log the batches rank R has finished, one id per line

Quantisation happens in `write_batch`; `read_features` gives a reader that dequantises a block of rows at a
time to float32 (`rows(start, stop)`), so nothing ever holds a whole store in float32.
- int8: symmetric per row, scale = max|x| / 127, q = round(x / scale): |x - q·scale| <= scale / 2.
- 1bit: the sign of each coordinate (zero counts as +), read back as ±1/sqrt(d), the unit vector of the
  signs: every row has norm 1, so the cosine is the dot product and no scale is needed (any per-row scale
  would cancel in the cosine). For sketched gradients the cosine of two sign vectors estimates
  1 - 2·angle/π (Charikar's SimHash), a monotone function of the true cosine; QLESS ranks this way.

A batch is recorded in its rank's log only after its rows (and scales) are written and flushed to disk, so a
killed run restarts where it stopped; recomputed batches are identical, so the finished files are the same
byte for byte. Ranks write disjoint rows of the same files and never need to talk.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from poise import distributed
from poise.errors import PoiseError
from poise.faults import maybe_kill
from poise.files import FEATURES_FILE, IDS_FILE, PROGRESS_DIR, SCALES_FILE
from poise.files import FEATURES_INFO_FILE as INFO_FILE
from poise.io import atomic_write_json, atomic_write_lines, read_json
from poise.options import STORE_DTYPES
from poise.provenance import mark_complete

#: The largest magnitude int8 rows use (symmetric: -127..127, so -x quantises to -q).
INT8_LEVELS = 127
FLOAT16_MAX = float(np.finfo(np.float16).max)
_STORED = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "1bit": np.uint8}


# ------------------------------------------------------------------------------ the formats
def _check_kind(kind: str) -> str:
    if kind not in STORE_DTYPES:
        raise PoiseError(f"unknown feature store {kind!r}; expected one of {', '.join(STORE_DTYPES)}")
    return kind


def stored_dtype(kind: str) -> np.dtype:
    """The dtype of features.npy for a store kind."""
    return np.dtype(_STORED[_check_kind(kind)])


def stored_width(kind: str, dim: int) -> int:
    """Columns of features.npy for rows of `dim` coordinates."""
    return (dim + 7) // 8 if _check_kind(kind) == "1bit" else dim


def bytes_per_example(kind: str, dim: int) -> int:
    """Bytes a row takes on disk (features.npy plus, for int8, its scale)."""
    width = stored_width(kind, dim) * stored_dtype(kind).itemsize
    return width + (4 if kind == "int8" else 0)


def quantize(kind: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(b, d) float32 rows -> (stored rows, int8 scales or None). Refuses values the kind cannot represent."""
    values = np.asarray(values, dtype=np.float32)
    if kind == "float32":
        return values, None
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise PoiseError(f"non-finite feature values in row {row} of a batch; a {kind} store cannot keep them "
                         "(a float32 store would, and `poise attribute` would then refuse the matrix)")
    if kind == "float16":
        if np.abs(values).max(initial=0.0) > FLOAT16_MAX:
            raise PoiseError(f"feature values up to {np.abs(values).max():.3g} exceed float16's range "
                             f"({FLOAT16_MAX:g}); store them as float32 or int8 (--output-dtype)")
        return values.astype(np.float16), None
    if kind == "int8":
        wide = values.astype(np.float64)  # exact; the arithmetic below is then the same on every machine
        scales = (np.abs(wide).max(axis=1, initial=0.0) / INT8_LEVELS).astype(np.float32)  # (b,)
        divisor = np.where(scales == 0, 1.0, scales.astype(np.float64))[:, None]
        q = np.clip(np.rint(wide / divisor), -INT8_LEVELS, INT8_LEVELS)
        q[scales == 0] = 0  # a zero row (or one too small for a float32 scale) reads back as zeros
        return q.astype(np.int8), scales
    return np.packbits(values >= 0, axis=1), None  # 1bit: (b, ceil(d/8)), the first coordinate in the top bit


def dequantize(kind: str, stored: np.ndarray, scales: np.ndarray | None, dim: int) -> np.ndarray:
    """Stored rows (and int8 scales) -> (b, d) float32 (see the module docstring for each kind)."""
    if kind in ("float32", "float16"):
        return np.asarray(stored, dtype=np.float32)
    if kind == "int8":
        out = np.asarray(stored, dtype=np.float32)
        out *= np.asarray(scales, dtype=np.float32)[:, None]
        return out
    bits = np.unpackbits(np.asarray(stored, dtype=np.uint8), axis=1, count=dim)  # (b, d) of 0/1
    c = np.float32(1.0 / math.sqrt(dim))
    return np.where(bits.astype(bool), c, -c)


# -------------------------------------------------------------------------------- writing
class FeatureStore:
    """Rows of per-example features on disk, written by one or many ranks, resumable."""

    def __init__(self, folder: Path, features: RowFile, scales: RowFile | None, info: dict[str, Any]):
        self.folder, self.features, self.scales, self.info = folder, features, scales, info
        self.kind, self.dim = str(info["store"]), int(info["dim"])
        self._log = None

    # ------------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls, folder: str | os.PathLike, settings: dict[str, Any], ids: list[dict[str, Any]], dim: int,
        dtype: str = "float16", resume: bool = False,
    ) -> FeatureStore:
        """Create the store in `folder` (rank 0) or, with `resume`, reopen the one there; every rank returns a
        writable store. `dtype` is the store kind (float32, float16, int8, 1bit). The folder has been opened by
        poise.provenance, which refuses other settings; `settings` is what the features are (kind, model,
        checkpoint, projection ...), kept in info.json for attribution."""
        folder, kind = Path(folder), _check_kind(dtype)
        n, width = len(ids), stored_width(kind, dim)
        info = {"settings": settings, "n_rows": n, "dim": dim, "store": kind, "dtype": stored_dtype(kind).name,
                "bytes_per_example": bytes_per_example(kind, dim)}
        files = [FEATURES_FILE] + ([SCALES_FILE] if kind == "int8" else [])
        if distributed.is_main():
            present = (folder / INFO_FILE).exists() and all((folder / f).exists() for f in files)
            if not (resume and present):
                for log in (folder / PROGRESS_DIR).glob("*.log"):
                    log.unlink()
                folder.mkdir(parents=True, exist_ok=True)
                (folder / SCALES_FILE).unlink(missing_ok=True)  # left by a store of another kind
                _create(folder / FEATURES_FILE, stored_dtype(kind), (n, width))
                if kind == "int8":
                    _create(folder / SCALES_FILE, np.dtype(np.float32), (n,))
                atomic_write_lines(folder / IDS_FILE, (json.dumps(row) for row in ids))
                atomic_write_json(folder / INFO_FILE, {**info, "complete": False})
            (folder / PROGRESS_DIR).mkdir(exist_ok=True)
        distributed.barrier()
        features = RowFile(folder / FEATURES_FILE, writable=True)
        if features.shape != (n, width) or features.dtype != stored_dtype(kind):
            raise PoiseError(f"{folder}/{FEATURES_FILE}: {features.dtype} {features.shape}, expected "
                             f"{stored_dtype(kind)} {(n, width)} for a {kind} store")
        scales = RowFile(folder / SCALES_FILE, writable=True) if kind == "int8" else None
        if scales is not None and (scales.shape != (n,) or scales.dtype != np.float32):
            raise PoiseError(f"{folder}/{SCALES_FILE}: {scales.dtype} {scales.shape}, expected float32 {(n,)}")
        return cls(folder, features, scales, info)

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
        """Quantise float32 `values` (len(rows), d), write them (and their scales), flush both to disk, then
        record the batch as done."""
        if values.shape[1:] != (self.dim,):
            raise PoiseError(f"{self.folder}: rows of {values.shape[1:]} values for a store of dimension {self.dim}")
        try:
            stored, scales = quantize(self.kind, values)
        except PoiseError as exc:
            raise PoiseError(f"{self.folder}: {exc}") from None
        self.features.write(rows, stored)
        if self.scales is not None:
            self.scales.write(rows, scales)
            self.scales.flush()
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
            mark_complete(self.folder, rows=int(self.features.shape[0]), dim=self.dim)
        distributed.barrier()
        return complete


class RowFile:
    """The rows of a `.npy` file, written and read with plain file I/O at their offsets. A memory map would keep
    every page it wrote or read resident in the process (the whole store, by the end of a pass), so a process's
    memory would grow with the pool; file I/O leaves the pages to the page cache."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        header = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only: no page of data is read
        self.path, self.shape, self.dtype, self.offset = path, header.shape, header.dtype, int(header.offset)
        del header
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)

    def __len__(self) -> int:
        return int(self.shape[0])

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype).reshape(len(rows), -1)
        for row, value in zip(np.asarray(rows).tolist(), values, strict=True):
            os.pwrite(self._fd, value.tobytes(), self.offset + row * self.row_bytes)

    def flush(self) -> None:
        os.fsync(self._fd)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as an array (a copy in this process's memory, of those rows only)."""
        stop = min(stop, len(self))
        data = os.pread(self._fd, max(0, stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((max(0, stop - start), *self.shape[1:])).copy()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def _create(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """A zero-filled `.npy` of `shape`, in place under its final name only once it exists whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
    os.replace(tmp, path)


# -------------------------------------------------------------------------------- reading
class StoredFeatures:
    """A finished store, read a block of rows at a time as float32 (the whole store is never dequantised)."""

    def __init__(self, kind: str, stored: RowFile | np.ndarray, scales: RowFile | np.ndarray | None, dim: int,
                 source: str = ""):
        self.kind, self.stored, self.scales, self.dim, self.source = kind, stored, scales, dim, source

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, d): the features' shape, whatever the stored form."""
        return int(self.stored.shape[0]), self.dim

    def __len__(self) -> int:
        return int(self.stored.shape[0])

    @property
    def bytes_per_example(self) -> int:
        return bytes_per_example(self.kind, self.dim)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) dequantised: (stop - start, d) float32."""
        scales = None if self.scales is None else _read(self.scales, start, stop)
        return dequantize(self.kind, _read(self.stored, start, stop), scales, self.dim)


def _read(rows: RowFile | np.ndarray, start: int, stop: int) -> np.ndarray:
    return rows.read(start, stop) if isinstance(rows, RowFile) else rows[start:stop]


def read_features(folder: str | os.PathLike) -> tuple[StoredFeatures, list[dict[str, Any]], dict[str, Any]]:
    """(reader, ids, info) of a finished features folder."""
    folder = Path(folder)
    if not (folder / INFO_FILE).exists():
        raise PoiseError(f"{folder}: not a poise features folder (no {INFO_FILE})")
    info = read_json(folder / INFO_FILE)
    if not info.get("complete"):
        raise PoiseError(f"{folder}: features are incomplete (the run was interrupted); rerun the same command")
    kind = str(info.get("store") or info.get("dtype") or "float32")  # folders from before int8/1bit: "dtype"
    if kind not in STORE_DTYPES:
        raise PoiseError(f"{folder}/{INFO_FILE}: unknown feature store {kind!r}")
    stored = RowFile(folder / FEATURES_FILE)
    ids = [json.loads(line) for line in (folder / IDS_FILE).read_text().splitlines() if line.strip()]
    dim = int(info.get("dim", stored.shape[1]))
    if stored.shape != (len(ids), stored_width(kind, dim)) or stored.dtype != stored_dtype(kind):
        raise PoiseError(f"{folder}: {FEATURES_FILE} is {stored.dtype} {stored.shape}, but {len(ids)} ids and a "
                         f"{kind} store of dimension {dim} need {stored_dtype(kind)} "
                         f"{(len(ids), stored_width(kind, dim))}")
    scales = None
    if kind == "int8":
        if not (folder / SCALES_FILE).exists():
            raise PoiseError(f"{folder}: an int8 store without {SCALES_FILE}")
        scales = RowFile(folder / SCALES_FILE)
        if scales.shape != (len(ids),) or scales.dtype != np.float32:
            raise PoiseError(f"{folder}/{SCALES_FILE}: {scales.dtype} {scales.shape}, expected float32 "
                             f"({len(ids)},)")
    return StoredFeatures(kind, stored, scales, dim, str(folder)), ids, info
