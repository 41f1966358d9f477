"""The tokenised data set on disk: Arrow, memory-mapped, built once per (data, tokenizer, template, length).

A pool of millions cannot live in Python lists (about 41 bytes per token, on every rank). So the examples are
parsed row by row (every input format and error message of `formats.py`) into an Arrow file, tokenised with
`datasets.Dataset.map` in several processes into int32 `input_ids` and `labels` (-100 where not trained on),
plus each example's `length` and `n_targets`, and cached in poise's cache folder under a key of the data's
content (`source_digest`), the tokenizer, the template, `max_seq_length` and the task. Every stage and every
rank maps the same files: the first process to take the entry's lock builds it, the others wait and map it.
A process then holds only small index arrays (the kept rows, their lengths: 12 bytes per example) and reads
the tokens of the batches it works on through the memory map.

Examples without a target token within `max_seq_length` are kept in the table with their reason and left out
of `rows`, reported as `tokenize_examples` reports them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from poise.data.formats import IGNORE_INDEX, Example, iter_examples, source_digest
from poise.data.templates import MAX_WARNINGS, PROGRESS_FROM, ChatTemplate, Tokenized, _Encoder
from poise.errors import PoiseError, warn
from poise.io import atomic_write_json, cache_dir, disk_size, exclusive, human_size, read_json

FORMAT = 1
"""Bump when the cached layout or the tokenisation changes: old entries are then never read."""

META_FILE = "meta.json"
ROWS_PER_WRITE = 10_000
MAP_BATCH = 1_000


# ------------------------------------------------------------------------------------------- keys
def tokenizer_digest(tokenizer: Any) -> str:
    """What the tokenizer does to text: its backend (vocabulary, merges, normaliser, post-processor: the special
    tokens it adds), its chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation and padding state that each call of the tokenizer sets
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    head = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.bos_token,
            tokenizer.eos_token, tokenizer.pad_token, len(tokenizer),
            {k: v for k, v in sorted(getattr(tokenizer, "init_kwargs", {}).items()) if k.startswith("add_")}]
    return hashlib.sha256((json.dumps(head, default=str) + body).encode()).hexdigest()


def rows_key(paths: Sequence[str], task: str | None) -> str:
    """The parsed rows' cache key: the data's content and the default task."""
    from poise.version import __version__

    parts = [FORMAT, __version__, [source_digest(p) for p in paths], task]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def cache_key(rows: str, tokenizer: Any, max_seq_length: int, template: str) -> str:
    """The tokenised set's cache key: its parsed rows' key, the tokenizer, the template and the length."""
    parts = [rows, tokenizer_digest(tokenizer), template, max_seq_length]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------- the set
class TokenizedSet:
    """The tokenised examples of a cache entry: `rows` (table rows with a target token, in data order) and their
    `lengths` in memory, everything else read through the memory map."""

    def __init__(self, folder: Path, table: Any, meta: dict) -> None:
        self.folder, self.table, self.meta = folder, table, meta
        arrow = table.data
        self._arrow = arrow.table  # pyarrow, over the memory-mapped files
        lengths = [len(c) for c in self._arrow.column(0).chunks]  # every column is chunked alike (record batches)
        if any([len(c) for c in column.chunks] != lengths for column in self._arrow.columns):
            raise PoiseError(f"{folder}: the cached columns are chunked differently; delete the folder to rebuild it")
        self._chunk_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.n_targets = arrow.column("n_targets").to_numpy()
        self.rows = np.flatnonzero(self.n_targets > 0)  # int64 table rows of the kept examples
        self.lengths = arrow.column("length").to_numpy()[self.rows].astype(np.int64)

    @property
    def n_rows(self) -> int:
        """Examples read (kept or not)."""
        return len(self.n_targets)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def items(self, positions: Sequence[int] | np.ndarray) -> list[Tokenized]:
        """The kept examples at `positions` (0..len-1), read from the memory map."""
        picked = self._take(["input_ids", "labels"], self.rows[np.asarray(positions, dtype=np.int64)])
        return [Tokenized(ids, labels) for ids, labels in zip(picked["input_ids"], picked["labels"], strict=True)]

    def _take(self, names: Sequence[str], rows: np.ndarray) -> dict[str, list]:
        """The values of `rows` (table rows) in `names`, in that order. Taken chunk by chunk: Arrow's `take` on a
        column of several chunks first concatenates them, which would copy the whole column into memory."""
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64)
        chunk = np.searchsorted(self._chunk_starts, rows, side="right") - 1
        out: dict[str, list] = {name: [None] * len(rows) for name in names}
        for c in np.unique(chunk):
            where = np.flatnonzero(chunk == c)
            offsets = pa.array(rows[where] - self._chunk_starts[c])
            for name in names:
                values = self._arrow.column(name).chunk(int(c)).take(offsets).to_pylist()
                for k, value in zip(where.tolist(), values, strict=True):
                    out[name][k] = value
        return out

    def positions_of(self, table_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions of the kept examples among `table_rows`, in their order; the table rows left out)."""
        position = np.full(self.n_rows, -1, dtype=np.int64)
        position[self.rows] = np.arange(len(self))
        found = position[np.asarray(table_rows, dtype=np.int64)]
        return found[found >= 0], np.asarray(table_rows)[found < 0]

    def ids_digest(self, positions: np.ndarray) -> str:
        """sha256 (16 hex digits) of the ids at `positions` as `json.dumps(list_of_ids)` writes them, streamed."""
        hashed = hashlib.sha256(b"[")
        for k, row in enumerate(self.columns(["id"], positions)):
            hashed.update(((", " if k else "") + json.dumps(row["id"])).encode())
        hashed.update(b"]")
        return hashed.hexdigest()[:16]

    def item(self, position: int) -> Tokenized:
        return self.items([position])[0]

    def columns(self, names: Sequence[str], positions: np.ndarray | None = None,
                chunk: int = 50_000) -> Iterator[dict[str, Any]]:
        """Rows of the kept examples (all, or those at `positions`) as dicts of `names`, read in chunks."""
        rows = self.rows if positions is None else self.rows[np.asarray(positions, dtype=np.int64)]
        for start in range(0, len(rows), chunk):
            block = self._take(names, rows[start:start + chunk])
            yield from (dict(zip(names, values, strict=True)) for values in zip(*(block[n] for n in names),
                                                                               strict=True))

    def excluded(self) -> list[tuple[str, str, str]]:
        """(where, id, reason) of the examples left out (without a target token), in data order."""
        out = np.flatnonzero(self.n_targets == 0)
        if not len(out):
            return []
        block = self._take(["where", "id", "reason"], out)
        return list(zip(block["where"], block["id"], block["reason"], strict=True))

    def report_excluded(self, rows: np.ndarray | None = None, fatal: bool = True) -> None:
        """Warn about the examples left out (of all, or of the table `rows` given), as `tokenize_examples` does;
        with `fatal`, all of them left out is an error."""
        out = np.flatnonzero(self.n_targets == 0) if rows is None else rows[self.n_targets[rows] == 0]
        if not len(out):
            return
        shown = self._take(["where", "id", "reason"], out[:MAX_WARNINGS])
        if fatal and not len(self.rows):
            raise PoiseError(f"all {self.n_rows} examples were excluded; the first, {shown['where'][0]} "
                             f"(id '{shown['id'][0]}'): {shown['reason'][0]}")
        for where, example_id, reason in zip(shown["where"], shown["id"], shown["reason"], strict=True):
            warn(f"{where} (id '{example_id}'): {reason}; excluded")
        if len(out) > MAX_WARNINGS:
            warn(f"... and {len(out) - MAX_WARNINGS} more examples excluded for having no target token")


class IdRows:
    """The kept examples' {"id", "task"} rows: sized and iterable, read in chunks (the features' ids.jsonl)."""

    def __init__(self, data: TokenizedSet) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.data.columns(["id", "task"])

    def digest(self) -> str:
        """sha256 of the rows as the JSON list `json.dumps(rows, sort_keys=True)` would write, streamed."""
        digest = hashlib.sha256(b"[")
        for k, row in enumerate(self):
            digest.update(((", " if k else "") + json.dumps(row, sort_keys=True)).encode())
        digest.update(b"]")
        return digest.hexdigest()


class ItemView:
    """A sequence of `Tokenized` over some positions of a set (what the Trainer's data set indexes)."""

    def __init__(self, data: TokenizedSet, positions: np.ndarray | None = None) -> None:
        self.data = data
        self.positions = np.arange(len(data)) if positions is None else np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> Tokenized:
        return self.data.item(int(self.positions[index]))


# ------------------------------------------------------------------------------------------- build or open
def tokenized_set(paths: Sequence[str | os.PathLike], tokenizer: Any, max_seq_length: int,
                  template: ChatTemplate = "auto", task: str | None = None, progress: bool = True,
                  report: bool = True) -> TokenizedSet:
    """The tokenised examples of `paths` (read as `read_examples` reads each), from the cache or built into it.

    `report` warns about the examples left out (and raises if all are); `progress` shows the build's progress.
    """
    _Encoder(tokenizer, template, max_seq_length)  # a bad length or template: one line before any work
    rows = parsed_rows(paths, task)
    folder = cache_dir() / "tokenized" / cache_key(rows.key, tokenizer, max_seq_length, template)
    if not _complete(folder):
        with exclusive(folder.with_name(folder.name + ".lock")):
            if not _complete(folder):  # another process may have built it while this one waited
                _build(folder, rows, tokenizer, max_seq_length, template, progress)
    data = _open(folder)
    if report:
        data.report_excluded()
    return data


class ParsedRows:
    """The examples of some data files, parsed (every format, every error message) into Arrow files in poise's
    cache: no tokenizer needed, so a stage checks its data, and counts it, before loading anything else."""

    def __init__(self, folder: Path, meta: dict) -> None:
        self.folder, self.meta, self.key = folder, meta, folder.name

    def __len__(self) -> int:
        return int(self.meta["examples"])

    def table(self) -> Any:
        import datasets

        parts = [datasets.Dataset.from_file(str(self.folder / name)) for name in self.meta["files"]]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def parsed_rows(paths: Sequence[str | os.PathLike], task: str | None = None) -> ParsedRows:
    """The parsed examples of `paths` (read as `read_examples` reads each), from the cache or parsed into it."""
    paths = [str(p) for p in paths]
    if not paths:
        raise PoiseError("no data to read")
    folder = cache_dir() / "rows" / rows_key(paths, task)
    if not _complete(folder):
        with exclusive(folder.with_name(folder.name + ".lock")):
            if not _complete(folder):
                _parse_into(folder, paths, task)
    return ParsedRows(folder, read_json(folder / META_FILE))


def _parse_into(folder: Path, paths: Sequence[str], task: str | None) -> None:
    started = time.monotonic()
    partial = _fresh_partial(folder)
    files, counts = [], []
    for k, source in enumerate(paths):
        row_file = partial / f"rows-{k}.arrow"
        counts.append(_write_rows(row_file, source, task))
        _check_unique(row_file)
        files.append(row_file.name)
    meta = {"format": FORMAT, "files": files, "examples": sum(counts), "per_source": counts, "sources": list(paths),
            "task": task, "seconds": round(time.monotonic() - started, 1)}
    _finish(partial, folder, meta)
    if meta["examples"] >= PROGRESS_FROM:
        print(f"poise: read {meta['examples']:,} examples in {meta['seconds']:.0f}s: {human_size(disk_size(folder))} "
              f"cached in {folder}", file=sys.stderr, flush=True)


def _fresh_partial(folder: Path) -> Path:
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():  # left by a killed build (this process holds the lock)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _finish(partial: Path, folder: Path, meta: dict) -> None:
    atomic_write_json(partial / META_FILE, meta)  # last: a folder with meta.json is complete
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)


def _complete(folder: Path) -> bool:
    return (folder / META_FILE).is_file()


def _open(folder: Path) -> TokenizedSet:
    import datasets

    meta = read_json(folder / META_FILE)
    shards = [datasets.Dataset.from_file(str(folder / name)) for name in meta["shards"]]
    table = shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)
    return TokenizedSet(folder, table, meta)


def _row_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("task", pa.string()), ("where", pa.string()), ("dataset", pa.string()),
                      ("messages", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


def _write_rows(path: Path, source: str, task: str | None) -> int:
    """Parse every example of `source` into the Arrow file `path` (a batch of rows at a time); returns the count."""
    import pyarrow as pa

    schema = _row_schema()
    total = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buffer: list[Example] = []
        for example in iter_examples(source, task=task):
            buffer.append(example)
            if len(buffer) == ROWS_PER_WRITE:
                writer.write_batch(_record_batch(buffer, schema))
                total += len(buffer)
                buffer = []
        if buffer:
            writer.write_batch(_record_batch(buffer, schema))
            total += len(buffer)
    return total


def _record_batch(examples: list[Example], schema: Any) -> Any:
    import pyarrow as pa

    return pa.record_batch([
        [e.id for e in examples], [e.task for e in examples], [e.where for e in examples],
        [e.dataset for e in examples],
        [json.dumps(e.messages, ensure_ascii=False) if e.messages is not None else None for e in examples],
        [e.input_ids for e in examples], [e.labels for e in examples],
    ], schema=schema)


def _check_unique(path: Path) -> None:
    """Duplicate ids within one source are an error naming both rows, as `read_examples` says it. Counted by
    Arrow; only a failing file is walked in Python to find the first duplicate."""
    import pyarrow as pa
    import pyarrow.compute as pc

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
        ids = table.column("id")
        if pc.count_distinct(ids).as_py() == len(ids):
            return
        seen: dict[str, str] = {}
        for example_id, where in zip(ids.to_pylist(), table.column("where").to_pylist(), strict=True):
            if example_id in seen:
                raise PoiseError(f"{where}: duplicate id '{example_id}' (first at {seen[example_id]})")
            seen[example_id] = where


_ENCODERS: dict[tuple[int, str, int], _Encoder] = {}


def _encode_batch(batch: dict[str, list], tokenizer: Any, template: ChatTemplate,
                  max_seq_length: int) -> dict[str, list]:
    """`datasets.map` function: a batch of parsed rows -> input_ids, labels, length, n_targets, reason."""
    key = (id(tokenizer), template, max_seq_length)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = _Encoder(tokenizer, template, max_seq_length)
    examples = [Example(i, json.loads(m) if m is not None else None, ids, labels, t, w)
                for i, m, ids, labels, t, w in zip(batch["id"], batch["messages"], batch["input_ids"],
                                                    batch["labels"], batch["task"], batch["where"], strict=True)]
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "n_targets": [], "reason": []}
    for item, reason in _ENCODERS[key].encode(examples):
        out["input_ids"].append(item.input_ids)
        out["labels"].append(item.labels)
        out["length"].append(len(item.input_ids))
        targets = sum(label != IGNORE_INDEX for label in item.labels)
        out["n_targets"].append(targets if reason is None else 0)
        out["reason"].append(reason)
    return out


def processes(n_examples: int) -> int:
    """Tokenising processes: POISE_TOKENIZE_PROCESSES, else one per 5,000 examples up to the CPUs (at most 8)."""
    configured = os.environ.get("POISE_TOKENIZE_PROCESSES", "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise PoiseError(f"POISE_TOKENIZE_PROCESSES={configured!r}: expected a positive integer")
        return int(configured)
    return max(1, min(os.cpu_count() or 1, 8, n_examples // 5000))


def _build(folder: Path, parsed: ParsedRows, tokenizer: Any, max_seq_length: int, template: ChatTemplate,
           progress: bool) -> None:
    import datasets
    from datasets.utils import logging as datasets_logging

    started = time.monotonic()
    partial = _fresh_partial(folder)
    rows = parsed.table()
    n = len(rows)
    procs = min(processes(n), max(1, n // MAP_BATCH))
    print(f"poise: tokenize: {n:,} examples with {procs} process{'es' if procs > 1 else ''} into poise's cache "
          f"{folder} (once: later stages and runs map it)", file=sys.stderr, flush=True)
    features = datasets.Features({
        "id": datasets.Value("string"), "task": datasets.Value("string"), "where": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"), "n_targets": datasets.Value("int32"), "reason": datasets.Value("string"),
    })
    bars = progress and n >= PROGRESS_FROM and sys.stderr.isatty()
    was_enabled = datasets_logging.is_progress_bar_enabled()
    (datasets_logging.enable_progress_bar if bars else datasets_logging.disable_progress_bar)()
    try:
        tokens = rows.map(_encode_batch, batched=True, batch_size=MAP_BATCH, num_proc=procs if procs > 1 else None,
                          fn_kwargs={"tokenizer": tokenizer, "template": template, "max_seq_length": max_seq_length},
                          remove_columns=["dataset", "messages"], features=features,
                          cache_file_name=str(partial / "tokens.arrow"), load_from_cache_file=False,
                          new_fingerprint=folder.name, desc="poise: tokenize")
    finally:
        (datasets_logging.enable_progress_bar if was_enabled else datasets_logging.disable_progress_bar)()
    shards = [Path(entry["filename"]).name for entry in tokens.cache_files]
    lengths = np.asarray(tokens.data.column("length").to_numpy(), dtype=np.int64)
    kept = np.asarray(tokens.data.column("n_targets").to_numpy()) > 0
    del tokens, rows
    meta = {"format": FORMAT, "shards": shards, "examples": n, "kept": int(kept.sum()),
            "tokens": int(lengths[kept].sum()), "rows": parsed.key, "sources": parsed.meta["sources"],
            "task": parsed.meta["task"], "template": template, "max_seq_length": max_seq_length,
            "tokenizer": getattr(tokenizer, "name_or_path", ""), "processes": procs,
            "seconds": round(time.monotonic() - started, 1)}
    _finish(partial, folder, meta)
    print(f"poise: tokenize: {n:,} examples ({meta['tokens']:,} tokens, {n - meta['kept']:,} without a target) in "
          f"{meta['seconds']:.0f}s: {human_size(disk_size(folder))} cached in {folder} (set POISE_CACHE to keep "
          "poise's cache elsewhere)", file=sys.stderr, flush=True)
