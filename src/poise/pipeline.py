"""`poise run`: every stage from one YAML config, into one run directory, resumable.

A run config names the model, the pool, the validation folder (one JSONL per task) and the held-out
evaluation folder (one JSONL per capability, the same task names), and holds one section per stage whose
keys are that stage's own settings (the same classes behind `poise warmup --help` and the others), less
the paths the pipeline fills in itself. The run directory gets

    data/ (only with `demo_data:`)   warmup/   features/<checkpoint>/{train,val}/   features/reps/{train,val}/
    attribution/   attribution-rds/   selections/<method>-<budget>/   training/<method>-<budget>[-seed<k>]/
    evaluation/<run>/   report/   config.yaml (the resolved config)   pipeline.json (what is done)

Each unit of work (one folder) has a fingerprint: its own settings plus the fingerprints of what it reads.
A rerun skips a unit whose fingerprint is unchanged and whose outputs are complete, continues one that
was interrupted (the stages resume themselves), and deletes and redoes one whose fingerprint changed, so a
changed setting reruns its stage and everything after it that depends on it, and nothing else.

Everything that can be checked without a model is checked first (unknown keys with the closest valid
one, missing files, budgets, empty tasks, method names, evaluation tasks without validation data and
the reverse). The stages share one model load and one tokenisation per data set (`shared_models`,
`tokenization_cache`). Under torchrun, warmup, features and training run on every rank and the rest on
rank 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from poise import distributed, provenance
from poise.config import (
    AttributeConfig,
    EvaluateConfig,
    FeaturesConfig,
    ReportConfig,
    SelectConfig,
    TrainConfig,
    WarmupConfig,
    from_dict,
    pipeline_set,
    read_yaml,
)
from poise.errors import PoiseError
from poise.io import atomic_write_json, atomic_write_text, read_json
from poise.options import TEMPLATES
from poise.version import __version__

#: The stages in the order they run (`--from` / `--until` take these names).
STAGES: tuple[str, ...] = ("data", "warmup", "features", "attribute", "select", "train", "evaluate", "report")
#: Stages that run on every rank under torchrun; the others run on rank 0.
DISTRIBUTED_STAGES = frozenset({"warmup", "features", "train"})
STATE_FILE = "pipeline.json"
CONFIG_FILE = "config.yaml"
#: Method variants: `<method>-norm` / `<method>-raw` force column normalisation on or off (the ablations).
VARIANTS = {"norm": True, "raw": False}

# ------------------------------------------------------------------------------------------ config
#: Top-level keys: what they are (for errors and the docs).
TOP_LEVEL: dict[str, str] = {
    "model": "base model: folder, hub id, .gguf file or smollm2-135m",
    "pool": "the training pool (any format poise reads)",
    "validation": "folder of validation JSONL files, one per task (the file name is the task)",
    "evaluation": "folder of held-out JSONL files, one per capability, the same names as validation (optional)",
    "out": "the run directory",
    "template": "how conversations are rendered, in every stage",
    "max_seq_length": "truncate every example to this many tokens, in every stage",
    "device": "cpu, cuda, mps ... for every stage",
    "dtype": "model dtype for every stage",
    "demo_data": "build poise's embedded demo data into <out>/data: {pool_size, validation_per_task, "
                 "heldout_per_task, seed}",
}
SECTIONS: dict[str, type] = {
    "warmup": WarmupConfig, "features": FeaturesConfig, "attribute": AttributeConfig, "select": SelectConfig,
    "train": TrainConfig, "evaluate": EvaluateConfig, "report": ReportConfig,
}
#: Settings of a stage that the pipeline fills in (or takes from the top level): not allowed in its section.
#: Derived from each field's `pipeline` metadata (poise.config).
MANAGED: dict[str, set[str]] = {name: pipeline_set(cls) for name, cls in SECTIONS.items()}
#: Pipeline-only keys of a section: name -> (default, help).
EXTRAS: dict[str, dict[str, tuple[Any, str]]] = {
    "features": {"checkpoints": (None, "warmup epochs whose checkpoints get features (default: all)")},
    "select": {"methods": (["bids", "task-max", "instance-max", "sum", "rds", "random"],
                           "methods, each at every budget; <method>-norm / <method>-raw force normalisation"),
               "budgets": (["0.1"], "budgets: counts (4500) or fractions of the pool (0.1)")},
    "train": {"methods": (["bids", "task-max", "random"], "the selections (of select.methods) to train on"),
              "seeds": (None, "training seeds (LoRA init and data order), one run each (default: [seed])"),
              "full_pool": (False, "also train on the whole pool (the reference row)")},
    "evaluate": {"base": (True, "also evaluate the base model")},
}
DEMO_DATA_KEYS = {"pool_size": 300, "validation_per_task": 8, "heldout_per_task": 20, "seed": 0}


@dataclass
class RunConfig:
    """`poise run`: the whole pipeline from one config (see the module docstring)."""

    model: str
    pool: str | None = None
    validation: str | None = None
    evaluation: str | None = None
    out: str = "runs/poise"
    template: str = "auto"
    max_seq_length: int = 2048
    device: str = "cpu"
    dtype: str = "float32"
    demo_data: dict | None = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """The section's keys with every default filled in (pipeline extras included)."""
        values = _defaults(name)
        values.update({k: _copy(v[0]) for k, v in EXTRAS.get(name, {}).items()})
        values.update(self.sections.get(name, {}))
        return values

    def to_yaml(self) -> str:
        data: dict[str, Any] = {k: getattr(self, k) for k in TOP_LEVEL}
        for name in SECTIONS:
            data[name] = self.section(name)
        return yaml.safe_dump(data, sort_keys=False)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _defaults(name: str) -> dict[str, Any]:
    """A section's defaults, from its stage class (whose required fields have no default of their own)."""
    cls = SECTIONS[name]
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in MANAGED[name]:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _closest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})"


def _allowed(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[name]) if f.name not in MANAGED[name]] + \
        list(EXTRAS.get(name, {}))


def parse_config(data: Any, where: str) -> RunConfig:
    """A `RunConfig` from a mapping; every key and value is checked, errors name `where` and the key."""
    if not isinstance(data, dict):
        raise PoiseError(f"{where}: expected a mapping of settings")
    known = [*TOP_LEVEL, *SECTIONS]
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise PoiseError(f"{where}: unknown key {key!r}{_closest(name, known)}")
        if name in SECTIONS:
            sections[name] = _parse_section(name, value or {}, where)
        else:
            top[name] = value
    if not top.get("model"):
        raise PoiseError(f"{where}: 'model' is required (a folder, hub id, .gguf file or smollm2-135m)")
    for key in ("model", "pool", "out", "template", "device", "dtype"):
        if key in top and top[key] is not None and not isinstance(top[key], str):
            raise PoiseError(f"{where}: {key}: expected text, got {top[key]!r}")
    for key in ("validation", "evaluation"):
        value = top.get(key)
        if value is not None and not isinstance(value, str):
            raise PoiseError(f"{where}: {key}: expected a folder (one JSONL file per task), got {value!r}")
    if "template" in top and top["template"] not in TEMPLATES:
        raise PoiseError(f"{where}: template must be one of {', '.join(TEMPLATES)}, got {top['template']!r}")
    if "max_seq_length" in top and (not isinstance(top["max_seq_length"], int) or top["max_seq_length"] < 2):
        raise PoiseError(f"{where}: max_seq_length: expected a whole number of at least 2")
    demo = top.get("demo_data")
    if demo is not None:
        if demo is True:
            demo = {}
        if not isinstance(demo, dict):
            raise PoiseError(f"{where}: demo_data: expected a mapping ({', '.join(DEMO_DATA_KEYS)})")
        for key, value in demo.items():
            if key not in DEMO_DATA_KEYS:
                raise PoiseError(f"{where}: demo_data: unknown key {key!r}{_closest(str(key), list(DEMO_DATA_KEYS))}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PoiseError(f"{where}: demo_data: {key}: expected a whole number, got {value!r}")
        top["demo_data"] = {**DEMO_DATA_KEYS, **demo}
        for key in ("pool", "validation", "evaluation"):
            if top.get(key):
                raise PoiseError(f"{where}: {key}: not with demo_data (the demo data provides it)")
    elif not top.get("pool"):
        raise PoiseError(f"{where}: 'pool' is required (or demo_data: to build the embedded demo data)")
    elif not top.get("validation"):
        raise PoiseError(f"{where}: 'validation' is required (a folder with one JSONL file per task)")
    config = RunConfig(**top, sections=sections)
    check_config(config, where)
    return config


def _parse_section(name: str, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PoiseError(f"{where}: {name}: expected a mapping of settings")
    allowed = _allowed(name)
    out: dict[str, Any] = {}
    for key, item in value.items():
        key_name = str(key).replace("-", "_")
        if key_name in MANAGED[name]:
            hint = " (set it at the top level)" if key_name in TOP_LEVEL else " (the pipeline sets it)"
            raise PoiseError(f"{where}: {name}.{key}: not a setting of a run config{hint}")
        if key_name not in allowed:
            raise PoiseError(f"{where}: unknown key {name}.{key}{_closest(key_name, allowed)}")
        out[key_name] = item
    extras = EXTRAS.get(name, {})
    stage_values = {k: v for k, v in out.items() if k not in extras}
    checked = from_dict(SECTIONS[name], stage_values, f"{where}: {name}")
    for k in stage_values:
        out[k] = getattr(checked, k)
    for k in extras:
        if k in out:
            out[k] = _check_extra(name, k, out[k], where)
    return out


def _check_extra(section: str, key: str, value: Any, where: str) -> Any:
    what = f"{where}: {section}.{key}"
    if key in ("methods", "budgets"):
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, (str, int, float)) for v in items):
            raise PoiseError(f"{what}: expected a non-empty list, got {value!r}")
        items = [str(v) for v in items]
        if key == "methods":
            for method in items:
                _split_method(method, what)
        if len(set(items)) != len(items):
            raise PoiseError(f"{what}: {items} lists an entry twice")
        return items
    if key in ("seeds", "checkpoints"):
        if value is None:
            return None
        items = [value] if isinstance(value, int) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in items):
            raise PoiseError(f"{what}: expected a list of whole numbers, got {value!r}")
        if len(set(items)) != len(items):
            raise PoiseError(f"{what}: {items} lists a number twice")
        return items
    if key in ("full_pool", "base"):
        if not isinstance(value, bool):
            raise PoiseError(f"{what}: expected true or false, got {value!r}")
        return value
    return value  # pragma: no cover


def _split_method(entry: str, what: str) -> tuple[str, bool | None]:
    """`bids` -> (bids, None); `instance-max-norm` -> (instance-max, True); unknown names are an error."""
    from poise.selection import METHODS

    if entry in METHODS:
        return entry, None
    base, _, variant = entry.rpartition("-")
    if base in METHODS and variant in VARIANTS and METHODS[base].has_variants:
        return base, VARIANTS[variant]
    names = [*METHODS, *(f"{m}-{v}" for m, method in METHODS.items() if method.has_variants for v in VARIANTS)]
    raise PoiseError(f"{what}: unknown method {entry!r}{_closest(entry, names)}")


def _method(entry: str) -> Any:
    from poise.selection import METHODS

    return METHODS[_split_method(entry, "select.methods")[0]]


def check_config(config: RunConfig, where: str) -> None:
    """Cross-section checks that need no files."""
    select, train = config.section("select"), config.section("train")
    missing = [m for m in train["methods"] if m not in select["methods"]]
    if missing:
        raise PoiseError(f"{where}: train.methods: {', '.join(missing)} not in select.methods "
                         f"({', '.join(select['methods'])})")
    if config.section("features")["checkpoints"] is not None:
        epochs = config.section("warmup")["epochs"]
        bad = [k for k in config.section("features")["checkpoints"] if not 1 <= k <= epochs]
        if bad:
            raise PoiseError(f"{where}: features.checkpoints: {bad} outside the warmup's epochs 1..{epochs}")
    for budget in select["budgets"]:
        _budget_shape(budget, f"{where}: select.budgets")


def _budget_shape(budget: str, what: str) -> None:
    try:
        number = float(budget)
    except ValueError:
        raise PoiseError(f"{what}: {budget!r} is not a number") from None
    if "." in budget or "e" in budget.lower():
        if not 0 < number <= 1:
            raise PoiseError(f"{what}: {budget} is a fraction of the pool and must lie in (0, 1]")
    elif number < 1:
        raise PoiseError(f"{what}: {budget} is a count and must be at least 1")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config file, apply `key.path=value` overrides (values in YAML syntax), check it."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise PoiseError(f"{path}: expected a mapping of settings")
    data = apply_overrides(data, overrides)
    # relative paths in the file are relative to the file's folder
    for key in ("pool", "validation", "evaluation"):
        if isinstance(data.get(key), str):
            data[key] = _relative_to(data[key], path.parent)
    return parse_config(data, str(path))


def _relative_to(value: str, folder: Path) -> str:
    """A relative input path is relative to the config file's folder when it exists there (`out` stays
    relative to where poise runs, as every other --out is)."""
    if os.path.isabs(value) or not (folder / value).exists() or Path(value).exists() and folder == Path("."):
        return value
    return str(folder / value)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """`select.budgets=[0.1,0.15]`, `warmup.epochs=2`, `out=runs/x`: set into a copy of `data`."""
    data = json.loads(json.dumps(data))
    for override in overrides:
        if "=" not in override:
            raise PoiseError(f"--set {override!r}: expected key.path=value")
        key, text = override.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise PoiseError(f"--set {override!r}: no key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        target = data
        for part in parts[:-1]:
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                raise PoiseError(f"--set {override!r}: {part} is not a section")
            target = target[part]
        target[parts[-1]] = value
    return data


# ------------------------------------------------------------------------------------------- inputs
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


def check_inputs(config: RunConfig, pool: str, validation: str, evaluation: str | None) -> Inputs:
    """Read and check every input file (no model): one error line naming the file or key."""
    from poise.data import read_examples
    from poise.evaluate import read_items
    from poise.selection.registry import parse_budget

    pool_path = Path(pool)
    if not pool_path.exists():
        raise PoiseError(f"pool: {pool}: no such file or folder")
    examples = read_examples(pool)
    if not examples:
        raise PoiseError(f"pool: {pool}: no examples")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise PoiseError(f"pool: {pool}: the id {twice!r} appears twice (rows must have unique ids)")
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
            parse_budget(budget, len(examples))
        except PoiseError as exc:
            raise PoiseError(f"select.budgets: {exc}") from None
    digests = {"pool": _digest_files([pool_path] if pool_path.is_file() else sorted(pool_path.rglob("*.*"))),
               "validation": _digest_files(val_files)}
    if eval_files:
        digests["evaluation"] = _digest_files(list(eval_files.values()))
    return Inputs(pool_path, len(examples), [validation], tasks, eval_files, digests)


# -------------------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One folder of the run: how to make it, what it depends on, and how to tell it is complete."""

    stage: str
    name: str  # folder relative to the run directory
    settings: dict[str, Any]
    needs: list[str]
    run: Callable[[], Any]
    done: Callable[[], bool]


def _fingerprint(unit: Unit, prints: dict[str, str], run: Path) -> str:
    return provenance.fingerprint(unit.settings, [prints[n] for n in unit.needs], run)


def _selection_name(method: str, budget: str) -> str:
    return f"{method}-{budget}"


def _training_name(selection: str, seed: int, seeds: Sequence[int]) -> str:
    return selection if len(seeds) == 1 else f"{selection}-seed{seed}"


def build_units(config: RunConfig, run: Path, inputs: Inputs) -> list[Unit]:
    """Every unit of the run in order (data excluded: it runs before the inputs can be checked)."""
    from poise.attribution import compute_attribution
    from poise.evaluate import run_evaluate
    from poise.features.stage import run_features
    from poise.selection.stage import run_select
    from poise.train import run_train
    from poise.warmup import run_warmup

    common = {"template": config.template, "max_seq_length": config.max_seq_length}
    units: list[Unit] = []

    # warmup
    warm = config.section("warmup")
    warm_config = from_dict(WarmupConfig, {**warm, **common, "model": config.model, "data": [str(inputs.pool)],
                                           "out": str(run / "warmup"), "device": config.device,
                                           "dtype": config.dtype}, "warmup")
    epochs = warm_config.epochs
    units.append(Unit("warmup", "warmup", {**_stable(warm_config), "pool": inputs.digests["pool"]}, [],
                      lambda: run_warmup(warm_config),
                      _complete(run / "warmup")))

    # features
    feat = config.section("features")
    chosen = feat.pop("checkpoints") or list(range(1, epochs + 1))
    select = config.section("select")
    methods = select["methods"]
    train_pairs: list[tuple[str, str]] = []
    val_pairs: list[tuple[str, str]] = []

    def features_unit(name: str, kind: str, data: list[str], checkpoint: Path | None, digest: str) -> Unit:
        fc = from_dict(FeaturesConfig, {**feat, **common, "data": data, "out": str(run / name),
                                        "checkpoint": str(checkpoint) if checkpoint else None, "model": config.model,
                                        "kind": kind, "device": config.device, "dtype": config.dtype}, name)
        return Unit("features", name, {**_stable(fc), "inputs": digest}, ["warmup"], lambda: run_features(fc),
                    _complete(run / name))

    for k in sorted(chosen):
        checkpoint = run / "warmup" / f"checkpoint-{k}"
        for split, kind, data, digest in (("train", "adam", [str(inputs.pool)], inputs.digests["pool"]),
                                          ("val", "sgd", inputs.validation, inputs.digests["validation"])):
            name = f"features/checkpoint-{k}/{split}"
            units.append(features_unit(name, kind, data, checkpoint, digest))
        train_pairs.append((f"features/checkpoint-{k}/train", f"features/checkpoint-{k}/val"))
    if any(_method(m).requires_kind == "rds" for m in methods):  # representation features for it
        last = run / "warmup" / f"checkpoint-{max(chosen)}"
        for split, data, digest in (("train", [str(inputs.pool)], inputs.digests["pool"]),
                                    ("val", inputs.validation, inputs.digests["validation"])):
            units.append(features_unit(f"features/reps/{split}", "reps", data, last, digest))
        val_pairs.append(("features/reps/train", "features/reps/val"))

    # attribution
    att = config.section("attribute")
    matrices: dict[str, str] = {}
    for name, pairs, rds in (("attribution", train_pairs, False), ("attribution-rds", val_pairs, True)):
        if not pairs:
            continue
        ac = from_dict(AttributeConfig, {**att, "train": [str(run / t) for t, _ in pairs],
                                         "val": [str(run / v) for _, v in pairs], "out": str(run / name),
                                         "rds": rds}, name)
        units.append(Unit("attribute", name, _stable(ac), [p for pair in pairs for p in pair],
                          _with_progress(compute_attribution, ac, "attribute", "rows"),
                          _complete(run / name)))
        matrices["rds" if rds else "influence"] = name

    # selections (random: one per training seed when there are several, so that its draw varies too)
    tr = config.section("train")
    seeds = tr.pop("seeds") or [tr["seed"]]
    picks_of: dict[str, str] = {}  # selection name (or name + "@seed") -> unit
    for method in methods:
        base, normalize = _split_method(method, "select.methods")
        matrix = matrices[_method(method).requires_kind or "influence"]
        seeded = not _method(method).uses_scores  # a draw: one per training seed when there are several
        draws = [(select["seed"] + k, f"-seed{seed}", f"@{seed}") for k, seed in enumerate(seeds)] \
            if seeded and len(seeds) > 1 else [(select["seed"], "", "")]
        for budget in select["budgets"]:
            for draw_seed, suffix, key in draws:
                name = f"selections/{_selection_name(method, budget)}{suffix}"
                sc = from_dict(SelectConfig, {
                    "seed": draw_seed if seeded else 0,  # only a draw's seed changes its picks
                    "tasks": select["tasks"],
                    "normalize": normalize if normalize is not None else select["normalize"],
                    "attribution": str(run / matrix), "method": base, "budget": budget, "out": str(run / name),
                    "pool": str(inputs.pool), "label": method}, name)
                units.append(Unit("select", name, {**_stable(sc), "pool": inputs.digests["pool"]}, [matrix],
                                  _with_progress(run_select, sc, f"select {method}", "steps"),
                                  _complete(run / name)))
                picks_of[_selection_name(method, budget) + key] = name

    # training
    trained: dict[str, tuple[str, str | None]] = {}  # evaluation label -> (training unit, selection unit)
    targets = [(m, b) for m in tr.pop("methods") for b in select["budgets"]]
    full_pool = tr.pop("full_pool")
    for seed in seeds:
        jobs = [(_selection_name(m, b), picks_of.get(f"{_selection_name(m, b)}@{seed}",
                                                     picks_of.get(_selection_name(m, b))))
                for m, b in targets]
        if full_pool:
            jobs.append(("full", None))
        for label, selection in jobs:
            name = f"training/{_training_name(label, seed, seeds)}"
            tc = from_dict(TrainConfig, {**tr, **common, "seed": seed, "model": config.model,
                                         "selection": str(run / selection / "selected.jsonl") if selection
                                         else str(inputs.pool), "out": str(run / name), "device": config.device,
                                         "dtype": config.dtype}, name)
            extra = {} if selection else {"pool": inputs.digests["pool"]}
            units.append(Unit("train", name, {**_stable(tc), **extra}, [selection] if selection else [],
                              lambda tc=tc: run_train(tc), _complete(run / name)))
            trained[_training_name(label, seed, seeds)] = (name, selection)

    # evaluation
    evaluations: list[str] = []
    ev = config.section("evaluate")
    if inputs.evaluation or ev.get("tasks"):  # local held-out files, lm-eval tasks, or both
        base = ev.pop("base")
        runs: list[tuple[str, str | None]] = ([("base", None)] if base else []) + \
            [(label, unit) for label, (unit, _) in trained.items()]
        for label, unit in runs:
            name = f"evaluation/{label}"
            ec = from_dict(EvaluateConfig, {**ev, "model": config.model, "out": str(run / name),
                                            "adapter": str(run / unit) if unit else None,
                                            "data": [str(p) for p in inputs.evaluation.values()], "label": label,
                                            "template": config.template, "device": config.device,
                                            "dtype": config.dtype}, name)
            units.append(Unit("evaluate", name, {**_stable(ec), "evaluation": inputs.digests.get("evaluation")},
                              [unit] if unit else [], lambda ec=ec: run_evaluate(ec),
                              _complete(run / name)))
            evaluations.append(name)

    # report
    rep = config.section("report")
    selections = list(picks_of.values())
    report_values = {**rep, "selections": [str(run / s) for s in selections + evaluations],
                     "title": rep["title"] if rep["title"] != "poise selection report" else f"poise run: {run.name}",
                     "out": str(run / "report"), "attribution": str(run / matrices["influence"])}
    report_values["validation"] = inputs.validation
    report_values["run"] = str(run)  # the header names the run's model, data and settings
    rc = from_dict(ReportConfig, report_values, "report")
    units.append(Unit("report", "report", {**_stable(rc), "validation": inputs.digests["validation"]},
                      selections + evaluations, lambda: _report(rc),
                      _complete(run / "report")))
    return units


def _stable(config: Any) -> dict[str, Any]:
    """A stage's settings as they enter a fingerprint: its result-affecting settings and paths (poise.provenance;
    execution-only settings such as device or batch sizes for lm-eval are left out, so they rerun nothing)."""
    return provenance.settings(config)


def _complete(folder: Path) -> Callable[[], bool]:
    """Whether the stage that owns `folder` marked it complete (poise.provenance)."""
    return lambda: provenance.is_complete(folder)


def _with_progress(function: Callable[..., Any], config: Any, description: str, unit: str) -> Callable[[], Any]:
    def call() -> Any:
        from poise.progress import callback

        with callback(description, unit) as update:
            return function(config, progress=update)

    return call


def _report(config: ReportConfig) -> Any:
    from poise.report import run_report

    return run_report(config)  # the run's summary is printed once at the end (summarize)


# ---------------------------------------------------------------------------------------------- run
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
        until: str | None = None) -> RunResult:
    """Run the pipeline (see the module docstring); returns what was done.

    `config` is a YAML file, a `RunConfig` or a mapping as in the file. `from_stage` reruns that stage and
    every later one even when up to date; `until` stops after that stage. `summarize` prints the outcome.
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
    state["inputs"] = {"pool": str(inputs.pool), "pool_rows": inputs.n_pool, "validation": str(validation),
                       "tasks": inputs.tasks, "evaluation": str(evaluation) if evaluation else None}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_FILE, f"# resolved by poise {__version__}\n" + config.to_yaml())
        note(f"run: {out}: {len(units)} units in {len(STAGES) - 1} stages; pool {inputs.n_pool} examples, "
             f"tasks {', '.join(inputs.tasks)}")

    from poise.data.templates import tokenization_cache
    from poise.model import shared_models

    prints = {}
    state["total_units"] = len(units) + (1 if config.demo_data is not None else 0)
    try:
        with shared_models(), tokenization_cache():
            reachable = [u for u in units if reached(u.stage)]
            _execute(reachable, prints, state, out, actions, forced)
    finally:
        distributed.shutdown()
    for unit in units:
        actions.setdefault(unit.name, "not reached")
    seconds = time.perf_counter() - started
    report = out / "report" / "report.html"
    return RunResult(out, actions, seconds, report if report.is_file() else None)


def _execute(units: list[Unit], prints: dict[str, str], state: dict[str, Any], out: Path,
             actions: dict[str, str], forced: Callable[[str], bool]) -> None:
    from poise.progress import note

    main = distributed.is_main()
    world = distributed.world_size()
    remaining_distributed = [i for i, u in enumerate(units) if u.stage in DISTRIBUTED_STAGES]
    last_distributed = remaining_distributed[-1] if remaining_distributed else -1
    for index, unit in enumerate(units):
        prints[unit.name] = _fingerprint(unit, prints, out)
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
    """Print what a run shows: the selection comparison (per task: THI share and mean normalised
    influence), the downstream table (runs x capabilities + macro-average + worst) and the report path."""
    from poise.matrix import load_attribution
    from poise.report import print_run_summary
    from poise.report.downstream import read_evaluation
    from poise.selection import read_selection

    run_dir = result.out
    counts: dict[str, int] = {}
    for action in result.actions.values():
        counts[action] = counts.get(action, 0) + 1
    console.print(f"[bold]poise run[/] {run_dir}: " + ", ".join(f"{n} {a}" for a, n in counts.items()) +
                  f" in {result.seconds:.0f}s")
    spent: dict[str, float] = {}
    for record in _read_state(run_dir)["units"].values():
        if record.get("seconds") is not None:
            spent[record["stage"]] = spent.get(record["stage"], 0.0) + float(record["seconds"])
    if spent:
        console.print("time per stage (when it last ran): " +
                      ", ".join(f"{stage} {spent[stage]:.0f}s" for stage in STAGES if stage in spent))
    selections = sorted((run_dir / "selections").glob("*/selection.json"))
    matrix = load_attribution(run_dir / "attribution") if (run_dir / "attribution" / "scores.npy").is_file() else None
    evaluations = [read_evaluation(p.parent) for p in _evaluation_order(run_dir)]
    metric = str(_resolved(run_dir).get("report", {}).get("metric", "nll"))
    print_run_summary(matrix, [read_selection(p.parent) for p in selections], evaluations, metric=metric,
                      console=console)
    if result.report is not None:
        console.print(f"report: {result.report}")


def _resolved(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _evaluation_order(run_dir: Path) -> list[Path]:
    """base first, then the runs in the order the selections were trained."""
    found = sorted((run_dir / "evaluation").glob("*/scores.json"))
    return sorted(found, key=lambda p: (p.parent.name != "base",))


#: `poise run demo` (and `poise demo`): the config poise ships, on its demo data.
PACKAGED_CONFIGS = {"demo": Path(__file__).parent / "configs" / "demo.yaml"}


def config_path(name: str | os.PathLike) -> Path:
    """A config file, or the name of a config poise ships (`demo`) when no such file exists."""
    path = Path(name)
    if not path.exists() and str(name) in PACKAGED_CONFIGS:
        return PACKAGED_CONFIGS[str(name)]
    return path
