"""`--template tulu-less` and `--template plain` tokenise and label exactly as LESS does.

The oracles (tests/oracles.py) restate princeton-nlp/LESS at commit 8abf9628b9a814ac3045445eebc8ba3c908fdc78:
`encode_with_messages_format` and `concat_messages` in less/data_selection/get_training_dataset.py (lines
126-190), and `tokenize` in less/data_selection/get_validation_dataset.py (lines 15-48). Every case is checked
token for token and label for label, with tokenizers that add no special token, a BOS, or a BOS and an EOS,
and at every `max_seq_length` from the special tokens' count to past the end (truncation inside every turn,
headers and EOS included).
"""

from __future__ import annotations

import json

import pytest
from oracles import less_concat_messages, less_plain_encoding, less_tulu_encoding
from tiny import tiny_tokenizer

from poise.data import read_examples, tokenize_example
from poise.data.formats import IGNORE_INDEX
from poise.data.templates import _Encoder

CONVERSATIONS = {
    "single-turn": [{"role": "user", "content": "What is two plus two?"},
                    {"role": "assistant", "content": "Two plus two is four."}],
    "system, multi-turn": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "List three colors:"}, {"role": "assistant", "content": " red, green and blue. "},
        {"role": "user", "content": "And one more?"}, {"role": "assistant", "content": "Blue."}],
    "ends with a user turn": [{"role": "user", "content": "Write a function"},
                              {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
                              {"role": "user", "content": "Thank you!"}],
    "two assistant turns in a row": [{"role": "user", "content": "Count: "},
                                     {"role": "assistant", "content": "one"},
                                     {"role": "assistant", "content": "two\n"}],
}
TOKENIZERS = {"no special tokens": {}, "BOS": {"add_bos": True}, "BOS and EOS": {"add_bos": True, "add_eos": True}}


def _example(tmp_path, row: dict):
    path = tmp_path / f"{row['id']}.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return read_examples(path)[0]


def _full_length(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer(less_concat_messages(messages, tokenizer.eos_token))["input_ids"])


@pytest.mark.parametrize("special", list(TOKENIZERS))
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_tulu_less_equals_less_encode_with_messages_format(tmp_path, special, case) -> None:
    tokenizer = tiny_tokenizer(chat_template=False, **TOKENIZERS[special])
    messages = CONVERSATIONS[case]
    example = _example(tmp_path, {"id": "x", "messages": messages})
    full = _full_length(tokenizer, messages)
    for max_seq_length in [*range(max(1, tokenizer.num_special_tokens_to_add()), full + 2), 2048]:  # inside every turn
        got = _Encoder(tokenizer, "tulu-less", max_seq_length).encode([example])[0][0]
        ids, labels = less_tulu_encoding(messages, tokenizer, max_seq_length)
        assert (got.input_ids, got.labels) == (ids, labels), f"max_seq_length={max_seq_length}"


def test_tulu_less_trains_on_the_newline_after_the_last_eos(tmp_path) -> None:
    """The case today's code failed: a single-turn chat ends with EOS + "\\n" and both are targets."""
    tokenizer = tiny_tokenizer(chat_template=False, add_bos=True)
    messages = CONVERSATIONS["single-turn"]
    got = tokenize_example(_example(tmp_path, {"id": "x", "messages": messages}), tokenizer, 512, template="tulu-less")
    assert got.input_ids == tokenizer(less_concat_messages(messages, "</s>"))["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert got.input_ids[-len(newline) - 1:] == [tokenizer.eos_token_id, *newline]
    assert got.labels[-len(newline) - 1:] == [tokenizer.eos_token_id, *newline]


def test_tulu_differs_from_tulu_less_only_by_poises_own_rule(tmp_path) -> None:
    """`tulu` renders the same text but masks the newline after every EOS (and, where LESS does not, the header of
    an assistant turn that follows another): strictly fewer targets, never other tokens."""
    tokenizer = tiny_tokenizer(chat_template=False, add_bos=True)
    for case, messages in CONVERSATIONS.items():
        example = _example(tmp_path, {"id": "x", "messages": messages})
        less = tokenize_example(example, tokenizer, 512, template="tulu-less")
        tulu = tokenize_example(example, tokenizer, 512, template="tulu")
        assert tulu.input_ids == less.input_ids, case
        assert all(a == b for a, b in zip(tulu.labels, less.labels, strict=True) if a != IGNORE_INDEX), case
        assert tulu.n_targets < less.n_targets, case


@pytest.mark.parametrize("special", list(TOKENIZERS))
@pytest.mark.parametrize("prompt, completion", [
    ("Question: What is two plus two?\nAnswer:", " four"),
    ("<|user|>\nSolve: 3x + 5 = 20.\n<|assistant|>\nThe answer is:", " 5"),
    ("for i in range(10):\n", "    print(i * i)"),
])
def test_plain_equals_less_validation_rows(tmp_path, special, prompt, completion) -> None:
    tokenizer = tiny_tokenizer(chat_template=False, **TOKENIZERS[special])
    example = _example(tmp_path, {"id": "v", "prompt": prompt, "completion": completion})
    full = len(tokenizer(prompt + completion)["input_ids"])
    for max_seq_length in [*range(max(1, tokenizer.num_special_tokens_to_add()), full + 2), 2048]:
        got = _Encoder(tokenizer, "plain", max_seq_length).encode([example])[0][0]
        ids, labels = less_plain_encoding(prompt, completion, tokenizer, max_seq_length)
        assert (got.input_ids, got.labels) == (ids, labels), f"max_seq_length={max_seq_length}"
    # no EOS is appended (unless the tokenizer itself appends one, as LESS's call would too)
    got = tokenize_example(example, tokenizer, 2048, template="plain")
    assert (got.input_ids[-1] == tokenizer.eos_token_id) == bool(TOKENIZERS[special].get("add_eos"))


def test_less_modes_exclude_rows_left_without_a_target(tmp_path) -> None:
    """LESS keeps a row whose targets were all truncated away (its loss is then 0/0); poise reports and drops it."""
    from poise.data import tokenize_examples

    tokenizer = tiny_tokenizer(chat_template=False, add_bos=True)
    short = _example(tmp_path, {"id": "x", "messages": CONVERSATIONS["single-turn"]})
    question = [{"role": "user", "content": "Explain why the sky is blue. " * 8}]
    long = _example(tmp_path, {"id": "long", "messages": [*question, {"role": "assistant", "content": "Rayleigh."}]})
    with pytest.warns(Warning, match="no target tokens within max_seq_length=24"):
        kept, _, excluded = tokenize_examples([short, long], tokenizer, 24, template="tulu-less")
    assert kept == [0] and [e.id for e, _ in excluded] == ["long"]


def test_less_modes_refuse_a_length_the_tokenizer_cannot_truncate_to() -> None:
    """Below the special tokens' count the tokenizer's truncation returns the whole text: refused, not cut."""
    from poise.errors import PoiseError

    tokenizer = tiny_tokenizer(chat_template=False, add_bos=True, add_eos=True)
    with pytest.raises(PoiseError, match="max_seq_length=1 is less than the 2 special tokens"):
        _Encoder(tokenizer, "tulu-less", 1)
