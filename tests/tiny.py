"""A tiny tokenizer and Llama built in code, for tests that need a real model but no download.

`tiny_tokenizer()` trains a byte-level BPE (vocab 400) on a small fixed corpus in a few milliseconds and
wraps it as a transformers fast tokenizer with <s>/</s>/<pad> and, by default, a ChatML chat template.
It is cached: treat the returned object as read-only (ask for a variant through the arguments instead).
`tiny_llama(tokenizer)` is a seeded float32 `LlamaForCausalLM` with a few thousand parameters per layer.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML as SmolLM2 and Qwen write it (without their default system prompt)."""

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus two? Two plus two is four.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a function that returns the sum of a list of numbers.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Solve for x: 3x + 5 = 20. Subtract 5 from both sides, then divide by 3, so x = 5.",
    "You are a helpful assistant. Answer the question briefly and correctly.",
    "Translate to French: good morning. Bonjour.",
    "List three colors: red, green and blue.",
    "Explain why the sky is blue in one sentence.",
    "Summarize the following text in one line.",
    "The answer is 42. Thank you! Hello, how are you today?",
    "system user assistant human gpt model instruction input output prompt completion",
    "<|system|>\n<|user|>\n<|assistant|>\n",
    "Question: Which number is larger, 7 or 9? Answer: 9 is larger than 7.",
    "Count the words in this sentence, please. There are seven words.",
]


@functools.cache
def tiny_tokenizer(chat_template: bool = True, add_bos: bool = False, add_eos: bool = False):
    """A byte-level BPE tokenizer (vocab 400, ids 0..4 = <pad> <s> </s> <|im_start|> <|im_end|>).

    `chat_template` attaches the ChatML template; `add_bos` makes the tokenizer prepend <s> when called with
    add_special_tokens=True, as Llama's does (the tulu path must then keep exactly one BOS); `add_eos` makes it
    append </s> too (as some seq2seq-era tokenizers do), so truncation keeps the EOS last.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 4, trainer)
    if add_bos or add_eos:
        single = ("<s> " if add_bos else "") + "$A" + (" </s>" if add_eos else "")
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=single + " " + single.replace("$A", "$B"),
            special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A randomly initialised float32 LlamaForCausalLM sized for `tokenizer`, in eval mode (like from_pretrained)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32).eval()


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write `rows` as JSON lines (UTF-8, one object per line) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path
