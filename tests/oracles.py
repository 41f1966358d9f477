"""Independent reference implementations the tests compare against (slow, obviously correct)."""

from __future__ import annotations

import numpy as np


def bids_naive(values: np.ndarray, budget: int) -> tuple[list[int], list[float], list[int]]:
    """Algorithm 1 of the BIDS paper, literally: B times, argmax over unselected rows of
    max_j (A'_ij - mean of selected rows_j), mean of the empty set = 0, running sum in float64,
    ties to the lowest row index (numpy's argmax returns the first maximum).

    `values` is the (already normalised, float32) matrix the algorithm sees.
    """
    n, v = values.shape
    selected = np.zeros(n, dtype=bool)
    running = np.zeros(v, dtype=np.float64)
    rows, gains, columns = [], [], []
    wide = values.astype(np.float64)
    for t in range(budget):
        mean = running / t if t else np.zeros(v)
        gain = wide - mean  # (N, V)
        best_per_row = gain.max(axis=1)
        best_per_row[selected] = -np.inf
        i = int(np.argmax(best_per_row))
        j = int(np.argmax(gain[i]))
        rows.append(i)
        gains.append(float(gain[i, j]))
        columns.append(j)
        selected[i] = True
        running += values[i]
    return rows, gains, columns


def normalize_naive(scores: np.ndarray) -> np.ndarray:
    """(A - mean_j) / std_j per column in float64 (population std), zero-variance columns -> 0."""
    a = scores.astype(np.float64)
    mean = a.mean(axis=0)
    std = a.std(axis=0)
    safe = np.where(std == 0, 1.0, std)
    out = (a - mean) / safe
    out[:, std == 0] = 0.0
    return out
