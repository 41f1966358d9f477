"""The string options of poise as `typing.Literal` aliases, kept in one place."""

from __future__ import annotations

from typing import Literal, get_args

SelectionMethod = Literal["bids", "instance-max", "task-max", "sum", "random", "rds", "round-robin", "task-round-robin",
                          "rds+"]
"""Selection rules of docs/design.md §2.5 (BIDS paper, Appendix A.3 and Algorithm 1)."""

MatrixKind = Literal["influence", "rds", "rds+"]
"""What an attribution matrix holds: gradient influence (LESS), representation cosine similarity (RDS), or
representation cosines of RDS+'s position-weighted mean pooling (rds+)."""

SELECTION_METHODS: tuple[str, ...] = get_args(SelectionMethod)
MATRIX_KINDS: tuple[str, ...] = get_args(MatrixKind)

FeatureKind = Literal["adam", "sgd", "reps"]
"""adam: LESS's Adam-mapped training gradient; sgd: the plain gradient (validation); reps: RDS representations."""

AdamFormula = Literal["less", "textbook"]
"""less: m'/sqrt(v'+eps), no bias correction (LESS); textbook: bias-corrected m_hat/(sqrt(v_hat)+eps)."""

Projection = Literal["sjlt", "rademacher", "none"]
"""sjlt: sparse JL (CountSketch), O(n); rademacher: dense +-1 (TRAK/LESS), O(n*d); none: the raw gradient."""

Pooling = Literal["last", "mean", "weighted-mean"]
"""RDS representation: the last non-pad token (LESS's RDS), the attention-masked mean, or RDS+'s position-weighted
mean (token p of an example, counted from 0, weighs p+1; Ivison et al. 2025)."""

Template = Literal["auto", "chat", "tulu", "tulu-less", "plain"]
"""Rendering: the tokenizer's chat template when it has one (auto), always it (chat), the tulu format (tulu), the
tulu format labelled exactly as LESS labels it (tulu-less), or prompt + completion with no template (plain)."""

DType = Literal["float32", "bfloat16", "float16"]

StoreDtype = Literal["float32", "float16", "int8", "1bit"]
"""How the feature store keeps a row (docs/design.md §2.3): float32; float16 (LESS); int8 with a float32 scale per
row; 1bit, the sign of every coordinate, bit-packed (QLESS)."""

PaddingSide = Literal["right", "left"]

LRScheduler = Literal["linear", "cosine"]
"""After linear warm-up: linear decay (LESS) or cosine decay (BIDS); every step's rate stays positive."""

FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)
ADAM_FORMULAS: tuple[str, ...] = get_args(AdamFormula)
PROJECTIONS: tuple[str, ...] = get_args(Projection)
POOLINGS: tuple[str, ...] = get_args(Pooling)
TEMPLATES: tuple[str, ...] = get_args(Template)
DTYPES: tuple[str, ...] = get_args(DType)
STORE_DTYPES: tuple[str, ...] = get_args(StoreDtype)
LR_SCHEDULERS: tuple[str, ...] = get_args(LRScheduler)
