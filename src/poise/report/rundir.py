"""A `poise run` directory as the report reads it: the resolved config (`config.yaml`), the state
(`pipeline.json`: each unit's stage, completeness and seconds, and the inputs the run read), the folders each
stage made, and the facts the report's header states (model, data, budgets, seeds, version, time per stage).

Folders are found through the units' records (a unit's name is its folder in the run directory), and files by
the names in `poise.files`, so the report does not restate the pipeline's layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise.config import read_yaml
from poise.errors import PoiseError
from poise.files import RUN_CONFIG_FILE, RUN_STATE_FILE
from poise.io import read_json
from poise.version import __version__

_RESOLVED_BY = re.compile(r"#\s*resolved by poise\s+(\S+)")


@dataclass
class RunRecord:
    """What a run directory records; every part is empty when its file is absent."""

    folder: Path
    config: dict[str, Any] = field(default_factory=dict)  # config.yaml: top-level keys and one section per stage
    units: dict[str, dict[str, Any]] = field(default_factory=dict)  # pipeline.json: unit name -> its record
    inputs: dict[str, Any] = field(default_factory=dict)  # pipeline.json: pool, pool_rows, validation, tasks, ...
    resolved_by: str | None = None  # the poise version that wrote config.yaml

    def section(self, stage: str) -> dict[str, Any]:
        """A stage's section of the resolved config ({} when absent)."""
        value = self.config.get(stage)
        return value if isinstance(value, dict) else {}

    def folders(self, stage: str, holding: str) -> list[Path]:
        """The folders of the stage's units that hold the file `holding`, in the order the units are recorded
        (the order they first ran)."""
        found = [self.folder / name for name, unit in self.units.items() if unit.get("stage") == stage]
        return [path for path in found if (path / holding).is_file()]

    def stage_seconds(self) -> list[tuple[str, float]]:
        """Per stage, the seconds its units took (each when it last ran), stages in the order they first ran."""
        spent: dict[str, float] = {}
        for unit in self.units.values():
            seconds = unit.get("seconds")
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and unit.get("stage"):
                spent[str(unit["stage"])] = spent.get(str(unit["stage"]), 0.0) + float(seconds)
        return list(spent.items())


def read_run(run_dir: str | Path, *, required: bool = True) -> RunRecord:
    """Read a run directory. With `required`, one that is missing or holds neither `config.yaml` nor
    `pipeline.json` is a PoiseError; without, it reads as empty. Invalid YAML is an error naming the line;
    an unreadable `pipeline.json` reads as no units."""
    folder = Path(run_dir)
    config_path, state_path = folder / RUN_CONFIG_FILE, folder / RUN_STATE_FILE
    if required and not folder.is_dir():
        raise PoiseError(f"run: {folder}: no such folder (a poise run directory)")
    if required and not (config_path.is_file() or state_path.is_file()):
        raise PoiseError(f"run: {folder}: not a poise run directory (no {RUN_CONFIG_FILE} or {RUN_STATE_FILE})")
    record = RunRecord(folder)
    if config_path.is_file():
        data = read_yaml(config_path)
        record.config = data if isinstance(data, dict) else {}
        with config_path.open(encoding="utf-8") as handle:
            match = _RESOLVED_BY.match(handle.readline())
        record.resolved_by = match.group(1) if match else None
    if state_path.is_file():
        try:
            state = read_json(state_path)
        except PoiseError:
            state = {}
        if isinstance(state, dict):
            units, inputs = state.get("units"), state.get("inputs")
            record.units = {str(k): v for k, v in units.items() if isinstance(v, dict)} \
                if isinstance(units, dict) else {}
            record.inputs = inputs if isinstance(inputs, dict) else {}
    return record


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"


def _join(values: Any) -> str:
    items = values if isinstance(values, list) else [values]
    return ", ".join(str(v) for v in items)


def _has(section: dict[str, Any], *keys: str) -> bool:
    return all(section.get(key) is not None for key in keys)


def run_facts(record: RunRecord) -> list[tuple[str, str]]:
    """The report header's (label, value) rows: what was run. Taken from `pipeline.json`'s inputs where it
    has them (the files the run read, after the demo data was built), else from `config.yaml`; a fact that
    neither file holds is left out."""
    config, inputs = record.config, record.inputs
    facts: list[tuple[str, str]] = [("run", str(record.folder))]
    if config.get("model"):
        facts.append(("model", str(config["model"])))
    pool = inputs.get("pool") or config.get("pool") or ("poise's demo data" if config.get("demo_data") else None)
    if pool:
        rows = inputs.get("pool_rows")
        facts.append(("pool", f"{pool} ({rows:,} rows)" if isinstance(rows, int) else str(pool)))
    validation = inputs.get("validation") or config.get("validation")
    tasks = inputs.get("tasks")
    if validation or tasks:
        listed = f"{len(tasks)} tasks: {_join(tasks)}" if isinstance(tasks, list) and tasks else ""
        facts.append(("validation", " - ".join(str(part) for part in (validation, listed) if part)))
    if "evaluation" in inputs or "evaluation" in config:
        facts.append(("held-out evaluation", str(inputs.get("evaluation") or config.get("evaluation") or "none")))
    if _has(config, "template", "max_seq_length"):
        facts.append(("sequences", f"template {config['template']}, at most {config['max_seq_length']} tokens"))
    warmup, features = record.section("warmup"), record.section("features")
    select, train = record.section("select"), record.section("train")
    if _has(warmup, "epochs"):
        part = f"{warmup['examples']} examples" if warmup.get("examples") else \
            f"{100 * float(warmup['fraction']):g}% of the pool" if _has(warmup, "fraction") else "the pool"
        facts.append(("warmup", f"{warmup['epochs']} epochs on {part}"))
    if _has(features, "projection", "dim"):
        facts.append(("features", f"{features['projection']} projection to {features['dim']} dimensions"))
    if _has(select, "methods") or _has(select, "budgets"):
        facts.append(("selection", "; ".join(f"{key} {_join(select[key])}" for key in ("methods", "budgets")
                                             if _has(select, key))))
    if _has(train, "methods"):
        epochs = f"; {train['epochs']} epochs" if _has(train, "epochs") else ""
        full = "; also the whole pool" if train.get("full_pool") else ""
        facts.append(("training", f"on {_join(train['methods'])}{full}{epochs}"))
    seeds = [(name, section.get(key)) for name, section, key in (
        ("warmup", warmup, "seed"), ("projection", features, "seed"),
        ("training", train, "seeds" if train.get("seeds") else "seed"), ("random selection", select, "seed"))]
    if any(value is not None for _, value in seeds):
        facts.append(("seeds", ", ".join(f"{name} {_join(value)}" for name, value in seeds if value is not None)))
    version = __version__ if record.resolved_by in (None, __version__) else \
        f"{__version__} (the run's config was resolved by poise {record.resolved_by})"
    facts.append(("poise", version))
    spent = record.stage_seconds()
    if spent:
        total = sum(seconds for _, seconds in spent)
        facts.append(("time per stage", ", ".join(f"{stage} {format_seconds(s)}" for stage, s in spent) +
                      f" (total {format_seconds(total)}; each unit when it last ran)"))
    return facts

