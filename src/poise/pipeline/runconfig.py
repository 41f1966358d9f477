"""The run config of `poise run`: its top-level keys, and one section per stage whose keys are that stage's own
config class (less the fields the pipeline sets, per their metadata) plus the pipeline's own keys of that
section (`FeaturesPlan`, `SelectPlan`, `TrainPlan`, `EvaluatePlan`). Reading, overrides and every check that
needs no file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    setting,
)
from poise.errors import PoiseError, warn
from poise.options import TEMPLATES

#: The stages in the order they run (`--from` / `--until` take these names).
STAGES: tuple[str, ...] = ("data", "warmup", "features", "attribute", "select", "train", "evaluate", "report")
#: Stages that run on every rank under torchrun; the others run on rank 0.
DISTRIBUTED_STAGES = frozenset({"warmup", "features", "train"})
#: Method variants: `<method>-norm` / `<method>-raw` force column normalisation on or off (the ablations).
VARIANTS = {"norm": True, "raw": False}
#: `<method>-stratified`: a method that draws at random (random) draws equal shares per value of `select.stratify`.
STRATIFIED = "stratified"


# --------------------------------------------------------------------- the pipeline's own keys of a section
@dataclass
class FeaturesPlan:
    """Pipeline-only keys of the `features` section."""

    checkpoints: list[int] | None = setting(None, "warmup epochs whose checkpoints get features (default: all)")


@dataclass
class SelectPlan:
    """Pipeline-only keys of the `select` section."""

    methods: list[str] = setting(["bids", "task-max", "instance-max", "sum", "rds", "random"],
                                 "methods, each at every budget; <method>-norm / <method>-raw force normalisation; "
                                 "random-stratified: random with equal shares per value of select.stratify")
    budgets: list[str] = setting(["0.1"], "budgets: counts (4500) or fractions of the pool (0.1)")
    stratify: str | None = setting(None, "the pool field (e.g. dataset; a.b a nested key) whose values the "
                                         "random-stratified entries of methods draw equal shares of")


@dataclass
class TrainPlan:
    """Pipeline-only keys of the `train` section."""

    methods: list[str] = setting(["bids", "task-max", "random"], "the selections (of select.methods) to train on")
    seeds: list[int] | None = setting(None, "training seeds (LoRA init and data order), one run each "
                                            "(default: [seed])")
    full_pool: bool = setting(False, "also train on the whole pool (the reference row)")


@dataclass
class EvaluatePlan:
    """Pipeline-only keys of the `evaluate` section."""

    base: bool = setting(True, "also evaluate the base model")


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
#: The pipeline's own keys of a section.
PLANS: dict[str, type] = {"features": FeaturesPlan, "select": SelectPlan, "train": TrainPlan, "evaluate": EvaluatePlan}
#: Settings of a stage that the pipeline fills in (or takes from the top level): not allowed in its section.
#: Derived from each field's `pipeline` metadata (poise.config).
MANAGED: dict[str, set[str]] = {name: pipeline_set(cls) for name, cls in SECTIONS.items()}
#: Pipeline-only keys of a section: name -> (default, help), from the plans.
EXTRAS: dict[str, dict[str, tuple[Any, str]]] = {
    name: {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory(),  # type: ignore[misc]
                    f.metadata["help"]) for f in dataclasses.fields(plan)}
    for name, plan in PLANS.items()
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
        if key_name in MANAGED[name] and key_name not in EXTRAS.get(name, {}):
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
    """A pipeline-only key: its type from the section's plan, then what the type cannot say."""
    what = f"{where}: {section}.{key}"
    value = getattr(from_dict(PLANS[section], {key: value}, f"{where}: {section}"), key)
    if isinstance(value, list):
        if not value:
            raise PoiseError(f"{what}: expected a non-empty list")
        if len(set(value)) != len(value):
            raise PoiseError(f"{what}: {value} lists an entry twice")
        if key == "methods":
            for method in value:
                parse_method(method, what)
    if isinstance(value, str) and not value.strip():
        raise PoiseError(f"{what}: expected a name, got an empty one")
    return value


@dataclass(frozen=True)
class MethodEntry:
    """One entry of `select.methods`: the registered method and what its suffix asks for."""

    method: str
    normalize: bool | None = None  # -norm / -raw force normalisation on or off; None: the method's default
    stratified: bool = False  # -stratified: draw equal shares per value of select.stratify


def parse_method(entry: str, what: str) -> MethodEntry:
    """`bids` -> bids; `instance-max-norm` -> instance-max, normalised; `random-stratified` -> random,
    stratified (only a method that draws without reading the scores). Unknown names are an error."""
    from poise.selection import METHODS

    if entry in METHODS:
        return MethodEntry(entry)
    base, _, variant = entry.rpartition("-")
    if base in METHODS and variant in VARIANTS and METHODS[base].has_variants:
        return MethodEntry(base, normalize=VARIANTS[variant])
    if base in METHODS and variant == STRATIFIED:
        if METHODS[base].uses_scores:
            drawn = ", ".join(f"{m}-{STRATIFIED}" for m, method in METHODS.items() if not method.uses_scores)
            raise PoiseError(f"{what}: {entry!r}: only a method that draws at random can be stratified ({drawn}); "
                             f"{base} reads the scores")
        return MethodEntry(base, stratified=True)
    names = [*METHODS, *(f"{m}-{v}" for m, method in METHODS.items() if method.has_variants for v in VARIANTS),
             *(f"{m}-{STRATIFIED}" for m, method in METHODS.items() if not method.uses_scores)]
    raise PoiseError(f"{what}: unknown method {entry!r}{_closest(entry, names)}")


def split_method(entry: str, what: str) -> tuple[str, bool | None]:
    """`bids` -> (bids, None); `instance-max-norm` -> (instance-max, True); unknown names are an error
    (`parse_method` also says whether the entry is stratified)."""
    parsed = parse_method(entry, what)
    return parsed.method, parsed.normalize


def method_of(entry: str) -> Any:
    """The registry's record of a (checked) method entry such as `bids` or `instance-max-norm`."""
    from poise.selection import METHODS

    return METHODS[parse_method(entry, "select.methods").method]


def check_config(config: RunConfig, where: str) -> None:
    """Cross-section checks that need no files."""
    select, train = config.section("select"), config.section("train")
    missing = [m for m in train["methods"] if m not in select["methods"]]
    if missing:
        raise PoiseError(f"{where}: train.methods: {', '.join(missing)} not in select.methods "
                         f"({', '.join(select['methods'])})")
    stratified = [m for m in select["methods"] if parse_method(m, f"{where}: select.methods").stratified]
    if stratified and not select["stratify"]:
        verb = "needs" if len(stratified) == 1 else "need"
        raise PoiseError(f"{where}: select.methods: {', '.join(stratified)} {verb} select.stratify, the pool field "
                         "whose values get equal shares (e.g. stratify: dataset)")
    if select["stratify"] and not stratified:
        warn(f"{where}: select.stratify: {select['stratify']} is read only by a -stratified entry of select.methods "
             "(random-stratified), and there is none")
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


#: `poise run demo` (and `poise demo`): the config poise ships, on its demo data.
PACKAGED_CONFIGS = {"demo": Path(__file__).parent.parent / "configs" / "demo.yaml"}


def config_path(name: str | os.PathLike) -> Path:
    """A config file, or the name of a config poise ships (`demo`) when no such file exists."""
    path = Path(name)
    if not path.exists() and str(name) in PACKAGED_CONFIGS:
        return PACKAGED_CONFIGS[str(name)]
    return path
