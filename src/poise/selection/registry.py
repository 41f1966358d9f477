"""The registry of selection methods and the common result type.

A method is one function `(matrix, budget, context) -> Picks` plus one `@register(...)` line (and its name in
`poise.options.SelectionMethod`, which a test keeps equal to the registry). The registry also says what the
method needs, so that nothing outside `selection/` special-cases a method by name: whether it normalises the
matrix by default, which matrix kind it needs (the pipeline builds representations for "rds"), and whether
it reads the scores at all (a method that does not, such as random, has no normalised/raw variants and draws
anew with each seed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import numpy as np

from poise.errors import PoiseError
from poise.matrix import AttributionMatrix


@dataclass
class Picks:
    """Rows in pick order with, per pick, its score (or gain) and the column it served (-1: none)."""

    rows: np.ndarray  # (B,) int64
    scores: np.ndarray  # (B,) float64; NaN where the method has no score (random)
    columns: np.ndarray  # (B,) int64; -1 where no column was served


@dataclass
class Context:
    """Everything a method may need besides the matrix and the budget."""

    normalize: bool
    seed: int
    progress: Callable[[int, int], None] | None = None  # (done, total) callback
    strata: np.ndarray | None = None  # (n_rows,) int64 code of each row's stratum (random --stratify), or None
    strata_names: list[str] | None = None  # the value each code stands for, sorted


MethodFn = Callable[[AttributionMatrix, int, Context], Picks]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    normalize_default: bool
    requires_kind: str | None
    description: str
    uses_scores: bool = True

    @property
    def has_variants(self) -> bool:
        """Whether `<name>-norm` / `<name>-raw` (normalisation forced on or off) mean something for it."""
        return self.uses_scores and self.requires_kind is None


METHODS: dict[str, Method] = {}


def register(
    name: str, *, normalize_default: bool = False, requires_kind: str | None = None, description: str = "",
    uses_scores: bool = True,
) -> Callable[[MethodFn], MethodFn]:
    def decorate(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, normalize_default, requires_kind, description or (fn.__doc__ or ""),
                               uses_scores)
        return fn

    return decorate


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PoiseError(f"unknown selection method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


_COUNT = re.compile(r"^\s*\d+\s*$")


def parse_budget(budget: int | float | str, n_pool: int) -> int:
    """Budget -> number of rows. A whole number is a count; a number with a point in (0, 1] a fraction.

    Fractions are floored exactly (decimal arithmetic, so 0.29 of 100 is 29, not 28).
    """
    if isinstance(budget, bool):
        raise PoiseError(f"budget must be a count or a fraction, got {budget!r}")
    if isinstance(budget, str):
        text = budget.strip()
        if _COUNT.match(text):
            budget = int(text)
        else:
            try:
                fraction = Decimal(text)
            except InvalidOperation:
                raise PoiseError(f"budget {budget!r} is neither a whole number nor a fraction in (0, 1]") from None
            return _fraction_count(fraction, text, n_pool)
    if isinstance(budget, (int, np.integer)):
        count = int(budget)
        if count <= 0:
            raise PoiseError(f"budget must be positive, got {count}")
        if count > n_pool:
            raise PoiseError(f"budget {count} is larger than the pool ({n_pool} rows)")
        return count
    if isinstance(budget, (float, np.floating)):
        if not math.isfinite(budget):
            raise PoiseError(f"budget must be finite, got {budget}")
        return _fraction_count(Decimal(repr(float(budget))), repr(budget), n_pool)
    raise PoiseError(f"budget must be a count or a fraction, got {type(budget).__name__}")


def _fraction_count(fraction: Decimal, text: str, n_pool: int) -> int:
    if fraction.is_finite() and fraction <= 0:
        raise PoiseError(f"budget must be positive, got {text}")
    if not fraction.is_finite() or fraction > 1:
        raise PoiseError(
            f"budget {text} is not a whole number and not a fraction in (0, 1] "
            "(write a count without a decimal point)"
        )
    count = int((fraction * n_pool).to_integral_value(rounding="ROUND_FLOOR"))
    if count == 0:
        raise PoiseError(f"budget {text} of a pool of {n_pool} rows is 0 rows")
    return count
