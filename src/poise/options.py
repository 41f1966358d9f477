"""The string options of poise as `typing.Literal` aliases, kept in one place."""

from __future__ import annotations

from typing import Literal, get_args

SelectionMethod = Literal["bids", "instance-max", "task-max", "sum", "random", "rds"]
"""Selection rules of DESIGN.md §2.5 (BIDS paper, Appendix A.3 and Algorithm 1)."""

MatrixKind = Literal["influence", "rds"]
"""What an attribution matrix holds: gradient influence (LESS) or representation cosine similarity (RDS)."""

SELECTION_METHODS: tuple[str, ...] = get_args(SelectionMethod)
MATRIX_KINDS: tuple[str, ...] = get_args(MatrixKind)
