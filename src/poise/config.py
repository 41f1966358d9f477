"""One typed settings class per stage, behind the YAML file, the CLI flags and the Python API.

Each field's metadata carries its help text and its **role**, from which everything else is derived:

- `result` (the default): it changes the stage's output, so it is saved beside the output, compared when the
  folder is reopened (poise.provenance) and part of the pipeline's fingerprint;
- `path`: an input file or folder; like `result` (an existing path counts absolute);
- `execution`: how the work is done, not what it gives (device, micro-batch sizes, overwrite): never compared,
  never fingerprinted, so changing it reruns nothing;
- `output`: the output folder itself.

`pipeline` says whether `poise run` sets the field: "top" (from the run config's top level: model, template,
...) or "set" (the pipeline fills it in: paths between stages, the method of each selection, ...); such fields
are not allowed in a run config's stage section. `required`, `choices` and the range `low`/`high` are checked
by `validate`, which every stage calls before any work; its errors name the class and the field (the Python
API has no flags). `cli.py` turns the dataclass into flags, `load_yaml` fills it from a file (unknown keys are
an error naming the file and key).

How to add a stage setting: add one field to the stage's class with its help text, and a role unless it is
`result`. The CLI flag, the YAML key, the run config key, the refusal of a folder made with another value and
the pipeline's rerun all follow from it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from poise.errors import PoiseError
from poise.options import (
    ADAM_FORMULAS,
    DTYPES,
    FEATURE_KINDS,
    LR_SCHEDULERS,
    POOLINGS,
    PROJECTIONS,
    SELECTION_METHODS,
    STORE_DTYPES,
    TEMPLATES,
    AdamFormula,
    DType,
    FeatureKind,
    LRScheduler,
    Pooling,
    Projection,
    SelectionMethod,
    StoreDtype,
    Template,
)

ROLES = ("result", "path", "execution", "output")
"""The roles of a config field (see the module docstring)."""


def _f(default: Any, help: str, role: str = "result", **meta: Any) -> Any:
    """A config field: its default, help text, role (see the module docstring) and checks (`required`, `choices`,
    `low`, `high`, `low_open`)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "role": role, **meta})
    return field(default=default, metadata={"help": help, "role": role, **meta})


setting = _f  # the public name, for config classes outside this module (the pipeline's own sections)


def field_role(f: dataclasses.Field) -> str:
    """result, path, execution or output (see the module docstring)."""
    return str(f.metadata.get("role", "result"))


def pipeline_set(cls: type) -> set[str]:
    """The fields of a stage class that `poise run` sets itself (not allowed in a run config's section)."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("pipeline")}


def validate(config: Any) -> None:
    """Required fields are given, choices are among the allowed ones, numbers lie in their range; the error
    names the class and the field."""
    name = type(config).__name__
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("required") and (value is None or value == "" or value == []):
            raise PoiseError(f"{name}.{f.name} is required ({f.metadata.get('help', '')})")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise PoiseError(f"{name}.{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if value is None or (low is None and high is None):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise PoiseError(f"{name}.{f.name}: expected a number, got {value!r}")
        low_open = f.metadata.get("low_open", False)
        if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
            interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise PoiseError(f"{name}.{f.name} must be in {interval}, got {value!r}")


@dataclass
class MatrixConfig:
    """Where the attribution matrix comes from (shared by select and report)."""

    attribution: str | None = _f(None, "a poise attribution folder (scores.npy + columns.jsonl + rows.jsonl)",
                                 role="path", pipeline="set")
    scores: str | None = _f(None, "scores file: .npy, .safetensors or weights-only torch .pt (N_train x N_val)",
                            role="path", pipeline="set")
    columns: str | None = _f(None, "JSONL, one {\"id\", \"task\"} per validation column (with --scores)",
                             role="path", pipeline="set")
    rows: str | None = _f(None, "JSONL, one {\"id\"} per training row (optional)", role="path", pipeline="set")


@dataclass
class SelectConfig(MatrixConfig):
    """`poise select`: choose a budgeted subset of the pool."""

    method: SelectionMethod = _f("bids", "selection method", choices=SELECTION_METHODS, pipeline="set")
    budget: str = _f("0.15", "a whole number is a count (4500); a number with a point in (0, 1] a fraction (0.15)",
                     pipeline="set")
    out: str | None = _f(None, "output folder (selection.json, selected.jsonl)", required=True,
                         role="output", pipeline="set")
    pool: str | None = _f(None, "the pool JSONL, in matrix row order: writes its lines in pick order",
                          role="path", pipeline="set")
    seed: int = _f(0, "random seed (method 'random')")
    stratify: str | None = _f(None, "method random: equal shares per value of this pool field, e.g. dataset "
                              "(balanced random; a.b reads a nested key); needs --pool", pipeline="set")
    normalize: bool | None = _f(None, "column-normalise before selecting (default: on for bids, off otherwise)")
    tasks: list[str] | None = _f(None, "use only the columns of these tasks (comma-separated)")
    label: str | None = _f(None, "name shown in reports (default: the method)", pipeline="set")
    overwrite: bool = _f(False, "replace an existing selection made with other settings",
                         role="execution", pipeline="set")


@dataclass
class ReportConfig(MatrixConfig):
    """`poise report`: plots and an HTML page for one or more selections and the runs evaluated on them."""

    selections: list[str] = _f([], "selection folders (poise select) and/or evaluation folders (poise evaluate)",
                               positional=True, role="path", pipeline="set")
    metric: str = _f("nll", "evaluations: the metric shown per task when the task has it (else its first)")
    out: str | None = _f(None, "output folder for the PNGs and report.html", required=True,
                         role="output", pipeline="set")
    title: str = _f("poise selection report", "title of the HTML page")
    embed_images: bool = _f(True, "embed the figures in report.html as data URIs, one file that opens anywhere "
                            "(the PNGs are written beside it too); --no-embed-images links the PNG files instead")
    validation: list[str] = _f([], "validation files or folders (one JSONL per task, as given to poise features): "
                               "only to show, beside each first pick, the text of the validation example it served",
                               role="path", pipeline="set")
    run: str | None = _f(None, "a poise run directory: the header names its model, data and settings", role="path",
                         pipeline="set")
    overwrite: bool = _f(False, "replace a report folder made with other settings", role="execution",
                         pipeline="set")


@dataclass
class DemoConfig:
    """`poise demo`: the whole pipeline (`poise run demo`) on SmolLM2-135M-Instruct and poise's demo data: warmup,
    features, every selection method, training on the BIDS, task-max and random selections, evaluation of them
    and the base model on every capability, and the report. --synthetic: only the selection methods, on a
    synthetic attribution matrix, in seconds."""

    out: str | None = _f(None, "run directory (default: runs/demo, or runs/demo-synthetic with --synthetic)")
    synthetic: bool = _f(False, "select from a synthetic attribution matrix instead (seconds; no model)")
    rows: int = _f(20_000, "--synthetic: pool size of the synthetic attribution matrix")
    columns_per_task: int = _f(10, "--synthetic: validation columns per task (7 tasks)")
    budget: str = _f("0.1", "--synthetic: selection budget (count or fraction)")
    seed: int = _f(0, "--synthetic: seed of the synthetic matrix and the random baseline")


@dataclass
class DataConfig:
    """How examples become token sequences (shared by warmup and features)."""

    max_seq_length: int = _f(2048, "truncate every example to this many tokens", pipeline="top", low=2)
    template: Template = _f("auto", "the tokenizer's chat template (auto/chat), the tulu format (tulu), tulu "
                            "labelled as LESS does (tulu-less), or prompt + completion with no template (plain: "
                            "LESS's validation rows)", choices=TEMPLATES, pipeline="top")
    max_batch_size: int = _f(16, "most examples in one forward pass (training: gradient accumulation reaches "
                                 "--batch-size)", role="execution", low=1)


@dataclass
class FeaturesConfig(DataConfig):
    """`poise features`: per-example LoRA gradient features (or RDS representations) of a data set."""

    max_tokens: int = _f(2048, "token budget of a batch (batch size x longest sequence); memory grows ~2.7 MB "
                         "per padded token for SmolLM2-135M in float32 (vocab 49K): raise it on GPUs",
                         role="execution", low=1)

    data: list[str] = _f([], "data files or folders (JSONL, JSON, parquet, datasets folder) or a hub data set "
                         "org/name[@config][:split]", required=True, role="path", pipeline="set")
    out: str | None = _f(None, "output folder (features.npy, ids.jsonl, info.json)", required=True,
                         role="output", pipeline="set")
    checkpoint: str | None = _f(None, "a poise checkpoint folder, or any peft adapter folder for sgd/reps",
                                role="path", pipeline="set")
    model: str | None = _f(None, "base model: folder, hub id (downloaded once, cached), .gguf file or smollm2-135m "
                           "(default: the one the checkpoint names)", role="path", pipeline="top")
    kind: FeatureKind = _f("adam", "adam (training examples), sgd (validation examples) or reps (RDS)",
                   choices=FEATURE_KINDS, pipeline="set")
    adam_formula: AdamFormula = _f("less", "less = m'/sqrt(v'+eps) as LESS; textbook = bias-corrected Adam direction",
                           choices=ADAM_FORMULAS)
    projection: Projection = _f("sjlt", "sjlt (sparse JL), rademacher (dense, TRAK/LESS) or none", choices=PROJECTIONS)
    dim: int = _f(8192, "projection dimension", low=1)
    seed: int = _f(0, "projection seed")
    pooling: Pooling = _f("last", "reps only: last = last non-pad token (LESS's RDS), mean = attention-masked mean, "
                          "weighted-mean = RDS+'s position-weighted mean (token p weighs p+1)", choices=POOLINGS)
    task: str | None = _f(None, "task of every example (default: the row's 'task', else the file name)", pipeline="set")
    dtype: DType = _f("float32", "model dtype", choices=DTYPES, pipeline="top")
    device: str = _f("cpu", "cpu, cuda, cuda:1, mps ... (under torchrun cuda means each rank's own GPU)",
                     role="execution", pipeline="top")
    output_dtype: StoreDtype = _f("float16", "how the store keeps a row: float16 (LESS, 2 bytes a coordinate), "
                                  "float32, int8 (+ a float32 scale per row) or 1bit (signs, QLESS)",
                                  choices=STORE_DTYPES)
    overwrite: bool = _f(False, "replace features made with other settings", role="execution", pipeline="set")


@dataclass
class AttributeConfig:
    """`poise attribute`: train and validation features -> the attribution matrix A (N_train x N_val)."""

    train: list[str] = _f([], "train features folders, one per checkpoint (comma-separated)", required=True,
                          role="path", pipeline="set")
    val: list[str] = _f([], "validation features folders, the same checkpoints in the same order", required=True,
                        role="path", pipeline="set")
    out: str | None = _f(None, "output attribution folder (what `poise select --attribution` reads)", required=True,
                         role="output", pipeline="set")
    weights: list[str] | None = _f(None, "checkpoint weights (default: each checkpoint's mean learning rate); "
                                   "normalised to sum 1")
    rds: bool = _f(False, "the folders hold representations (--kind reps): write the RDS cosine matrix", pipeline="set")
    chunk_rows: int = _f(8192, "training rows per chunk (memory ~ chunk_rows x (d + N_val) floats)",
                         role="execution", low=1)
    overwrite: bool = _f(False, "replace an attribution folder made from other features",
                         role="execution", pipeline="set")


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(annotation: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) of an annotation like `int | None` or `list[str] | None`."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return annotation, False


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    kind, optional = base_type(annotation)
    if typing.get_origin(kind) is Literal:  # a choice among strings: checked against its choices after
        kind = str
    if value is None:
        if optional:
            return None
        raise PoiseError(f"{where}: must not be empty")
    origin = typing.get_origin(kind)
    if kind is dict:
        if not isinstance(value, dict):
            raise PoiseError(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin is list:
        item = (typing.get_args(kind) or (str,))[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number for a list of them
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise PoiseError(f"{where}: expected a list, got {value!r}")
        if item is int:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise PoiseError(f"{where}: expected a list of whole numbers, got {value!r}")
            return list(value)
        return [str(v) for v in value]
    if kind is bool:
        if not isinstance(value, bool):
            raise PoiseError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PoiseError(f"{where}: expected a whole number, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool):
            raise PoiseError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)  # YAML reads 2e-5 (no dot) as text
        except (TypeError, ValueError):
            raise PoiseError(f"{where}: expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise PoiseError(f"{where}: expected a finite number, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise PoiseError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str) -> Any:
    """Build a config from a mapping; unknown keys and wrong types are errors naming `where`."""
    if not isinstance(data, dict):
        raise PoiseError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    hints = field_types(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise PoiseError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(names))})")
        values[name] = _coerce(value, hints[name], f"{where}: {key}")
        choices = names[name].metadata.get("choices")
        if choices and values[name] not in choices:
            raise PoiseError(f"{where}: {key} must be one of {', '.join(choices)}, got {values[name]!r}")
    return cls(**values)


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content (an empty file is {}); unreadable or invalid YAML is one error naming the line."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise PoiseError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise PoiseError(f"{path}{line}: not valid YAML") from None


def load_yaml(path: str | os.PathLike, cls: type, section: str | None = None) -> Any:
    """Read a YAML settings file (optionally one section of it) into `cls`."""
    data = read_yaml(path)
    if section and isinstance(data, dict) and section in data:
        data = data[section]
    return from_dict(cls, data, str(path))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


@dataclass
class LoraTrainingConfig(DataConfig):
    """Settings shared by `poise warmup` and `poise train` (one Trainer-based training function)."""

    model: str | None = _f(None, "base model: folder, hub id (downloaded once, cached), .gguf file or smollm2-135m",
                           required=True, role="path", pipeline="top")
    lora_r: int = _f(128, "LoRA rank", low=1)
    lora_alpha: int = _f(512, "LoRA alpha (the update is scaled by alpha / r)", low=0, low_open=True)
    lora_dropout: float = _f(0.1, "dropout on the LoRA input while training", low=0, high=1)
    target_modules: list[str] = _f([], "modules that get a LoRA adapter, named as peft matches them (a module's "
                                       "name or its last dotted parts); empty: every linear layer of the model's "
                                       "attention (q/k/v/o_proj, or fused qkv_proj, query_key_value, c_attn with the "
                                       "output projection; docs/models.md)")
    lr: float = _f(2e-5, "peak learning rate (AdamW)", low=0)
    warmup_ratio: float = _f(0.03, "fraction of all optimizer steps with linear warm-up", low=0, high=1)
    weight_decay: float = _f(0.0, "AdamW weight decay", low=0)
    adam_beta1: float = _f(0.9, "AdamW beta1", low=0, high=1)
    adam_beta2: float = _f(0.999, "AdamW beta2", low=0, high=1)
    adam_eps: float = _f(1e-8, "AdamW epsilon", low=0)
    max_grad_norm: float = _f(1.0, "clip the gradient norm of a step to this (transformers.Trainer's default, as "
                                   "LESS trains); 0 turns clipping off", low=0)
    batch_size: int = _f(128, "examples per optimizer step, over all processes (gradient accumulation and "
                              "--max-batch-size examples per forward pass)", low=1)
    seed: int = _f(0, "seed of the example subset and order, the LoRA init and dropout")
    dtype: DType = _f("float32", "base model dtype (the LoRA weights and Adam state stay float32)",
                    choices=DTYPES, pipeline="top")
    bf16: bool = _f(False, "bfloat16 mixed precision (transformers.Trainer's bf16; GPUs)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory)",
                                      role="execution")
    device: str = _f("cpu", "cpu, or cuda (under torchrun each rank its own GPU)", role="execution", pipeline="top")
    trainer: dict | None = _f(None, "extra transformers.TrainingArguments (YAML only), e.g. {fsdp: full_shard}",
                              yaml_only=True)
    overwrite: bool = _f(False, "start over: delete what an earlier run left in the folder",
                         role="execution", pipeline="set")


@dataclass
class WarmupConfig(LoraTrainingConfig):
    """`poise warmup`: LoRA warmup training on a random part of the pool (LESS defaults), a checkpoint per epoch."""

    data: list[str] = _f([], "the pool: data files or folders (JSONL, JSON, parquet, datasets folder) or a hub "
                         "data set org/name[@config][:split]", required=True, role="path", pipeline="set")
    out: str | None = _f(None, "run folder (checkpoint-<epoch>/ per epoch, arguments.json)", required=True,
                         role="output", pipeline="set")
    fraction: float = _f(0.05, "train on this random fraction of the pool (seeded; LESS 0.05, BIDS 1.0)",
                         low=0, high=1, low_open=True)
    examples: int | None = _f(None, "train on this many random examples of the pool instead of --fraction", low=1)
    epochs: int = _f(4, "training epochs (one checkpoint each)", low=1)
    lr_scheduler: LRScheduler = _f("linear", "decay after the warm-up: linear (LESS) or cosine (BIDS)",
                                   choices=LR_SCHEDULERS)


@dataclass
class TrainConfig(LoraTrainingConfig):
    """`poise train`: LoRA fine-tuning on a selection (BIDS paper defaults: 2 epochs, cosine, lr 2e-5)."""

    selection: str | None = _f(None, "a selection folder (its selected.jsonl, or --pool + selection.json) or any "
                               "data file poise reads", required=True, role="path", pipeline="set")
    out: str | None = _f(None, "output folder: the peft adapter, arguments.json, train_log.jsonl", required=True,
                         role="output", pipeline="set")
    pool: str | None = _f(None, "the pool in matrix row order, for a selection folder without selected.jsonl",
                          role="path", pipeline="set")
    epochs: int = _f(2, "training epochs", low=1)
    lr_scheduler: LRScheduler = _f("cosine", "decay after the warm-up: linear (LESS) or cosine (BIDS)",
                                   choices=LR_SCHEDULERS)


@dataclass
class EvaluateConfig:
    """`poise evaluate`: lm-evaluation-harness on every capability, for a base model or a trained adapter."""

    model: str | None = _f(None, "base model: folder, hub id, .gguf file or smollm2-135m", required=True,
                           role="path", pipeline="top")
    out: str | None = _f(None, "output folder: results.json (lm-eval), scores.json (poise), tasks/", required=True,
                         role="output", pipeline="set")
    adapter: str | None = _f(None, "a peft adapter folder (poise train's output) to evaluate on top of the model",
                             role="path", pipeline="set")
    data: list[str] = _f([], "local held-out items: files or folders of {id, prompt|messages, answer} JSONL, one "
                         "file per capability", role="path", pipeline="set")
    tasks: list[str] = _f([], "lm-eval task names, or bids-suite (the BIDS paper's seven; they need the hub)")
    label: str | None = _f(None, "name of this run in comparison tables (default: the adapter folder, or base)",
                           pipeline="set")
    template: Template = _f("auto", "how local prompts are rendered (as the training data was)",
                       choices=TEMPLATES, pipeline="top")
    max_gen_toks: int = _f(32, "tokens generated for exact match on local tasks", low=1)
    batch_size: int = _f(8, "lm-eval batch size", role="execution", low=1)
    limit: int | None = _f(None, "evaluate only the first N items of each task (quick checks)", low=1)
    allow_code_execution: bool = _f(False, "let HumanEval/MBPP execute the code the model writes (do it in a "
                                           "sandbox)")
    seed: int = _f(0, "lm-eval's random, numpy, torch and few-shot seeds")
    dtype: DType = _f("float32", "model dtype", choices=DTYPES, pipeline="top")
    device: str = _f("cpu", "cpu, cuda, cuda:1, mps ...", role="execution", pipeline="top")
    overwrite: bool = _f(False, "replace an evaluation folder made with other settings", role="execution",
                         pipeline="set")


@dataclass
class ImportConfig:
    """`poise import-checkpoint`: turn an HF-Trainer LoRA checkpoint into a poise checkpoint (named moments)."""

    checkpoint: str | None = _f(None, "an HF-Trainer checkpoint folder (adapter + optimizer.pt or FSDP optimizer.bin "
                                      "+ trainer_state.json)", required=True, role="path")
    out: str | None = _f(None, "the poise checkpoint folder to write", required=True, role="output")
    model: str | None = _f(None, "base model (default: adapter_config.json's base_model_name_or_path)", role="path")
    epoch: int | None = _f(None, "the epoch this checkpoint ends (default: trainer_state.json's epoch, rounded)")
    overwrite: bool = _f(False, "replace an existing checkpoint folder made from another source", role="execution")
