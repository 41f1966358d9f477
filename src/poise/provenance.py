"""The provenance of every output folder: the one module that writes, reads and compares `arguments.json`.

Every stage (warmup, features, attribute, select, train, import-checkpoint, evaluate, report) opens its output
folder through `open_folder` before any expensive work and marks it complete through `mark_complete` at the
end; the pipeline asks `is_complete` and takes its fingerprints from `settings` and `fingerprint`. So a
folder made with other settings is refused the same way everywhere (every differing key with both values,
unless `overwrite`), the same settings resume, and what "the same settings" means comes from one place: the
role each config field declares in its metadata (poise.config: result, path, execution, output).

`arguments.json` holds: the stage, the poise version, when the folder was opened and completed, the settings
that determine the result (`settings`: compared), every argument as given (`arguments`: for the reader),
`complete`, and whatever the stage adds (`info`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise import distributed
from poise.config import field_role, to_dict, validate
from poise.errors import PoiseError
from poise.files import ARGUMENTS_FILE
from poise.io import atomic_write_json, read_json
from poise.version import __version__


def settings(config: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What determines a folder's result: every field whose role is `result` or `path` (a path that exists is
    made absolute, so the same file named from another folder is the same setting), plus `extra` (what the
    stage derives and must match too). Execution-only fields and the output folder itself are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        role = field_role(f)
        if role in ("execution", "output"):
            continue
        value = getattr(config, f.name)
        out[f.name] = _absolute(value) if role == "path" else value
    out.update(extra or {})
    return json.loads(json.dumps(out, default=str))  # as it reads back from the file (tuples become lists)


def _absolute(value: Any) -> Any:
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        if path.exists():
            return str(path.resolve())
    return value


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key whose value differs (a missing key reads as None)."""
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def stored(folder: str | Path) -> dict[str, Any] | None:
    """The folder's `arguments.json`, or None when it has none (or an unreadable one)."""
    path = Path(folder) / ARGUMENTS_FILE
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except PoiseError:
        return None
    return record if isinstance(record, dict) else None


def is_complete(folder: str | Path) -> bool:
    """Did the stage that owns `folder` finish it (`mark_complete`)?"""
    record = stored(folder)
    return bool(record and record.get("complete"))


@dataclass
class Opened:
    """An output folder opened for a stage: its settings, and what was there before."""

    folder: Path
    stage: str
    settings: dict[str, Any]
    resumed: bool  # it holds work made with the same settings (maybe incomplete): continue it
    complete: bool  # ... and that work is complete: nothing to do


def open_folder(out: str | Path | None, stage: str, config: Any, *, extra: dict[str, Any] | None = None,
                collective: bool = False) -> Opened:
    """Check `config` (required fields, choices, ranges) and open its output folder `out` for `stage`.

    - A folder made (by any stage) with other settings is refused, naming every differing key with both of its
      values, unless the config's `overwrite`: then its contents are deleted and it starts over. `extra`: what
      the stage derives and must match too (see `settings`).
    - A non-empty folder without `arguments.json` (not made by poise) is refused unless `overwrite`; with it,
      the stage writes its files among the ones there.
    - The same settings resume: the folder is kept, and `complete` says whether the stage had finished it.
    - A folder that holds nothing but an incomplete `arguments.json` (opened, then stopped by an input error)
      counts as empty.
    Rank 0 writes `arguments.json` (not complete) before the stage does any work. `collective`: every rank of a
    torchrun group calls this (warmup, features, train), so they meet at barriers around rank 0's changes; the
    stages that run on rank 0 alone (attribute, select, evaluate, report) leave it False.
    """
    validate(config)
    if out is None or str(out) == "":
        raise PoiseError(f"{type(config).__name__}.out is required (the output folder)")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise PoiseError(f"{folder}: is a file, not a folder (out must be a folder)")
    overwrite = bool(getattr(config, "overwrite", False))
    new = settings(config, extra)
    record = stored(folder)
    # a key missing from an older folder reads as None: a setting added since, at its "off" default, matches it
    same = record is not None and record.get("stage") == stage and not differences(record.get("settings") or {}, new)
    abandoned = record is not None and not same and not record.get("complete") and _holds_only_arguments(folder)
    if abandoned:  # opened before, but no work done (an input error stopped it): nothing to keep
        record = None
    if record is not None and not same and not overwrite:
        if record.get("stage") != stage:
            raise PoiseError(f"{folder}: was made by poise {record.get('stage')}, not {stage}; use another output "
                             "folder or overwrite")
        changed = "; ".join(differences(record.get("settings") or {}, new))
        raise PoiseError(f"{folder}: made by poise {stage} with other settings ({changed}); use another output "
                         "folder or overwrite")
    if record is None and not abandoned and folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise PoiseError(f"{folder}: not empty and not made by poise {stage} (no {ARGUMENTS_FILE}); use another "
                         "output folder or overwrite")
    resume = same and not overwrite
    complete = resume and bool(record and record.get("complete"))
    if collective:
        distributed.barrier()  # every rank has read the folder before rank 0 changes it
    if distributed.is_main() and not resume:
        if record is not None and folder.is_dir():  # made by poise: start over
            shutil.rmtree(folder)
        elif folder.is_dir():
            (folder / ARGUMENTS_FILE).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / ARGUMENTS_FILE, {
            "stage": stage, "poise_version": __version__, "opened": _now(), "complete": False,
            "settings": new, "arguments": to_dict(config), "info": {},
        })
    if collective:
        distributed.barrier()
    return Opened(folder, stage, new, resume, complete)


def _holds_only_arguments(folder: Path) -> bool:
    return all(item.name == ARGUMENTS_FILE or item.name.startswith(f".{ARGUMENTS_FILE}.") for item in folder.iterdir())


def update(folder: str | Path, **info: Any) -> None:
    """Add to the folder's `info` (rank 0; the folder must have been opened)."""
    _rewrite(folder, {}, info)


def mark_complete(folder: str | Path, **info: Any) -> None:
    """The stage finished `folder`: rank 0 records it (with `info`), after every output file is in place."""
    _rewrite(folder, {"complete": True, "completed": _now(), "poise_version": __version__}, info)


def _rewrite(folder: str | Path, changes: dict[str, Any], info: dict[str, Any]) -> None:
    if not distributed.is_main():
        return
    record = stored(folder)
    if record is None:
        raise PoiseError(f"{folder}: has no {ARGUMENTS_FILE} (open_folder first)")
    record.update(changes)
    record["info"] = {**(record.get("info") or {}), **info}
    atomic_write_json(Path(folder) / ARGUMENTS_FILE, record)


def fingerprint(unit_settings: dict[str, Any], needs: Sequence[str], run: Path) -> str:
    """A pipeline unit's fingerprint: its settings and the fingerprints of what it reads. Paths inside the run
    directory count relative to it, so a run directory that was moved or copied is still up to date."""
    payload = json.dumps({"settings": unit_settings, "needs": list(needs)}, sort_keys=True, default=str)
    for prefix in sorted({str(run.resolve()), str(run)}, key=len, reverse=True):
        payload = payload.replace(json.dumps(prefix)[1:-1] + "/", "<run>/").replace(json.dumps(prefix), '"<run>"')
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
