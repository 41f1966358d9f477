"""The attribution matrix object and its readers (numpy only): influence of every training example on every
validation example.

`A[i, j]` is the influence of training row i on validation column j (docs/design.md §2.4). Rows are the
pool in its own order; every column carries a validation id and the task it belongs to. Selection,
analysis and report only ever see this object, so they work on a matrix made by poise or by anything
else (`.npy`, `.safetensors`, weights-only torch `.pt`).

On disk a poise attribution folder holds `scores.npy` (float32, N x V, memory-mapped on load),
`columns.jsonl` (`{"id", "task"}` per column), `rows.jsonl` (`{"id"}` per row) and `info.json`.
"""

from __future__ import annotations

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

#: Rows per chunk when streaming over the matrix (bounded memory for memory-mapped scores).
CHUNK_ROWS = 16384


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

    scores: np.ndarray  # (N, V) float32, possibly a read-only memmap
    column_ids: list[Any]
    tasks: list[str]
    row_ids: list[Any] | None = None  # None: the row index is the id
    kind: str | None = None  # "influence", "rds" or None (unknown)
    source: str | None = None  # where it was read from, for messages and provenance
    _stats: ColumnStats | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------- shape
    @property
    def n_rows(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_columns(self) -> int:
        return int(self.scores.shape[1])

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
        if scores.dtype != np.float32:
            raise PoiseError(f"{where}: scores must be float32 here, got {scores.dtype} (use as_scores())")
        if len(self.column_ids) != scores.shape[1] or len(self.tasks) != scores.shape[1]:
            raise PoiseError(
                f"{where}: {len(self.tasks)} column labels for {scores.shape[1]} score columns"
            )
        for j, task in enumerate(self.tasks):
            if not isinstance(task, str) or not task.strip():
                raise PoiseError(f"{where}: column {j} has an empty or non-string task {task!r}")
        if self.row_ids is not None and len(self.row_ids) != scores.shape[0]:
            raise PoiseError(f"{where}: {len(self.row_ids)} row ids for {scores.shape[0]} score rows")
        if self.kind is not None and self.kind not in MATRIX_KINDS:
            raise PoiseError(f"{where}: unknown matrix kind {self.kind!r}; expected one of {MATRIX_KINDS}")
        _check_finite(scores, where)

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
    def column_stats(self) -> ColumnStats:
        """Mean and std (ddof=0) of every column over all rows, accumulated in float64.

        Two streaming passes over row chunks (mean, then squared deviations), so a memory-mapped
        matrix is never loaded whole. A column is zero-variance when all its values are equal.
        """
        if self._stats is None:
            total = np.zeros(self.n_columns, dtype=np.float64)
            for start in range(0, self.n_rows, CHUNK_ROWS):
                total += np.asarray(self.scores[start : start + CHUNK_ROWS]).sum(axis=0, dtype=np.float64)
            mean = total / self.n_rows
            mean32 = mean.astype(np.float32)
            m2 = np.zeros(self.n_columns, dtype=np.float64)
            shift = np.zeros(self.n_columns, dtype=np.float64)
            for start in range(0, self.n_rows, CHUNK_ROWS):
                dev = np.asarray(self.scores[start : start + CHUNK_ROWS]) - mean32
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
        self, normalized: bool = False, chunk_rows: int = CHUNK_ROWS
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, float32 block): the raw scores or the normalised A' (same bits as
        `normalized()`). Reduce them with `dtype=np.float64` where precision matters."""
        stats = self.column_stats() if normalized else None
        for start in range(0, self.n_rows, chunk_rows):
            block = np.asarray(self.scores[start : start + chunk_rows])
            yield start, block if stats is None else normalize_block(block, stats)

    def normalized_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 normalised values of the given rows, bit-identical to `normalized()`."""
        return normalize_block(np.asarray(self.scores[np.asarray(rows)]), self.column_stats())

    def normalized(self) -> np.ndarray:
        """The whole column-normalised matrix A' = (A - mu_j) / sigma_j as float32 (in RAM)."""
        out = np.empty(self.scores.shape, dtype=np.float32)
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
        """The matrix restricted to the given columns, in the given order (scores copied into RAM)."""
        keep = np.asarray(keep, dtype=np.int64)
        return AttributionMatrix(
            scores=np.ascontiguousarray(self.scores[:, keep]),
            column_ids=[self.column_ids[j] for j in keep],
            tasks=[self.tasks[j] for j in keep],
            row_ids=self.row_ids,
            kind=self.kind,
            source=self.source,
        )

    # -------------------------------------------------------------------------------------- I/O
    def save(self, folder: str | os.PathLike, info: dict | None = None) -> Path:
        """Write a poise attribution folder (scores.npy, columns.jsonl, rows.jsonl, info.json)."""
        import json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SCORES_FILE}.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(self.scores, dtype=np.float32), allow_pickle=False)
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


def _check_finite(scores: np.ndarray, where: str) -> None:
    for start in range(0, scores.shape[0], CHUNK_ROWS):
        block = np.asarray(scores[start : start + CHUNK_ROWS])
        finite = np.isfinite(block)
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
    """Check a loaded array is a real-valued 2-D matrix and return it as float32."""
    if not isinstance(array, np.ndarray):
        raise PoiseError(f"{where}: expected an array of scores, got {type(array).__name__}")
    if array.dtype.kind not in "fiu":
        raise PoiseError(f"{where}: scores must be real numbers, got dtype {array.dtype}")
    if array.ndim != 2:
        raise PoiseError(
            f"{where}: scores must be 2-D (train rows x validation columns), got shape {tuple(array.shape)}"
        )
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    return array


def read_scores(path: str | os.PathLike) -> np.ndarray:
    """Read a score matrix from `.npy`, `.safetensors` or a weights-only torch `.pt` file."""
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
    if obj.is_floating_point() and obj.dtype != torch.float32:
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
