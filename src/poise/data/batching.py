"""Group examples into token-budget batches, pad them into tensors, and put results back in input order.

Per-example gradients cost memory in proportion to batch size × padded length, so batches are packed by a
token budget rather than a fixed size: examples sorted by length (longest first, so the first batch shows
the peak memory at once) are added to a batch while `len(batch) * longest <= max_tokens`. The order is a
pure function of the lengths, so every rank and every rerun builds the same batches. Because the loss is a
sum of per-example losses that ignores padding (docs/design.md §2.1), the batching never changes a result; only
the order of results does, which `restore_order` undoes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from poise.data.formats import IGNORE_INDEX
from poise.data.templates import Tokenized
from poise.options import PaddingSide

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class Batches:
    """Token-budget batches as two index arrays (the examples in batch order, and where each batch starts), so
    that a pool of millions costs 16 bytes per example here, not a Python list per batch."""

    def __init__(self, order: np.ndarray, starts: np.ndarray) -> None:
        self.order, self.starts = order, starts  # starts: len(batches) + 1 offsets into order

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, k: int) -> np.ndarray:
        return self.order[self.starts[k]:self.starts[k + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))

    def size(self, k: int) -> int:
        return int(self.starts[k + 1] - self.starts[k])


def batch_plan(lengths: Sequence[int] | np.ndarray, max_tokens: int, max_batch_size: int | None = None) -> Batches:
    """Indices into `lengths`, longest first (ties by index), packed greedily into batches.

    A batch holds at most `max_batch_size` examples and `len(batch) * max(length in batch) <= max_tokens`
    padded tokens; an example longer than `max_tokens` gets a batch of its own. Every index appears once.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive integer or None, got {max_batch_size!r}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if (lengths < 0).any():
        raise ValueError("lengths must be non-negative")
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, ties by index
    starts = [0]
    size = longest = 0
    sorted_lengths = lengths[order]
    for position, length in ((p, n) for start in range(0, len(order), 1 << 20)  # Python ints a chunk at a time
                             for p, n in enumerate(sorted_lengths[start:start + (1 << 20)].tolist(), start)):
        full = max_batch_size is not None and size >= max_batch_size
        if size and (full or (size + 1) * longest > max_tokens):
            starts.append(position)
            size = 0
        if not size:
            longest = int(length)  # sorted descending: the first example of a batch is its longest
        size += 1
    if size:
        starts.append(len(lengths))
    return Batches(order, np.asarray(starts, dtype=np.int64))


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int | None = None,
                         ) -> list[list[int]]:
    """`batch_plan` as lists of ints (small inputs; stages use `batch_plan`)."""
    return [batch.tolist() for batch in batch_plan(lengths, max_tokens, max_batch_size)]


def collate(items: Sequence[Tokenized], pad_id: int, padding_side: PaddingSide = "right") -> dict[str, torch.Tensor]:
    """Pad a batch into (B, T) long tensors: input_ids, attention_mask, labels (-100 at padding), position_ids.

    position_ids = cumsum(attention_mask) - 1, clamped at 0, so every example counts positions from 0 at
    its first real token whichever side is padded (models with absolute positions need them, and left
    padding would otherwise shift rotary positions).
    """
    import torch

    if not items:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        if len(item.labels) != n:
            raise ValueError(f"item {row}: {len(item.labels)} labels for {n} input ids")
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(item.labels, dtype=torch.long)
        attention_mask[row, cols] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": position_ids}


def restore_order(batches: Sequence[Sequence[int]], per_batch_results: Sequence[Sequence[T]]) -> list[T]:
    """Results in input order: item r of batch b is the result for input index batches[b][r].

    The batches must cover 0..N-1 exactly once (as `token_budget_batches` returns them).
    """
    if len(batches) != len(per_batch_results):
        raise ValueError(f"{len(batches)} batches but {len(per_batch_results)} batch results")
    total = sum(len(batch) for batch in batches)
    out: list = [None] * total
    filled = [False] * total
    for number, (batch, results) in enumerate(zip(batches, per_batch_results, strict=True)):
        if len(batch) != len(results):
            raise ValueError(f"batch {number} has {len(batch)} indices but {len(results)} results")
        for index, result in zip(batch, results, strict=True):
            if not 0 <= index < total or filled[index]:
                raise ValueError(f"batches do not cover 0..{total - 1} exactly once (index {index})")
            out[index] = result
            filled[index] = True
    return out
