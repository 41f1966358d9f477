"""The data layer: read every input format, render with assistant-only labels, batch by token budget.

`read_examples` normalises files and folders to `Example`s (formats.py); `tokenize_examples` renders them
with the tokenizer's chat template or the tulu template and masks everything but assistant turns
(templates.py); `token_budget_batches`, `collate` and `restore_order` feed them to a model and put the
results back in input order (batching.py). Nothing here imports torch or transformers at import time.
"""

from __future__ import annotations

from poise.data.batching import Batches, PaddingSide, batch_plan, collate, restore_order, token_budget_batches
from poise.data.formats import IGNORE_INDEX, ROW_FORMATS, Example, read_examples
from poise.data.templates import (
    TULU_GENERATION_PROMPT,
    TULU_TEMPLATE,
    ChatTemplate,
    Tokenized,
    render_tulu,
    tokenize_example,
    tokenize_examples,
)
from poise.data.tokenized import ItemView, TokenizedSet, tokenized_set

__all__ = [
    "IGNORE_INDEX",
    "ROW_FORMATS",
    "TULU_GENERATION_PROMPT",
    "TULU_TEMPLATE",
    "Batches",
    "ChatTemplate",
    "Example",
    "ItemView",
    "PaddingSide",
    "Tokenized",
    "TokenizedSet",
    "batch_plan",
    "collate",
    "read_examples",
    "render_tulu",
    "restore_order",
    "token_budget_batches",
    "tokenize_example",
    "tokenize_examples",
    "tokenized_set",
]
