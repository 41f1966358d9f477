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


# ------------------------------------------------------------------------------ LESS's labels, from its code
# Restated (not copied) from princeton-nlp/LESS at commit 8abf9628b9a814ac3045445eebc8ba3c908fdc78:
#   less/data_selection/get_training_dataset.py, lines 126-175 (encode_with_messages_format) and 178-190
#   (concat_messages);
#   less/data_selection/get_validation_dataset.py, lines 15-48 (tokenize, used by the bbh/tydiqa/mmlu rows).
LESS_COMMIT = "8abf9628b9a814ac3045445eebc8ba3c908fdc78"


def less_concat_messages(messages: list[dict], eos: str) -> str:
    """LESS's `concat_messages`: every content stripped; system and user turns end with a newline; every
    assistant turn, the last one included, is the header, the content, the EOS and a newline. The text is
    returned as it is (not stripped)."""
    text = ""
    for message in messages:
        content = message["content"].strip()
        if message["role"] == "system":
            text += "<|system|>\n" + content + "\n"
        elif message["role"] == "user":
            text += "<|user|>\n" + content + "\n"
        elif message["role"] == "assistant":
            text += "<|assistant|>\n" + content + eos + "\n"
        else:
            raise ValueError(f"Invalid role: {message['role']}")
    return text


def less_tulu_encoding(messages: list[dict], tokenizer, max_seq_length: int = 2048) -> tuple[list[int], list[int]]:
    """LESS's `encode_with_messages_format`, restated.

    - The whole `concat_messages` text is tokenised by one tokenizer call with its special tokens (BOS where
      the tokenizer adds one), `max_length=max_seq_length` and `truncation=True`; labels start as the ids.
    - For each message that is not an assistant's, in order: its mask starts at 0 for the first message and
      otherwise at the token count of the text of the messages before it; it ends at the token count of the
      text up to and including it, plus the header `<|assistant|>\n` when the next message is an assistant's.
      Every count comes from the same tokenizer call (special tokens, the same truncation). The span is set
      to -100 (a tensor slice: it stops at the end of the ids).
    - After masking a message whose end count reached max_seq_length, the loop stops.
    Every other token is a target: assistant contents, their EOS and the newline after each EOS, the last one
    included.
    """
    eos = tokenizer.eos_token

    def count(text: str) -> int:
        return len(tokenizer(text, max_length=max_seq_length, truncation=True)["input_ids"])

    ids = tokenizer(less_concat_messages(messages, eos), max_length=max_seq_length, truncation=True)["input_ids"]
    labels = list(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else count(less_concat_messages(messages[:i], eos))
        upto = less_concat_messages(messages[:i + 1], eos)
        if i < len(messages) - 1 and messages[i + 1]["role"] == "assistant":
            upto += "<|assistant|>\n"
        end = count(upto)
        labels[start:end] = [-100] * len(labels[start:end])
        if end >= max_seq_length:
            break
    return ids, labels


def less_plain_encoding(prompt: str, completion: str, tokenizer, max_length: int = 2048) -> tuple[list[int], list[int]]:
    """LESS's validation rows (`tokenize` in get_validation_dataset.py), restated: `tokenizer.encode` of the
    prompt and of prompt + completion (concatenated as they are: no template, no space, no EOS appended),
    each with its special tokens and `max_length` (which truncates); the first len(prompt ids) labels -100."""
    prompt_ids = tokenizer.encode(prompt, max_length=max_length)
    ids = tokenizer.encode(prompt + completion, max_length=max_length)
    labels = list(ids)
    labels[:len(prompt_ids)] = [-100] * len(labels[:len(prompt_ids)])
    return ids, labels
