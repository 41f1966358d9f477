"""Tolerances that follow from float32 arithmetic, for comparing two computations of the same sums.

Two float32 computations of a sum of n terms that differ only in the order (another CPU's kernels, another
thread count, another block size) each lie within gamma_n * sum|x_i| of the exact sum, where
gamma_n = n*u / (1 - n*u) and u = 2**-24 is float32's unit roundoff (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., eq. 3.5 for dot products). Their difference is therefore at most
2 * gamma_n * sum|x_i| per element. This bound does not depend on the result, so it holds for an entry that
cancels to nearly zero, where a relative tolerance fails; and it is far below the size of one term, so a
wrong sign, a missing term or a wrong weight still fails the comparison.
"""

from __future__ import annotations

import numpy as np

UNIT_ROUNDOFF_FLOAT32 = 2.0**-24


def gamma(n_terms: int, unit: float = UNIT_ROUNDOFF_FLOAT32) -> float:
    """Higham's gamma_n: the relative error bound of a sum of n terms in any order."""
    nu = n_terms * unit
    assert nu < 1
    return nu / (1 - nu)


def assert_same_sums(actual, expected, abs_sums, n_terms: int, computations: int = 2) -> None:
    """`actual` and `expected` are float32 sums of the same `n_terms` terms per element, in other orders.

    `abs_sums` holds, per element, the sum of the absolute values of its terms (e.g. |A| @ |B| for A @ B).
    `computations` is how many of the two sides were rounded (2: both are float32 results).
    """
    actual, expected, abs_sums = (np.asarray(x, dtype=np.float64) for x in (actual, expected, abs_sums))
    assert actual.shape == expected.shape == abs_sums.shape
    bound = computations * gamma(n_terms) * abs_sums
    excess = np.abs(actual - expected) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (
        f"element {tuple(int(i) for i in worst)}: |{actual[worst]} - {expected[worst]}| = "
        f"{abs(actual[worst] - expected[worst]):.3g} exceeds the float32 summation bound {bound[worst]:.3g}"
    )
