"""The units of a run: one folder each, with how to make it, what it reads and how to tell it is complete.

One short function per stage adds that stage's units to a `_Plan` (what the earlier stages made, by name);
each builds the stage's own config class from its run config section, the top-level keys and the folders of
the units it reads. A unit's settings are its config's result-affecting settings (poise.provenance) plus the
digests of the input files it reads; whether its folder is complete is the stage's own word
(`provenance.is_complete`), so no unit names another stage's files. No method is special-cased here: what a
method needs (representations, a draw per seed) comes from the selection registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise import provenance
from poise.config import from_dict
from poise.errors import PoiseError
from poise.pipeline.inputs import Inputs
from poise.pipeline.runconfig import SECTIONS, RunConfig, method_of, split_method


@dataclass
class Unit:
    """One folder of the run: how to make it, what it depends on, and how to tell it is complete."""

    stage: str
    name: str  # folder relative to the run directory
    settings: dict[str, Any]
    needs: list[str]
    run: Callable[[], Any]
    done: Callable[[], bool]
    config: Any = None  # the stage's config (what `poise run --plan` estimates from)


@dataclass
class _Plan:
    """The units so far and what later stages read from them."""

    config: RunConfig
    run: Path
    inputs: Inputs
    units: list[Unit] = field(default_factory=list)
    epochs: int = 0
    feature_pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # matrix kind -> (train, val)
    matrices: dict[str, str] = field(default_factory=dict)  # matrix kind -> attribution unit
    picks: dict[str, str] = field(default_factory=dict)  # selection name (or name + "@seed") -> select unit
    trained: dict[str, str] = field(default_factory=dict)  # run label -> training unit
    evaluations: list[str] = field(default_factory=list)

    def stage_config(self, stage: str, section: dict[str, Any], name: str, **values: Any) -> Any:
        """The stage's config class from its section, the top-level keys the class has, and `values` (the folders
        it reads)."""
        cls = SECTIONS[stage]
        config = self.config
        top = {"model": config.model, "template": config.template, "max_seq_length": config.max_seq_length,
               "device": config.device, "dtype": config.dtype}
        fields = cls.__dataclass_fields__
        return from_dict(cls, {**section, **{k: v for k, v in top.items() if k in fields}, **values}, name)

    def add(self, stage: str, name: str, config: Any, needs: Sequence[str], work: Callable[[], Any],
            digests: dict[str, Any] | None = None) -> None:
        settings = {**provenance.settings(config), **(digests or {})}
        folder = self.run / name
        self.units.append(Unit(stage, name, settings, list(needs), work, lambda: provenance.is_complete(folder),
                               config))

    def folder(self, name: str) -> str:
        return str(self.run / name)


def build_units(config: RunConfig, run: Path, inputs: Inputs) -> list[Unit]:
    """Every unit of the run in order (data excluded: it runs before the inputs can be checked)."""
    plan = _Plan(config, run, inputs)
    for stage in (_warmup, _features, _attribute, _select, _train, _evaluate, _report):
        stage(plan)
    return _evaluations_after_their_training(plan.units)


def _evaluations_after_their_training(units: list[Unit]) -> list[Unit]:
    """The units with each evaluation moved to just after the training it reads (the base model's just before
    the first training), so a run stopped halfway holds whole results - trained and evaluated - for the seeds
    and methods it reached, rather than many trainings and no evaluation."""
    evaluations = [u for u in units if u.stage == "evaluate"]
    after: dict[str, list[Unit]] = {}
    for unit in evaluations:
        after.setdefault(unit.needs[-1] if unit.needs else "", []).append(unit)
    ordered: list[Unit] = []
    for unit in units:
        if unit.stage == "evaluate":
            continue
        if unit.stage == "train" and "" in after:
            ordered.extend(after.pop(""))
        ordered.append(unit)
        ordered.extend(after.pop(unit.name, []))
    ordered.extend(u for group in after.values() for u in group)  # none left unless nothing was trained
    report = [u for u in ordered if u.stage == "report"]
    return [u for u in ordered if u.stage != "report"] + report


def _warmup(plan: _Plan) -> None:
    from poise.warmup import run_warmup

    wc = plan.stage_config("warmup", plan.config.section("warmup"), "warmup", data=[str(plan.inputs.pool)],
                           out=plan.folder("warmup"))
    plan.epochs = wc.epochs
    plan.add("warmup", "warmup", wc, [], lambda: run_warmup(wc), {"pool": plan.inputs.digests["pool"]})


def _features(plan: _Plan) -> None:
    """Gradient features of the pool and the validation sets at each chosen checkpoint; representations when a
    selection method needs them: for `rds` at the last checkpoint (features.pooling), for `rds+` from the base
    model with RDS+'s position-weighted mean (no checkpoint, so they do not wait for the warmup)."""
    from poise.features.stage import run_features

    section = plan.config.section("features")
    chosen = sorted(section.pop("checkpoints") or range(1, plan.epochs + 1))
    inputs = plan.inputs
    data = {"train": ([str(inputs.pool)], inputs.digests["pool"]),
            "val": (inputs.validation, inputs.digests["validation"])}

    def add(name: str, kind: str, split: str, checkpoint: int | None, **values: Any) -> None:
        folder = plan.folder(f"warmup/checkpoint-{checkpoint}") if checkpoint is not None else None
        fc = plan.stage_config("features", section, name, data=data[split][0], out=plan.folder(name), kind=kind,
                               checkpoint=folder, **values)
        plan.add("features", name, fc, ["warmup"] if checkpoint is not None else [], lambda: run_features(fc),
                 {"inputs": data[split][1]})

    for k in chosen:
        for split, kind in (("train", "adam"), ("val", "sgd")):
            add(f"features/checkpoint-{k}/{split}", kind, split, k)
        plan.feature_pairs.setdefault("influence", []).append((f"features/checkpoint-{k}/train",
                                                               f"features/checkpoint-{k}/val"))
    kinds = {method_of(m).requires_kind for m in plan.config.section("select")["methods"]}
    if "rds" in kinds:
        if section["pooling"] == "weighted-mean":
            raise PoiseError("features.pooling=weighted-mean makes an rds+ matrix, which the rds method refuses; "
                             "select rds+ instead of rds, or set features.pooling to last or mean")
        for split in ("train", "val"):
            add(f"features/reps/{split}", "reps", split, chosen[-1])
        plan.feature_pairs["rds"] = [("features/reps/train", "features/reps/val")]
    if "rds+" in kinds:
        for split in ("train", "val"):
            add(f"features/reps-rds+/{split}", "reps", split, None, pooling="weighted-mean")
        plan.feature_pairs["rds+"] = [("features/reps-rds+/train", "features/reps-rds+/val")]


def _attribute(plan: _Plan) -> None:
    from poise.attribution import compute_attribution

    section = plan.config.section("attribute")
    for kind, pairs in plan.feature_pairs.items():
        name = "attribution" if kind == "influence" else f"attribution-{kind}"
        ac = plan.stage_config("attribute", section, name, train=[plan.folder(t) for t, _ in pairs],
                               val=[plan.folder(v) for _, v in pairs], out=plan.folder(name),
                               rds=kind != "influence")
        plan.add("attribute", name, ac, [p for pair in pairs for p in pair],
                 _with_progress(compute_attribution, ac, "attribute", "rows"))
        plan.matrices[kind] = name


def _select(plan: _Plan) -> None:
    """Each method at each budget; a method that draws (random) draws once per training seed when there are
    several, so that its draw varies with the seed too; a `-stratified` entry draws by `select.stratify`."""
    from poise.pipeline.runconfig import parse_method
    from poise.selection.stage import run_select

    section = plan.config.section("select")
    seeds = _seeds(plan)
    for entry in section["methods"]:
        base, normalize = split_method(entry, "select.methods")
        stratified = parse_method(entry, "select.methods").stratified
        method = method_of(entry)
        matrix = plan.matrices[method.requires_kind or "influence"]
        draws = [(section["seed"] + k, f"-seed{seed}", f"@{seed}") for k, seed in enumerate(seeds)] \
            if not method.uses_scores and len(seeds) > 1 else [(section["seed"], "", "")]
        for budget in section["budgets"]:
            for seed, suffix, key in draws:
                name = f"selections/{entry}-{budget}{suffix}"
                sc = plan.stage_config("select", {}, name, method=base, budget=budget, label=entry,
                                       seed=seed if not method.uses_scores else 0,  # only a draw's seed matters
                                       tasks=section["tasks"], attribution=plan.folder(matrix),
                                       normalize=section["normalize"] if normalize is None else normalize,
                                       out=plan.folder(name), pool=str(plan.inputs.pool),
                                       stratify=section["stratify"] if stratified else None)
                plan.add("select", name, sc, [matrix], _with_progress(run_select, sc, f"select {entry}", "steps"),
                         {"pool": plan.inputs.digests["pool"]})
                plan.picks[f"{entry}-{budget}{key}"] = name


def _train(plan: _Plan) -> None:
    """LoRA fine-tuning on each trained method's selection at each budget (and the whole pool), per seed."""
    from poise.train import run_train

    section = plan.config.section("train")
    seeds = _seeds(plan)
    methods, full_pool = section.pop("methods"), section.pop("full_pool")
    section.pop("seeds")
    targets = [f"{m}-{b}" for m in methods for b in plan.config.section("select")["budgets"]]
    for seed in seeds:
        jobs: list[tuple[str, str | None]] = [(t, plan.picks.get(f"{t}@{seed}", plan.picks.get(t))) for t in targets]
        if full_pool:
            jobs.append(("full", None))
        for label, selection in jobs:
            run_label = label if len(seeds) == 1 else f"{label}-seed{seed}"
            name = f"training/{run_label}"
            tc = plan.stage_config("train", section, name, seed=seed, out=plan.folder(name),
                                   selection=plan.folder(selection) if selection else str(plan.inputs.pool))
            plan.add("train", name, tc, [selection] if selection else [], lambda tc=tc: run_train(tc),
                     {} if selection else {"pool": plan.inputs.digests["pool"]})
            plan.trained[run_label] = name


def _evaluate(plan: _Plan) -> None:
    """The base model and every training, on the local held-out files and/or lm-eval tasks."""
    from poise.evaluate import run_evaluate

    section = plan.config.section("evaluate")
    base = section.pop("base")
    if not (plan.inputs.evaluation or section.get("tasks")):
        return
    runs: list[tuple[str, str | None]] = ([("base", None)] if base else []) + list(plan.trained.items())
    for label, unit in runs:
        name = f"evaluation/{label}"
        ec = plan.stage_config("evaluate", section, name, out=plan.folder(name), label=label,
                               adapter=plan.folder(unit) if unit else None,
                               data=[str(p) for p in plan.inputs.evaluation.values()])
        plan.add("evaluate", name, ec, [unit] if unit else [], lambda ec=ec: run_evaluate(ec),
                 {"evaluation": plan.inputs.digests.get("evaluation")})
        plan.evaluations.append(name)


def _report(plan: _Plan) -> None:
    from poise.report import run_report

    section = plan.config.section("report")
    selections = list(plan.picks.values())
    title = section.pop("title")
    rc = plan.stage_config("report", section, "report", out=plan.folder("report"),
                           selections=[plan.folder(s) for s in selections + plan.evaluations],
                           title=title if title != "poise selection report" else f"poise run: {plan.run.name}",
                           attribution=plan.folder(plan.matrices["influence"]), validation=plan.inputs.validation,
                           run=str(plan.run))  # the header names the run's model, data and settings
    plan.add("report", "report", rc, selections + plan.evaluations, lambda: run_report(rc),
             {"validation": plan.inputs.digests["validation"]})


def _seeds(plan: _Plan) -> list[int]:
    section = plan.config.section("train")
    return list(section["seeds"] or [section["seed"]])


def _with_progress(function: Callable[..., Any], config: Any, description: str, unit: str) -> Callable[[], Any]:
    def call() -> Any:
        from poise.progress import callback

        with callback(description, unit) as update:
            return function(config, progress=update)

    return call
