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


# ------------------------------------------------------------------------------ LESS's labels, from its paper/code
def _tulu_text(messages: list[dict], eos: str) -> str:
    parts = {"system": "<|system|>\n{}\n", "user": "<|user|>\n{}\n", "assistant": "<|assistant|>\n{}" + eos + "\n"}
    return "".join(parts[m["role"]].format(m["content"].strip()) for m in messages)


def less_tulu_encoding(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """LESS / open-instruct `encode_with_messages_format`, restated: the tulu text stripped at the end, tokenised
    with the tokenizer's special tokens; each non-assistant message, up to and including the assistant header
    that follows it, is masked (-100); every other token is a target."""
    ids = tokenizer(_tulu_text(messages, tokenizer.eos_token).strip())["input_ids"]
    labels = list(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else len(tokenizer(_tulu_text(messages[:i], tokenizer.eos_token))["input_ids"])
        upto = _tulu_text(messages[:i + 1], tokenizer.eos_token)
        if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            upto += "<|assistant|>\n"
        end = min(len(tokenizer(upto)["input_ids"]), len(labels))  # a tensor slice stops at the end
        labels[start:end] = [-100] * (end - start)
    return ids, labels


def less_plain_encoding(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[int]]:
    """LESS's validation rows: prompt + completion with no template and no EOS; the prompt's tokens masked."""
    ids = tokenizer(prompt + completion)["input_ids"]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    return ids, [-100] * n_prompt + ids[n_prompt:]
