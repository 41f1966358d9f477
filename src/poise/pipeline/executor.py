"""The executor of `poise run`: units in order, each skipped when up to date (its fingerprint unchanged and its
folder complete), continued when interrupted, or deleted and redone when its fingerprint changed; the run's
state in `pipeline.json`; torchrun (warmup, features and training on every rank, the rest on rank 0)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise import distributed, provenance
from poise.errors import PoiseError
from poise.files import REPORT_FILE
from poise.files import RUN_CONFIG_FILE as CONFIG_FILE
from poise.files import RUN_STATE_FILE as STATE_FILE
from poise.io import atomic_write_json, atomic_write_text, read_json
from poise.pipeline.inputs import check_inputs
from poise.pipeline.runconfig import (
    DISTRIBUTED_STAGES,
    STAGES,
    RunConfig,
    _closest,
    apply_overrides,
    check_config,
    config_path,
    load_config,
    parse_config,
)
from poise.pipeline.units import Unit, build_units
from poise.version import __version__


@dataclass
class RunResult:
    """What `run` did: the run directory and, per unit, `ran`, `resumed`, `skipped` or `not reached`."""

    out: Path
    actions: dict[str, str]
    seconds: float
    report: Path | None = None


def _read_state(run: Path) -> dict[str, Any]:
    path = run / STATE_FILE
    if not path.is_file():
        return {"units": {}}
    try:
        state = read_json(path)
    except PoiseError:
        return {"units": {}}
    return state if isinstance(state.get("units"), dict) else {"units": {}}


def _write_state(run: Path, state: dict[str, Any]) -> None:
    if distributed.is_main():
        atomic_write_json(run / STATE_FILE, state)


def _stage_index(name: str | None, flag: str) -> int | None:
    if name is None:
        return None
    if name not in STAGES:
        raise PoiseError(f"{flag} {name!r}: not a stage{_closest(name, STAGES)}")
    return STAGES.index(name)


def run(config: str | os.PathLike | RunConfig | dict, *, overrides: Sequence[str] = (), from_stage: str | None = None,
        until: str | None = None, plan: bool = False) -> RunResult:
    """Run the pipeline (see the module docstring); returns what was done.

    `config` is a YAML file, a `RunConfig` or a mapping as in the file. `from_stage` reruns that stage and
    every later one even when up to date; `until` stops after that stage. `summarize` prints the outcome.
    `plan` prints what would run (tokens, disk, time per stage: `estimate.py`) and runs nothing.
    """
    from poise.progress import note

    started = time.perf_counter()
    if isinstance(config, RunConfig):
        if overrides:
            raise PoiseError("overrides apply to a config file or mapping, not to a RunConfig object")
        check_config(config, "config")
    elif isinstance(config, dict):
        config = parse_config(apply_overrides(config, overrides), "config")
    else:
        config = load_config(config_path(config), overrides)
    first = _stage_index(from_stage, "--from")
    last = _stage_index(until, "--until")
    if first is not None and last is not None and first > last:
        raise PoiseError(f"--from {from_stage} comes after --until {until}")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise PoiseError(f"out: {out} is a file, not a folder")
    distributed.init(config.device)
    main = distributed.is_main()
    state = _read_state(out)
    distributed.barrier()  # every rank has read the state before rank 0 changes it
    actions: dict[str, str] = {}

    def forced(stage: str) -> bool:
        return first is not None and STAGES.index(stage) >= first

    def reached(stage: str) -> bool:
        return last is None or STAGES.index(stage) <= last

    # data (the demo data), before the inputs can be checked
    pool, validation, evaluation = config.pool, config.validation, config.evaluation
    if config.demo_data is not None:
        data_dir = out / "data"
        data_unit = Unit("data", "data", dict(config.demo_data), [], lambda: _demo_data(config, data_dir),
                         lambda: (data_dir / "pool.jsonl").is_file())
        prints: dict[str, str] = {}
        if main:
            out.mkdir(parents=True, exist_ok=True)
        _execute([data_unit], prints, state, out, actions, forced)
        distributed.barrier()
        pool, validation, evaluation = (str(data_dir / "pool.jsonl"), str(data_dir / "validation"),
                                        str(data_dir / "heldout"))
        if not reached("data"):
            return RunResult(out, actions, time.perf_counter() - started)
    inputs = check_inputs(config, pool, validation, evaluation)  # type: ignore[arg-type]
    units = build_units(config, out, inputs)
    if plan:
        from rich.console import Console

        from poise.pipeline.estimate import estimate_units, print_plan

        planned = [u for u in units if reached(u.stage)]
        estimates, speed = estimate_units(config, inputs, planned)
        done = {u.name for u in planned if u.done() and not forced(u.stage)}
        print_plan(estimates, speed, Console(stderr=False), done)
        return RunResult(out, {u.name: "planned" for u in planned}, time.perf_counter() - started)
    state["inputs"] = {"pool": str(inputs.pool), "pool_rows": inputs.n_pool, "validation": str(validation),
                       "tasks": inputs.tasks, "evaluation": str(evaluation) if evaluation else None}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_FILE, f"# resolved by poise {__version__}\n" + config.to_yaml())
        note(f"run: {out}: {len(units)} units in {len(STAGES) - 1} stages; pool {inputs.n_pool} examples, "
             f"tasks {', '.join(inputs.tasks)}")

    from poise.model import shared_models

    prints = {}
    state["total_units"] = len(units) + (1 if config.demo_data is not None else 0)
    try:
        with shared_models():
            reachable = [u for u in units if reached(u.stage)]
            _execute(reachable, prints, state, out, actions, forced)
    finally:
        distributed.shutdown()
    for unit in units:
        actions.setdefault(unit.name, "not reached")
    seconds = time.perf_counter() - started
    report = out / "report" / REPORT_FILE
    return RunResult(out, actions, seconds, report if report.is_file() else None)


def _execute(units: list[Unit], prints: dict[str, str], state: dict[str, Any], out: Path,
             actions: dict[str, str], forced: Callable[[str], bool]) -> None:
    from poise.progress import note

    main = distributed.is_main()
    world = distributed.world_size()
    remaining_distributed = [i for i, u in enumerate(units) if u.stage in DISTRIBUTED_STAGES]
    last_distributed = remaining_distributed[-1] if remaining_distributed else -1
    for index, unit in enumerate(units):
        prints[unit.name] = provenance.fingerprint(unit.settings, [prints[n] for n in unit.needs], out)
        record = state["units"].get(unit.name) or {}
        same = record.get("fingerprint") == prints[unit.name]
        folder = out / unit.name
        if same and record.get("complete") and not forced(unit.stage) and unit.done():
            actions[unit.name] = "skipped"
            continue
        if world > 1 and unit.stage not in DISTRIBUTED_STAGES and not main:
            if index > last_distributed:
                actions[unit.name] = "rank 0"
                continue
            distributed.barrier()  # wait for rank 0's unit
            actions[unit.name] = "rank 0"
            continue
        stale = bool(record and not same) or forced(unit.stage)
        together = unit.stage in DISTRIBUTED_STAGES and world > 1
        if stale and folder.exists():
            if together:
                distributed.barrier()
            if main:
                shutil.rmtree(folder)
                note(f"{unit.name}: {'rerun asked' if forced(unit.stage) else 'settings changed'}; "
                     "starting it over")
            if together:
                distributed.barrier()
        resumed = same and folder.exists() and not forced(unit.stage)
        state["units"][unit.name] = {"stage": unit.stage, "fingerprint": prints[unit.name], "complete": False}
        _write_state(out, state)
        started = time.perf_counter()
        if main:
            note(f"{unit.name}: {'resuming' if resumed else 'running'}")
        unit.run()
        if not unit.done():
            if main or unit.stage in DISTRIBUTED_STAGES:
                raise PoiseError(f"{folder}: the {unit.stage} stage finished but its outputs are incomplete")
        state["units"][unit.name].update(complete=True, seconds=round(time.perf_counter() - started, 1))
        _write_state(out, state)
        actions[unit.name] = "resumed" if resumed else "ran"
        if main:
            note(f"{unit.name}: done in {time.perf_counter() - started:.1f}s")
        if world > 1 and unit.stage not in DISTRIBUTED_STAGES and index <= last_distributed:
            distributed.barrier()  # release the ranks waiting for this unit


def _demo_data(config: RunConfig, folder: Path) -> None:
    from poise.data.demo import write_demo_data

    if distributed.is_main():
        if folder.exists():
            shutil.rmtree(folder)
        write_demo_data(folder, **config.demo_data)  # type: ignore[arg-type]


def summarize(result: RunResult, console: Any) -> None:
    """Print what a run shows (poise.report.summarize_run): the selection comparison, the downstream table and
    the report path."""
    from poise.report import summarize_run

    summarize_run(result.out, result.actions, result.seconds, console)
