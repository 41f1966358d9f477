"""`poise run`: every stage from one YAML config, into one run directory, resumable.

A run config names the model, the pool, the validation folder (one JSONL per task) and the held-out
evaluation folder (one JSONL per capability, the same task names), and holds one section per stage whose
keys are that stage's own settings (the same classes behind `poise warmup --help` and the others), less
the paths the pipeline fills in itself. The run directory gets

    data/ (only with `demo_data:`)   warmup/   features/<checkpoint>/{train,val}/   features/reps/{train,val}/
    features/reps-rds+/{train,val}/   attribution/   attribution-rds/   attribution-rds+/
    selections/<method>-<budget>/   training/<method>-<budget>[-seed<k>]/   evaluation/<run>/   report/
    config.yaml (the resolved config)   pipeline.json (what is done)

(the reps folders and their attribution-rds[+] only when a selection method needs that matrix: rds reads
representations at the last warmup checkpoint, rds+ those of the base model, pooled as RDS+ pools them).

Each unit of work (one folder) has a fingerprint: its own settings plus the fingerprints of what it reads.
A rerun skips a unit whose fingerprint is unchanged and whose outputs are complete, continues one that
was interrupted (the stages resume themselves), and deletes and redoes one whose fingerprint changed, so a
changed setting reruns its stage and everything after it that depends on it, and nothing else.

Everything that can be checked without a model is checked first (unknown keys with the closest valid
one, missing files, budgets, empty tasks, method names, evaluation tasks without validation data and
the reverse). The stages share one model load (`shared_models`) and one tokenised set per data set (built
once into poise's cache, memory-mapped by every stage: `poise.data.tokenized`). Under torchrun, warmup,
features and training run on every rank and the rest on rank 0.
"""

from __future__ import annotations

from poise.pipeline.executor import RunResult, run, summarize
from poise.pipeline.inputs import Inputs, check_inputs
from poise.pipeline.runconfig import (
    DISTRIBUTED_STAGES,
    STAGES,
    RunConfig,
    apply_overrides,
    check_config,
    config_path,
    load_config,
    parse_config,
)
from poise.pipeline.units import Unit, build_units

__all__ = [
    "DISTRIBUTED_STAGES",
    "STAGES",
    "Inputs",
    "RunConfig",
    "RunResult",
    "Unit",
    "apply_overrides",
    "build_units",
    "check_config",
    "check_inputs",
    "config_path",
    "load_config",
    "parse_config",
    "run",
    "summarize",
]
