"""Selection: choose a budgeted subset of the pool from an attribution matrix.

`select(matrix, method=..., budget=...)` runs one registered method and returns a `Selection`: the
picks in order and, per pick, its score (or BIDS gain) and the validation column and task it served.
`write_selection` / `read_selection` persist it as `selection.json` (+ `selected.jsonl` with a pool).
`pool_strata` reads a pool field into strata for a stratified (balanced) random draw.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poise.errors import PoiseError, warn
from poise.files import SELECTED_FILE, SELECTION_FILE
from poise.io import atomic_write_json, atomic_write_lines, read_json
from poise.matrix import AttributionMatrix
from poise.selection import balance as _balance  # noqa: F401  (registers the round-robin rules)
from poise.selection import bids as _bids  # noqa: F401  (registers "bids")
from poise.selection import rules as _rules  # noqa: F401  (registers the top-B rules)
from poise.selection.registry import METHODS, Context, Picks, get_method, parse_budget
from poise.version import __version__

__all__ = ["METHODS", "Selection", "select", "parse_budget", "pool_strata", "read_selection", "write_selection"]


@dataclass
class Selection:
    """The picks of one method, in order, with a per-pick trace."""

    method: str
    budget: int | float | str  # as requested
    n_pool: int
    indices: np.ndarray  # (B,) int64, pick order
    trace: list[dict[str, Any]]
    normalize: bool
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short name for tables and plots, e.g. `bids`, `bids (raw)`, `instance-max (norm)`, `random-stratified`."""
        if self.arguments.get("label"):
            return str(self.arguments["label"])
        if "strata_counts" in self.arguments:
            return f"{self.method}-stratified"
        default = METHODS[self.method].normalize_default if self.method in METHODS else False
        if self.method == "random" or self.normalize == default:
            return self.method
        return f"{self.method} ({'norm' if self.normalize else 'raw'})"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "n_pool": self.n_pool,
            "indices": [int(i) for i in self.indices],
            "trace": self.trace,
            "arguments": self.arguments,
        }


def select(
    matrix: AttributionMatrix,
    method: str = "bids",
    budget: int | float | str = 0.15,
    *,
    seed: int = 0,
    normalize: bool | None = None,
    tasks: list[str] | None = None,
    progress=None,
    label: str | None = None,
    strata: tuple[np.ndarray, list[str]] | None = None,
    stratify: str | None = None,
) -> Selection:
    """Select `budget` rows of `matrix` with `method` (see `poise.selection.METHODS`).

    budget: an int is a count, a float in (0, 1] a fraction of the pool (floored).
    normalize: column-normalise before scoring; default per method (True for bids only).
    tasks: restrict to the columns of these tasks.
    strata: (int64 code of each row, the sorted values the codes stand for), e.g. from `pool_strata`: a method
    that draws (random) draws equal shares per value; `stratify` names the field they come from (recorded).
    """
    spec = get_method(method)
    if strata is not None:
        _check_strata(strata, spec.uses_scores, method, matrix.n_rows)
    if spec.requires_kind and matrix.kind not in (None, spec.requires_kind):
        how = {"rds": "`poise attribute --rds` on `poise features --kind reps` features",
               "rds+": "`poise attribute --rds` on `poise features --kind reps --pooling weighted-mean` features made "
                       "without --checkpoint (the base model)"}.get(spec.requires_kind, "`poise attribute`")
        raise PoiseError(
            f"method {method!r} needs a {spec.requires_kind} matrix, but {matrix.source or 'this matrix'} "
            f"is a {matrix.kind} matrix (build one with {how})"
        )
    if tasks:
        matrix = matrix.select_tasks(tasks)
    count = parse_budget(budget, matrix.n_rows)
    do_normalize = spec.normalize_default if normalize is None else bool(normalize)
    columns = np.arange(matrix.n_columns)  # the columns the method sees, as indices of `matrix`
    scored = matrix
    if do_normalize and method != "random":
        scored, columns = _without_constant_columns(matrix)
    codes, names = (np.asarray(strata[0], dtype=np.int64), [str(n) for n in strata[1]]) if strata else (None, None)
    picks: Picks = spec.fn(scored, count, Context(normalize=do_normalize, seed=seed, progress=progress,
                                                  strata=codes, strata_names=names))
    picks.columns = np.where(picks.columns < 0, picks.columns, columns[np.maximum(picks.columns, 0)])
    trace = []
    for rank, (row, score, col) in enumerate(zip(picks.rows.tolist(), picks.scores.tolist(),
                                                 picks.columns.tolist(), strict=True)):
        trace.append(
            {
                "rank": rank,
                "row": row,
                "id": matrix.row_id(row),
                "score": None if math.isnan(score) else score,
                "column": None if col < 0 else col,
                "column_id": None if col < 0 else matrix.column_ids[col],
                "task": None if col < 0 else matrix.tasks[col],
            }
        )
        if codes is not None and names is not None:
            trace[-1]["stratum"] = names[int(codes[row])]
    budget = _as_number(budget)
    arguments = {
        "method": method,
        "budget": budget,
        "budget_rows": count,
        "normalize": do_normalize,
        "seed": seed,
        "tasks": list(tasks) if tasks else None,
        "matrix": matrix.source,
        "matrix_shape": [matrix.n_rows, matrix.n_columns],
        "poise_version": __version__,
    }
    if codes is not None and names is not None:
        picked = np.bincount(codes[picks.rows], minlength=len(names))
        arguments["stratify"] = stratify
        arguments["strata_counts"] = {name: int(n) for name, n in zip(names, picked.tolist(), strict=True)}
    if label:
        arguments["label"] = label
    return Selection(
        method=method,
        budget=budget,
        n_pool=matrix.n_rows,
        indices=picks.rows,
        trace=trace,
        normalize=do_normalize,
        arguments=arguments,
    )


def _check_strata(strata: tuple[np.ndarray, list[str]], uses_scores: bool, method: str, n_rows: int) -> None:
    """A code per matrix row, each naming one of the values; only for a method that draws at random."""
    if uses_scores:
        raise PoiseError(f"method {method!r} reads the scores; strata (stratify) are only for a method that draws "
                         f"at random ({', '.join(m for m, spec in METHODS.items() if not spec.uses_scores)})")
    codes, names = strata
    codes = np.asarray(codes)
    if codes.shape != (n_rows,) or not np.issubdtype(codes.dtype, np.integer):
        raise PoiseError(f"strata: expected one integer code per matrix row ({n_rows}), got an array of shape "
                         f"{codes.shape} and dtype {codes.dtype}")
    if n_rows and (codes.min() < 0 or codes.max() >= len(names)):
        raise PoiseError(f"strata: codes must lie in [0, {len(names)}) (one per value), got "
                         f"{int(codes.min())}..{int(codes.max())}")


def _without_constant_columns(matrix: AttributionMatrix) -> tuple[AttributionMatrix, np.ndarray]:
    """The matrix without its zero-variance columns, and the indices of the columns kept.

    A constant column says nothing about any row: normalised it is all zeros and would offer every row the
    same gain, so once every other gain is negative the picks would follow row order. It takes no part in a
    normalised selection (BIDS, normalised top-B rules); every column constant is an error. The matrix without
    them is a view of a memory-mapped one (`AttributionMatrix.select_columns`): nothing is copied.
    """
    zero = matrix.column_stats().zero_variance
    if not zero.any():
        return matrix, np.arange(matrix.n_columns)
    if zero.all():
        raise PoiseError(f"{matrix.source or 'scores'}: every validation column is constant (zero variance over "
                         "the pool): the scores say nothing about any row")
    names = [str(matrix.column_ids[j]) for j in np.flatnonzero(zero)]
    listing = ", ".join(names[:5]) + ("" if len(names) <= 5 else f" and {len(names) - 5} more")
    warn(f"{matrix.source or 'scores'}: {len(names)} validation column(s) are constant over the pool ({listing}); "
         "they take no part in the selection")
    keep = np.flatnonzero(~zero)
    return matrix.select_columns(keep), keep


def _as_number(budget: int | float | str) -> int | float | str:
    """A budget given as text, recorded as the number it denotes (count or fraction)."""
    if isinstance(budget, str):
        text = budget.strip()
        try:
            return int(text) if text.isdigit() else float(text)
        except ValueError:
            return budget
    return budget


def count_pool_lines(pool: str | os.PathLike) -> list[str]:
    """The non-blank lines of a pool JSONL file (without newlines)."""
    path = Path(pool)
    try:
        with path.open("r", encoding="utf-8") as handle:
            return [line.rstrip("\r\n") for line in handle if line.strip()]
    except OSError as exc:
        raise PoiseError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise PoiseError(f"{path}: not UTF-8 text") from None


def check_pool(pool: str | os.PathLike, matrix: AttributionMatrix) -> list[str]:
    """Read the pool and check it lines up with the matrix rows (count, and ids where both have them)."""
    return match_pool(pool, matrix)[0]


def match_pool(pool: str | os.PathLike, matrix: AttributionMatrix) -> tuple[list[str], list[int]]:
    """`check_pool`, with each line's number in the pool (counting its non-blank lines, from 1)."""
    lines = count_pool_lines(pool)
    if len(lines) != matrix.n_rows:
        matched = _match_by_id(pool, lines, matrix)
        if matched is None:
            raise PoiseError(f"{pool}: {len(lines)} examples but the matrix has {matrix.n_rows} rows")
        return [lines[k] for k in matched], [k + 1 for k in matched]
    if matrix.row_ids is not None:
        for number, (line, row_id) in enumerate(zip(lines, matrix.row_ids, strict=True), start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PoiseError(f"{pool}:{number}: not valid JSON ({exc.msg})") from None
            if isinstance(obj, dict) and "id" in obj and obj["id"] != row_id:
                raise PoiseError(
                    f"{pool}:{number}: id {obj['id']!r} does not match matrix row id {row_id!r}; "
                    "the pool must be in the matrix's row order"
                )
    return lines, list(range(1, len(lines) + 1))


def _match_by_id(pool: str | os.PathLike, lines: list[str], matrix: AttributionMatrix) -> list[int] | None:
    """The indices of the pool lines of the matrix rows, by id, when the matrix holds fewer rows than the pool:
    the features stage leaves out examples without a target token within max_seq_length. None when ids do not
    match."""
    if matrix.row_ids is None or matrix.n_rows > len(lines):
        return None
    from poise.data import read_examples

    try:
        ids = [str(e.id) for e in read_examples(pool)]
    except PoiseError:
        return None
    if len(ids) != len(lines):
        return None
    where = {row_id: k for k, row_id in enumerate(ids)}
    if any(str(row_id) not in where for row_id in matrix.row_ids):
        return None
    warn(f"{pool}: {len(lines) - matrix.n_rows} of its {len(lines)} examples have no row in the matrix (left out "
         "when the features were computed: no target token within max_seq_length); the others are matched by id")
    return [where[str(row_id)] for row_id in matrix.row_ids]


def pool_strata(
    pool: str | os.PathLike, lines: list[str], field: str, line_numbers: list[int] | None = None
) -> tuple[np.ndarray, list[str]]:
    """The stratum of each pool line (in matrix row order, as `check_pool` returns them): an int64 code per line
    and the sorted distinct values of `field` (as text) the codes stand for.

    `field` names a key of each row; a dotted name (`meta.source`) a nested one, unless the row has the dotted
    name itself as a key. A row without it, or with a list, mapping or null there, is an error naming
    `pool:LINE` (`line_numbers`: each line's number in the pool; without them the row and its id) and the
    fields the row has.
    """
    values: list[str] = []
    for k, line in enumerate(lines):
        where = f"{pool}:{line_numbers[k]}" if line_numbers is not None else f"{pool}: row {k}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PoiseError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise PoiseError(f"{where}: expected a JSON object with field {field!r} (stratify), got "
                             f"{type(row).__name__}")
        if line_numbers is None and "id" in row:
            where += f" (id {row['id']!r})"
        values.append(_stratum(row, field, where))
    names = sorted(set(values))
    index = {name: code for code, name in enumerate(names)}
    return np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values)), names


def _stratum(row: dict[str, Any], field: str, where: str) -> str:
    """The value of `field` in one pool row, as text."""
    value: Any = row
    if field in row:
        value = row[field]
    else:
        parts = field.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(value, dict) or part not in value:
                inside = ".".join(parts[:depth])
                if isinstance(value, dict):
                    has = ", ".join(map(str, value)) or "none"
                    fields = f"the row has {has}" if not inside else f"the row's {inside} has {has}"
                else:
                    fields = f"the row's {inside} is {_kind(value)}"
                raise PoiseError(f"{where}: no field {field!r} to stratify by ({fields})")
            value = value[part]
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise PoiseError(f"{where}: field {field!r} is {_kind(value)}, not one value (text, a number or true/false) to "
                     f"stratify by (the row has {', '.join(map(str, row))})")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def write_selection(
    selection: Selection, out: str | os.PathLike, pool_lines: list[str] | None = None
) -> Path:
    """Write `selection.json` (and `selected.jsonl` in pick order when pool lines are given)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if pool_lines is not None:
        atomic_write_lines(out / SELECTED_FILE, (pool_lines[i] for i in selection.indices.tolist()))
    atomic_write_json(out / SELECTION_FILE, selection.to_json())
    return out / SELECTION_FILE


def read_selection(path: str | os.PathLike) -> Selection:
    """Read a selection folder (or its selection.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTION_FILE
    if not path.exists():
        raise PoiseError(f"{path}: no such selection (expected a folder written by `poise select`)")
    data = read_json(path)
    for key in ("method", "budget", "n_pool", "indices", "trace"):
        if key not in data:
            raise PoiseError(f"{path}: missing field {key!r}")
    arguments = data.get("arguments") or {}
    return Selection(
        method=data["method"],
        budget=data["budget"],
        n_pool=int(data["n_pool"]),
        indices=np.asarray(data["indices"], dtype=np.int64),
        trace=data["trace"],
        normalize=bool(arguments.get("normalize", data["method"] == "bids")),
        arguments=arguments,
    )
