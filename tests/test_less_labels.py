"""`--template tulu-less` and `--template plain` tokenise and label exactly as LESS does (tests/oracles.py)."""

from __future__ import annotations

import pytest
from oracles import less_plain_encoding, less_tulu_encoding
from tiny import tiny_tokenizer

from poise.data import read_examples, tokenize_example
from poise.data.formats import IGNORE_INDEX

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "List three colors:"}, {"role": "assistant", "content": " red, green and blue. "},
     {"role": "user", "content": "And one more?"}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Write a function"},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}, {"role": "user", "content": "Thank you!"}],
]


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_tulu_less_equals_less_encode_with_messages_format(tmp_path, add_bos, k) -> None:
    import json

    tokenizer = tiny_tokenizer(chat_template=False, add_bos=add_bos)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "x", "messages": CONVERSATIONS[k]}) + "\n")
    example = read_examples(path)[0]
    got = tokenize_example(example, tokenizer, 512, template="tulu-less")
    ids, labels = less_tulu_encoding(CONVERSATIONS[k], tokenizer)
    assert got.input_ids == ids and got.labels == labels
    if k == 1:  # the newline after a non-final EOS is a target here, and not with poise's own tulu labels
        tulu = tokenize_example(example, tokenizer, 512, template="tulu")
        assert sum(a != IGNORE_INDEX for a in got.labels) > sum(a != IGNORE_INDEX for a in tulu.labels)


@pytest.mark.parametrize("add_bos", [True, False])
def test_plain_equals_less_validation_rows(tmp_path, add_bos) -> None:
    import json

    tokenizer = tiny_tokenizer(add_bos=add_bos)
    prompt, completion = "Question: What is two plus two?\nAnswer:", " four"
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"id": "v", "prompt": prompt, "completion": completion}) + "\n")
    got = tokenize_example(read_examples(path)[0], tokenizer, 512, template="plain")
    ids, labels = less_plain_encoding(prompt, completion, tokenizer)
    assert got.input_ids == ids and got.labels == labels
