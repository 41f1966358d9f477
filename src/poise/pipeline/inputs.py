"""The inputs of a run (pool, validation and held-out files), read and checked before any model is loaded, with
digests that enter the fingerprints of the units that read them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from poise.errors import PoiseError
from poise.pipeline.runconfig import RunConfig


@dataclass
class Inputs:
    """What the run reads, checked before any model is loaded."""

    pool: Path
    n_pool: int
    validation: list[str]
    tasks: list[str]
    evaluation: dict[str, Path]
    digests: dict[str, str]


def _digest_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.name).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _data_files(entries: Sequence[str], what: str) -> list[Path]:
    files: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json") and p.is_file())
            if not found:
                raise PoiseError(f"{what}: {path}: no .jsonl files (one per task)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PoiseError(f"{what}: {path}: no such file or folder")
    return files


def _check_strata(config: RunConfig, pool: Path) -> None:
    """With a `-stratified` method, every pool row has the `select.stratify` field (said now, not after the
    features)."""
    from poise.pipeline.runconfig import parse_method
    from poise.selection import count_pool_lines, pool_strata

    section = config.section("select")
    if not section["stratify"] or not any(parse_method(m, "select.methods").stratified for m in section["methods"]):
        return
    if not pool.is_file():
        raise PoiseError(f"select.stratify: the pool {pool} is not a file; a stratified selection reads the field "
                         "from a JSONL pool")
    try:
        lines = count_pool_lines(pool)
        pool_strata(pool, lines, section["stratify"], list(range(1, len(lines) + 1)))
    except PoiseError as exc:
        raise PoiseError(f"select.stratify: {exc}") from None


def check_inputs(config: RunConfig, pool: str, validation: str, evaluation: str | None) -> Inputs:
    """Read and check every input file (no model): one error line naming the file or key."""
    from poise.data import read_examples
    from poise.data.tokenized import parsed_rows
    from poise.evaluate import read_items
    from poise.selection.registry import parse_budget

    pool_path = Path(pool)
    if not pool_path.exists():
        raise PoiseError(f"pool: {pool}: no such file or folder")
    # parsed once into poise's cache (every row checked, ids unique), counted; warmup and features reuse it
    n_pool = len(parsed_rows([pool]))
    if not Path(validation).is_dir():
        raise PoiseError(f"validation: {validation}: not a folder (one JSONL file per task)")
    val_files = _data_files([validation], "validation")
    for file in val_files:
        if not read_examples(file):
            raise PoiseError(f"validation: {file}: no rows (task {file.stem!r} has no validation examples)")
    tasks = list(dict.fromkeys(str(e.task) for e in read_examples(validation)))
    eval_files: dict[str, Path] = {}
    if evaluation:
        if not Path(evaluation).is_dir():
            raise PoiseError(f"evaluation: {evaluation}: not a folder (one JSONL file per capability)")
        for file in _data_files([evaluation], "evaluation"):
            read_items(file)  # a missing answer or prompt is said here, naming the line
            eval_files[file.stem] = file
        only_eval = sorted(set(eval_files) - set(tasks))
        only_val = sorted(set(tasks) - set(eval_files))
        if only_eval:
            raise PoiseError(f"evaluation: {eval_files[only_eval[0]]}: task {only_eval[0]!r} has no validation file "
                             f"in {validation} (validation tasks: {', '.join(tasks)})")
        if only_val:
            raise PoiseError(f"validation: task {only_val[0]!r} has no held-out file in {evaluation} "
                             f"(expected {Path(evaluation) / (only_val[0] + '.jsonl')})")
    for budget in config.section("select")["budgets"]:
        try:
            parse_budget(budget, n_pool)
        except PoiseError as exc:
            raise PoiseError(f"select.budgets: {exc}") from None
    _check_strata(config, pool_path)
    digests = {"pool": _digest_files([pool_path] if pool_path.is_file() else sorted(pool_path.rglob("*.*"))),
               "validation": _digest_files(val_files)}
    if eval_files:
        digests["evaluation"] = _digest_files(list(eval_files.values()))
    return Inputs(pool_path, n_pool, [validation], tasks, eval_files, digests)
