"""The attribution matrix object and its readers (numpy only): influence of every training example on every
validation example.

`A[i, j]` is the influence of training row i on validation column j (docs/design.md §2.4). Rows are the
pool in its own order; every column carries a validation id and the task it belongs to. Selection,
analysis and report only ever see this object, so they work on a matrix made by poise or by anything
else (`.npy`, `.safetensors`, weights-only torch `.pt`).

On disk a poise attribution folder holds `scores.npy` (float32 or float16, N x V, memory-mapped on load),
`columns.jsonl` (`{"id", "task"}` per column), `rows.jsonl` (`{"id"}` per row) and `info.json`.

Memory: the scores stay as stored (float32 or float16, in RAM or memory-mapped) and are read in row blocks
(`read_block`, `iter_chunks`) or by rows (`read_rows`) as float32 - exact, float16 widens without rounding -
so a matrix larger than RAM is never loaded whole. After a block of a read-only memory map has been read its
pages are handed back (madvise), so a streaming pass holds about one block of the file in the process's
resident memory rather than all of it. A matrix restricted to some columns (`select_columns`) of a
memory-mapped one reads through the column index instead of copying them.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poise.errors import PoiseError
from poise.files import ATTRIBUTION_INFO_FILE as INFO_FILE
from poise.files import COLUMNS_FILE, ROWS_FILE, SCORES_FILE
from poise.io import atomic_write_json, atomic_write_lines, read_json, read_jsonl
from poise.options import MATRIX_KINDS

#: Rows per chunk of the column statistics; their float64 sums are accumulated chunk by chunk, so this fixes
#: their bits (and the most rows of any streamed block).
CHUNK_ROWS = 16384
#: At most this many values (rows x columns) in one streamed block: 16 MiB as float32, whatever V is.
BLOCK_VALUES = 1 << 22
#: Scattered rows of a memory map are read this many at a time, its pages handed back after each batch.
ROW_BATCH = 128
#: Pages are handed back only for maps at least this large; a smaller one stays resident (at most this much),
#: which spares re-reading it on every pass.
RELEASE_BYTES = 256 * 2**20
#: Score dtypes kept as stored (and memory-mapped from .npy); any other real dtype is converted to float32.
SCORE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def block_rows(n_columns: int) -> int:
    """Rows per streamed block for a matrix of `n_columns` columns: at most CHUNK_ROWS rows and BLOCK_VALUES
    values."""
    return max(1, min(CHUNK_ROWS, BLOCK_VALUES // max(1, n_columns)))


class _Pages:
    """The read-only memory map under a scores array, to hand back the pages a streaming pass has read.

    Pages of a file mapping that were read count in the process's resident memory until the kernel needs
    them back; `release` drops them from this mapping (MADV_DONTNEED; the file's page cache keeps them), so
    a pass over a 2 GB memory-mapped matrix holds one block, not 2 GB. A writable or copy-on-write mapping is
    left alone (dropping its pages could lose writes); so is anything that is not a memory map, and a map
    smaller than RELEASE_BYTES (it may stay resident: re-reading it on every pass would cost more).
    """

    def __init__(self, array: np.ndarray):
        self.map: mmap.mmap | None = None
        self.advise = True  # False once madvise failed (a platform without it)
        self.offset = 0
        self.row_bytes = 0
        if array.flags.writeable or not array.flags.c_contiguous or not hasattr(mmap, "MADV_DONTNEED"):
            return
        base = array.base
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "base", None)
        if base is None:
            return
        try:
            start = np.frombuffer(base, dtype=np.uint8).ctypes.data
        except (TypeError, ValueError):  # a closed map
            return
        self.map = base
        self.offset = array.ctypes.data - start
        self.row_bytes = int(array.strides[0]) if array.ndim == 2 else 0

    @property
    def mapped(self) -> bool:
        return self.map is not None

    @property
    def releasing(self) -> bool:
        """Whether pages are handed back: a read-only map of at least RELEASE_BYTES."""
        return self.map is not None and self.advise and len(self.map) >= RELEASE_BYTES

    def release(self, start_row: int = 0, stop_row: int | None = None) -> None:
        """Drop the pages of rows [start_row, stop_row) (all rows by default) from this process's memory."""
        if not self.releasing:
            return
        size = len(self.map)
        low = self.offset + start_row * self.row_bytes
        high = size if stop_row is None else min(size, self.offset + stop_row * self.row_bytes)
        low = max(0, low - low % mmap.PAGESIZE)
        if high > low:
            try:
                self.map.madvise(mmap.MADV_DONTNEED, low, high - low)
            except (OSError, ValueError):  # pragma: no cover - a platform without it
                self.advise = False


@dataclass
class ColumnStats:
    """Per-column mean and standard deviation over all rows (population std, ddof=0)."""

    mean: np.ndarray  # (V,) float64
    std: np.ndarray  # (V,) float64; 0 for a zero-variance column

    @property
    def zero_variance(self) -> np.ndarray:
        return self.std == 0.0


@dataclass
class AttributionMatrix:
    """Scores (N_train x N_val) with row ids and, per column, a validation id and its task."""

    scores: np.ndarray  # (N, V_stored) float32 or float16 as stored, possibly a read-only memmap
    column_ids: list[Any]
    tasks: list[str]
    row_ids: list[Any] | None = None  # None: the row index is the id
    kind: str | None = None  # "influence", "rds", "rds+" or None (unknown): poise.options.MATRIX_KINDS
    source: str | None = None  # where it was read from, for messages and provenance
    #: the stored columns this matrix is made of, in order (a view of a memory-mapped matrix, nothing copied);
    #: None: all of `scores`. Read the scores through read_block / read_rows / iter_chunks, which apply it.
    stored_columns: np.ndarray | None = None
    _stats: ColumnStats | None = field(default=None, repr=False, compare=False)
    _finite_checked: bool = field(default=False, repr=False, compare=False)
    _pages: _Pages | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------- shape
    @property
    def n_rows(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_columns(self) -> int:
        return int(self.scores.shape[1] if self.stored_columns is None else self.stored_columns.shape[0])

    @property
    def memory_mapped(self) -> bool:
        """Whether the scores are a read-only memory map (read in blocks, its pages handed back after each)."""
        return self._mapping().mapped

    @property
    def task_names(self) -> list[str]:
        """Tasks in order of first appearance among the columns."""
        return list(dict.fromkeys(self.tasks))

    @property
    def task_index(self) -> np.ndarray:
        """(V,) int: position of each column's task in `task_names`."""
        lookup = {name: k for k, name in enumerate(self.task_names)}
        return np.array([lookup[t] for t in self.tasks], dtype=np.int64)

    def task_columns(self) -> dict[str, np.ndarray]:
        index = self.task_index
        return {name: np.flatnonzero(index == k) for k, name in enumerate(self.task_names)}

    def row_id(self, row: int) -> Any:
        return row if self.row_ids is None else self.row_ids[row]

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        where = self.source or "scores"
        scores = self.scores
        if not isinstance(scores, np.ndarray):
            raise PoiseError(f"{where}: scores must be a numpy array, got {type(scores).__name__}")
        if scores.ndim != 2:
            raise PoiseError(
                f"{where}: scores must be 2-D (train rows x validation columns), got shape {tuple(scores.shape)}"
            )
        if scores.shape[0] == 0 or scores.shape[1] == 0:
            raise PoiseError(f"{where}: scores are empty, shape {tuple(scores.shape)}")
        if scores.dtype not in SCORE_DTYPES:
            raise PoiseError(f"{where}: scores must be float32 or float16 here, got {scores.dtype} (use as_scores())")
        if self.stored_columns is not None:
            self.stored_columns = np.asarray(self.stored_columns, dtype=np.int64)
            cols = self.stored_columns
            if cols.ndim != 1 or cols.size == 0 or cols.min() < 0 or cols.max() >= scores.shape[1]:
                raise PoiseError(f"{where}: stored_columns must index the {scores.shape[1]} stored columns")
        v = self.n_columns
        if len(self.column_ids) != v or len(self.tasks) != v:
            raise PoiseError(f"{where}: {len(self.tasks)} column labels for {v} score columns")
        for j, task in enumerate(self.tasks):
            if not isinstance(task, str) or not task.strip():
                raise PoiseError(f"{where}: column {j} has an empty or non-string task {task!r}")
        if self.row_ids is not None and len(self.row_ids) != scores.shape[0]:
            raise PoiseError(f"{where}: {len(self.row_ids)} row ids for {scores.shape[0]} score rows")
        if self.kind is not None and self.kind not in MATRIX_KINDS:
            raise PoiseError(f"{where}: unknown matrix kind {self.kind!r}; expected one of {MATRIX_KINDS}")
        if not self._finite_checked:
            _check_finite(scores, where, self._mapping())
            self._finite_checked = True

    def unequal_task_sizes(self) -> str | None:
        """"code=5, math=3" when tasks have unequal numbers of validation columns, else None.

        Said once where it matters: when the matrix is computed (`poise attribute`) and by task-max, whose
        per-task mean then differs from the paper's per-task sum; not on every load.
        """
        counts = {name: len(cols) for name, cols in self.task_columns().items()}
        if len(set(counts.values())) <= 1:
            return None
        return ", ".join(f"{name}={n}" for name, n in counts.items())

    # ------------------------------------------------------------------------------- streaming
    def _mapping(self) -> _Pages:
        if self._pages is None:
            self._pages = _Pages(self.scores)
        return self._pages

    def release_pages(self, start_row: int = 0, stop_row: int | None = None) -> None:
        """Hand back the pages of a memory-mapped matrix read so far (rows [start_row, stop_row)); else nothing."""
        self._mapping().release(start_row, stop_row)

    def _stored(self, columns: np.ndarray | Sequence[int] | None) -> np.ndarray | None:
        """Stored-column indices of the given columns of this matrix (None: all of them, in stored order)."""
        if columns is None:
            return self.stored_columns
        columns = np.asarray(columns, dtype=np.int64)
        return columns if self.stored_columns is None else self.stored_columns[columns]

    def read_block(self, start: int, stop: int, columns: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """float32 C-ordered (stop - start, V) block of rows [start, stop) (optionally only `columns`): a view of
        float32 scores, else a converted copy. Reading a memory map faults its pages in; `iter_chunks` hands them
        back."""
        part = self.scores[start:stop]
        stored = self._stored(columns)
        if stored is not None:
            part = part[:, stored]  # numpy may hand this back in Fortran order
        return np.ascontiguousarray(part, dtype=np.float32)  # C order: reductions then add in one order

    def read_rows(
        self, rows: np.ndarray | Sequence[int], columns: np.ndarray | Sequence[int] | None = None
    ) -> np.ndarray:
        """float32 (len(rows), V) copy of the given rows (optionally only `columns`), pages handed back after."""
        rows = np.asarray(rows, dtype=np.int64)
        stored = self._stored(columns)
        pages = self._mapping()
        if not pages.releasing:
            part = self.scores[rows]
            return np.ascontiguousarray(part if stored is None else part[:, stored], dtype=np.float32)
        # a read fault maps the pages around it too (fault-around): hand them back every few rows
        out = np.empty((rows.shape[0], self.n_columns if columns is None else len(stored)), dtype=np.float32)
        for start in range(0, rows.shape[0], ROW_BATCH):
            part = self.scores[rows[start : start + ROW_BATCH]]
            out[start : start + ROW_BATCH] = part if stored is None else part[:, stored]
            pages.release()
        return out

    def row(self, r: int) -> np.ndarray:
        """Row r as stored (float32 or float16, the matrix's columns only); a view when nothing is selected."""
        row = self.scores[r]
        return row if self.stored_columns is None else row[self.stored_columns]

    def column_stats(self) -> ColumnStats:
        """Mean and std (ddof=0) of every column over all rows, accumulated in float64.

        Two streaming passes over row chunks (mean, then squared deviations), so a memory-mapped
        matrix is never loaded whole. A column is zero-variance when all its values are equal.
        Chunks are CHUNK_ROWS rows whatever the number of columns (the chunking fixes the float64 sums).
        """
        if self._stats is None:
            pages = self._mapping()
            total = np.zeros(self.n_columns, dtype=np.float64)
            for start in range(0, self.n_rows, CHUNK_ROWS):
                total += self.read_block(start, start + CHUNK_ROWS).sum(axis=0, dtype=np.float64)
                pages.release(start, start + CHUNK_ROWS)
            mean = total / self.n_rows
            mean32 = mean.astype(np.float32)
            m2 = np.zeros(self.n_columns, dtype=np.float64)
            shift = np.zeros(self.n_columns, dtype=np.float64)
            for start in range(0, self.n_rows, CHUNK_ROWS):
                block = self.read_block(start, start + CHUNK_ROWS)
                # a converted or gathered block is ours to overwrite (one chunk-sized array the fewer)
                dev = np.subtract(block, mean32, out=block) if block.flags.owndata else block - mean32
                pages.release(start, start + CHUNK_ROWS)
                m2 += np.einsum("ij,ij->j", dev, dev, dtype=np.float64)
                shift += dev.sum(axis=0, dtype=np.float64)
            # every deviation is exactly 0 iff the column is constant (its float64 mean is exact then)
            constant = m2 == 0.0
            # deviations were taken from float32(mean); correct for that offset
            m2 = np.maximum(m2 - shift**2 / self.n_rows, 0.0)
            std = np.sqrt(m2 / self.n_rows)
            std[constant] = 0.0
            std[~constant & (std == 0.0)] = np.finfo(np.float64).tiny
            self._stats = ColumnStats(mean=mean, std=std)
        return self._stats

    def iter_chunks(
        self, normalized: bool = False, chunk_rows: int | None = None,
        columns: np.ndarray | Sequence[int] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, float32 block): the raw scores or the normalised A' (same bits as
        `normalized()`), optionally of some `columns` only. Blocks hold at most BLOCK_VALUES values unless
        `chunk_rows` says otherwise; a memory map's pages are handed back once the caller moves on.
        Reduce them with `dtype=np.float64` where precision matters."""
        stats = self.column_stats() if normalized else None
        if stats is not None and columns is not None:
            picked = np.asarray(columns, dtype=np.int64)
            stats = ColumnStats(mean=stats.mean[picked], std=stats.std[picked])
        step = block_rows(self.n_columns) if chunk_rows is None else max(1, int(chunk_rows))
        pages = self._mapping()
        for start in range(0, self.n_rows, step):
            block = self.read_block(start, start + step, columns)
            yield start, block if stats is None else normalize_block(block, stats)
            pages.release(start, start + step)

    def read_columns(self, columns: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 (N, len(columns)) of whole columns, from one streaming pass: a few columns of a memory-mapped
        matrix cost N x 4 bytes each, not the matrix."""
        columns = np.asarray(columns, dtype=np.int64)
        out = np.empty((self.n_rows, columns.shape[0]), dtype=np.float32)
        for start, block in self.iter_chunks(columns=columns):
            out[start : start + block.shape[0]] = block
        return out

    def normalized_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 normalised values of the given rows, bit-identical to `normalized()`."""
        return normalize_block(self.read_rows(rows), self.column_stats())

    def normalized(self) -> np.ndarray:
        """The whole column-normalised matrix A' = (A - mu_j) / sigma_j as float32 (in RAM)."""
        out = np.empty((self.n_rows, self.n_columns), dtype=np.float32)
        for start, block in self.iter_chunks(normalized=True):
            out[start : start + block.shape[0]] = block
        return out

    # -------------------------------------------------------------------------------- subsets
    def select_tasks(self, tasks: Sequence[str]) -> AttributionMatrix:
        """The matrix restricted to the columns of the given tasks (order of the matrix kept)."""
        known = self.task_names
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise PoiseError(f"unknown task {unknown[0]!r}; the matrix has tasks: {', '.join(known)}")
        return self.select_columns(np.flatnonzero(np.isin(np.array(self.tasks, dtype=object), list(tasks))))

    def select_columns(self, keep: np.ndarray | Sequence[int]) -> AttributionMatrix:
        """The matrix restricted to the given columns, in the given order.

        Scores in RAM are copied (as many bytes as the columns kept); a memory-mapped matrix gives a view that
        reads through the column index and copies nothing. Either way the column statistics are computed anew
        from the kept columns' blocks: numpy's float64 sums of a column can differ in the last bit with the
        width of the block it sits in, and a view must give the bits a copy gives.
        """
        keep = np.asarray(keep, dtype=np.int64)
        common = dict(column_ids=[self.column_ids[j] for j in keep], tasks=[self.tasks[j] for j in keep],
                      row_ids=self.row_ids, kind=self.kind, source=self.source, _finite_checked=True)
        if not self.memory_mapped:
            stored = self._stored(keep)
            return AttributionMatrix(scores=np.ascontiguousarray(self.scores[:, stored]), **common)
        return AttributionMatrix(scores=self.scores, stored_columns=self._stored(keep), **common)

    # -------------------------------------------------------------------------------------- I/O
    def save(self, folder: str | os.PathLike, info: dict | None = None) -> Path:
        """Write a poise attribution folder (scores.npy in the matrix's dtype, columns.jsonl, rows.jsonl,
        info.json)."""
        import json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SCORES_FILE}.tmp"
        if not self.memory_mapped and self.stored_columns is None:
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(self.scores), allow_pickle=False)
        else:  # block by block, written (not mapped: written pages of a map would stay resident), never whole
            header = {"descr": np.lib.format.dtype_to_descr(self.scores.dtype), "fortran_order": False,
                      "shape": (self.n_rows, self.n_columns)}
            step = block_rows(self.n_columns)
            with open(tmp, "wb") as handle:
                np.lib.format.write_array_header_1_0(handle, header)
                for start in range(0, self.n_rows, step):
                    part = self.scores[start : start + step]
                    part = part if self.stored_columns is None else part[:, self.stored_columns]
                    handle.write(np.ascontiguousarray(part).tobytes())
                    self.release_pages(start, start + step)
        os.replace(tmp, folder / SCORES_FILE)
        atomic_write_lines(
            folder / COLUMNS_FILE,
            (json.dumps({"id": c, "task": t}) for c, t in zip(self.column_ids, self.tasks, strict=True)),
        )
        ids = self.row_ids if self.row_ids is not None else range(self.n_rows)
        atomic_write_lines(folder / ROWS_FILE, (json.dumps({"id": r}) for r in ids))
        meta = {"n_rows": self.n_rows, "n_columns": self.n_columns, "kind": self.kind, **(info or {})}
        atomic_write_json(folder / INFO_FILE, meta)
        return folder


def normalize_block(block: np.ndarray, stats: ColumnStats) -> np.ndarray:
    """A' = (A - mu) / sigma per column, computed in float64, returned as float32; zero-variance
    columns give 0.

    Elementwise, so the bits of a row do not depend on which block it was computed in or whether it
    arrived as float32 or float64 (float32 -> float64 is exact).
    """
    safe = np.where(stats.zero_variance, 1.0, stats.std)
    wide = np.subtract(block, stats.mean, dtype=np.float64)
    np.divide(wide, safe, out=wide)
    out = wide.astype(np.float32)
    if stats.zero_variance.any():
        out[:, stats.zero_variance] = 0.0
    return out


def _check_finite(scores: np.ndarray, where: str, pages: _Pages | None = None) -> None:
    step = block_rows(scores.shape[1])
    for start in range(0, scores.shape[0], step):
        block = np.asarray(scores[start : start + step])
        if block.dtype == np.float16:  # all exponent bits set = inf or nan; ten times faster than isfinite here
            finite = (block.view(np.uint16) & 0x7C00) != 0x7C00
        else:
            finite = np.isfinite(block)
        if pages is not None:
            pages.release(start, start + step)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            bad_total = int((~finite).sum())
            value = block[r, c]
            raise PoiseError(
                f"{where}: scores contain non-finite values ({value} at row {start + int(r)}, "
                f"column {int(c)}; {bad_total}+ in all)"
            )


# ------------------------------------------------------------------------------------ reading
def as_scores(array: Any, where: str) -> np.ndarray:
    """Check a loaded array is a real-valued 2-D matrix; float32 and float16 are kept as they are (a memory
    map stays one), any other dtype is converted to float32 in RAM."""
    if not isinstance(array, np.ndarray):
        raise PoiseError(f"{where}: expected an array of scores, got {type(array).__name__}")
    if array.dtype.kind not in "fiu":
        raise PoiseError(f"{where}: scores must be real numbers, got dtype {array.dtype}")
    if array.ndim != 2:
        raise PoiseError(
            f"{where}: scores must be 2-D (train rows x validation columns), got shape {tuple(array.shape)}"
        )
    if array.dtype not in SCORE_DTYPES:
        array = array.astype(np.float32)
    return array


def read_scores(path: str | os.PathLike) -> np.ndarray:
    """Read a score matrix from `.npy` (memory-mapped), `.safetensors` or a weights-only torch `.pt` file."""
    path = Path(path)
    if not path.exists():
        raise PoiseError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise PoiseError(f"{path}: not a plain numeric .npy array ({exc})") from None
        except OSError as exc:
            raise PoiseError(f"{path}: cannot read ({exc})") from None
    elif suffix == ".safetensors":
        array = _read_safetensors(path)
    elif suffix in (".pt", ".pth"):
        array = _read_torch(path)
    else:
        raise PoiseError(f"{path}: unknown scores format {suffix!r}; use .npy, .safetensors or .pt")
    return as_scores(array, str(path))


def _pick_tensor(tensors: dict, path: Path) -> Any:
    if "scores" in tensors:
        return tensors["scores"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    names = ", ".join(sorted(tensors)[:5])
    raise PoiseError(f"{path}: holds several tensors ({names}); name the matrix 'scores'")


def _read_safetensors(path: Path) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PoiseError(f"{path}: not a readable safetensors file ({exc})") from None
    except Exception as exc:  # bfloat16 and friends have no numpy dtype
        raise PoiseError(f"{path}: cannot read as numpy ({exc}); store the scores as float32") from None
    return _pick_tensor(tensors, path)


def _read_torch(path: Path) -> np.ndarray:
    try:
        import torch
    except ImportError:
        raise PoiseError(f"{path}: reading .pt needs torch (pip install 'poise[torch]')") from None
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PoiseError(
            f"{path}: refusing to unpickle it: a .pt file must hold plain tensors "
            "(loaded with weights_only=True); save the matrix with torch.save(tensor) or as .npy"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PoiseError(f"{path}: not a readable torch file ({first})") from None
    if isinstance(obj, dict):
        obj = _pick_tensor(obj, path)
    if not isinstance(obj, torch.Tensor):
        raise PoiseError(f"{path}: expected a tensor of scores, found {type(obj).__name__}")
    if obj.is_floating_point() and obj.dtype not in (torch.float32, torch.float16):
        obj = obj.float()
    return obj.detach().cpu().numpy()


def read_columns(path: str | os.PathLike) -> tuple[list[Any], list[str]]:
    """Read a columns file: one `{"id", "task"}` object per validation column."""
    ids: list[Any] = []
    tasks: list[str] = []
    for number, obj in read_jsonl(path):
        if "task" not in obj:
            raise PoiseError(f"{path}:{number}: missing field 'task'")
        task = obj["task"]
        if not isinstance(task, str) or not task.strip():
            raise PoiseError(f"{path}:{number}: field 'task' must be a non-empty string, got {task!r}")
        ids.append(obj.get("id", len(ids)))
        tasks.append(task)
    if not tasks:
        raise PoiseError(f"{path}: no columns")
    return ids, tasks


def read_rows(path: str | os.PathLike) -> list[Any]:
    """Read a rows file: one `{"id"}` object per training row."""
    ids: list[Any] = []
    for number, obj in read_jsonl(path):
        if "id" not in obj:
            raise PoiseError(f"{path}:{number}: missing field 'id'")
        ids.append(obj["id"])
    return ids


def load_attribution(
    source: str | os.PathLike,
    columns: str | os.PathLike | None = None,
    rows: str | os.PathLike | None = None,
    kind: str | None = None,
) -> AttributionMatrix:
    """Load a matrix from a poise attribution folder, or from a scores file plus a columns file.

    `columns`/`rows` override the folder's own files when given.
    """
    source = Path(source)
    info: dict = {}
    if not source.exists():
        raise PoiseError(f"{source}: no such file or folder")
    if source.is_dir():
        scores_path = source / SCORES_FILE
        if not scores_path.exists():
            raise PoiseError(f"{source}: not a poise attribution folder (no {SCORES_FILE})")
        if (source / INFO_FILE).exists():
            info = read_json(source / INFO_FILE)
        columns = columns or source / COLUMNS_FILE
        if rows is None and (source / ROWS_FILE).exists():
            rows = source / ROWS_FILE
    else:
        scores_path = source
        if columns is None:
            raise PoiseError(f"{source}: a scores file needs --columns FILE.jsonl (one {{'id','task'}} per column)")
    scores = read_scores(scores_path)
    column_ids, tasks = read_columns(columns)
    if len(tasks) != scores.shape[1]:
        raise PoiseError(
            f"{columns}: {len(tasks)} columns listed but {scores_path} has {scores.shape[1]} score columns"
        )
    row_ids = None
    if rows is not None:
        row_ids = read_rows(rows)
        if len(row_ids) != scores.shape[0]:
            raise PoiseError(f"{rows}: {len(row_ids)} rows listed but {scores_path} has {scores.shape[0]} rows")
    return AttributionMatrix(
        scores=scores,
        column_ids=column_ids,
        tasks=tasks,
        row_ids=row_ids,
        kind=kind or info.get("kind"),
        source=str(scores_path),
    )


def load_matrix(config: Any) -> AttributionMatrix:
    """The matrix named by a `MatrixConfig` (an attribution folder, or --scores with --columns)."""
    if config.attribution and config.scores:
        raise PoiseError("give either --attribution DIR or --scores FILE, not both")
    source = config.attribution or config.scores
    if not source:
        raise PoiseError("no attribution matrix given: use --attribution DIR or --scores FILE --columns FILE")
    return load_attribution(source, columns=config.columns, rows=config.rows)
