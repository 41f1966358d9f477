"""The names of the files poise writes, in one leaf module (no imports from poise).

Every stage's output folder is known by these names to the stage that writes it, to the pipeline that checks
it is complete, and to the report that reads it; keeping them here lets those layers agree without importing
one another.
"""

from __future__ import annotations

# every output folder: its settings, poise version and time (written by poise.provenance alone)
ARGUMENTS_FILE = "arguments.json"

# checkpoints (poise warmup, poise import-checkpoint)
CHECKPOINT_FILE = "checkpoint.json"
MOMENTS_FILE = "optimizer_moments.safetensors"

# features
FEATURES_FILE = "features.npy"
SCALES_FILE = "scales.npy"  # int8 stores: one float32 scale per row
IDS_FILE = "ids.jsonl"
FEATURES_INFO_FILE = "info.json"
PROGRESS_DIR = "progress"

# attribution matrix
SCORES_FILE = "scores.npy"
COLUMNS_FILE = "columns.jsonl"
ROWS_FILE = "rows.jsonl"
ATTRIBUTION_INFO_FILE = "info.json"

# selection
SELECTION_FILE = "selection.json"
SELECTED_FILE = "selected.jsonl"

# training on a selection
EXAMPLES_FILE = "examples.jsonl"
TRAIN_LOG_FILE = "train_log.jsonl"
TRAIN_SUMMARY_FILE = "train_summary.json"

# evaluation
RESULTS_FILE = "results.json"
EVAL_SCORES_FILE = "scores.json"
SAMPLES_FILE = "samples.jsonl"

# report
REPORT_FILE = "report.html"

# a `poise run` directory
RUN_STATE_FILE = "pipeline.json"
RUN_CONFIG_FILE = "config.yaml"
