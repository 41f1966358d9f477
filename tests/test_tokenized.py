"""The tokenised data set on disk (poise.data.tokenized): the same tokens and exclusions as `tokenize_examples`,
built once per content/tokenizer/template/length and mapped after, with every input error as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pipeline_fixtures import conversation
from tiny import tiny_tokenizer, write_jsonl

from poise.data import read_examples, tokenize_examples
from poise.data.tokenized import tokenized_set
from poise.errors import PoiseError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POISE_CACHE", str(tmp_path / "cache"))


def pool_rows(n: int = 30) -> list[dict]:
    rows = [conversation(i, 2 + (i * 5) % 13) for i in range(n)]
    rows.append({"id": "user-only", "messages": [{"role": "user", "content": "hello there"}]})  # no target: excluded
    rows.append({"id": "pre", "input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]})  # pretokenized
    rows.append({"id": "alp", "instruction": "Add two and two.", "output": "Four."})
    return rows


@pytest.mark.parametrize("template,length", [("auto", 64), ("tulu", 24), ("tulu-less", 40), ("plain", 16)])
def test_the_set_holds_exactly_what_tokenize_examples_returns(tmp_path, template, length) -> None:
    path = write_jsonl(tmp_path / "pool.jsonl", pool_rows())
    if template == "plain":
        path = write_jsonl(tmp_path / "plain.jsonl", [{"id": f"p{i}", "prompt": f"What is {i}?",
                                                        "completion": f" It is {i}."} for i in range(12)])
    tokenizer = tiny_tokenizer()
    kept, tokenized, excluded = tokenize_examples(read_examples(path), tokenizer, length, template=template,
                                                  progress=False)
    data = tokenized_set([path], tokenizer, length, template=template, report=False)
    assert len(data) == len(kept) and data.n_rows == len(read_examples(path))
    assert data.rows.tolist() == kept
    assert data.lengths.tolist() == [len(t.input_ids) for t in tokenized]
    got = data.items(np.arange(len(data)))
    assert [t.input_ids for t in got] == [t.input_ids for t in tokenized]
    assert [t.labels for t in got] == [t.labels for t in tokenized]
    assert [(w, i, r) for w, i, r in data.excluded()] == [(e.where, e.id, r) for e, r in excluded]
    ids = list(data.columns(["id", "task"]))
    examples = read_examples(path)
    assert ids == [{"id": examples[i].id, "task": examples[i].task} for i in kept]


def test_built_once_then_mapped_and_rebuilt_when_the_content_changes(tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path / "pool.jsonl", pool_rows())
    tokenizer = tiny_tokenizer()
    first = tokenized_set([path], tokenizer, 64, report=False)
    assert "poise: tokenize: 33 examples with 1 process into poise's cache" in capsys.readouterr().err
    again = tokenized_set([path], tokenizer, 64, report=False)
    assert capsys.readouterr().err == "" and again.folder == first.folder
    other_length = tokenized_set([path], tokenizer, 32, report=False)
    assert other_length.folder != first.folder
    rows = pool_rows()
    rows[0]["messages"][1]["content"] = "changed"
    write_jsonl(path, rows)
    changed = tokenized_set([path], tokenizer, 64, report=False)
    assert changed.folder != first.folder
    assert changed.item(0).input_ids != first.item(0).input_ids


def test_several_processes_build_the_same_set(tmp_path, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "pool.jsonl", pool_rows(2500))
    tokenizer = tiny_tokenizer()
    monkeypatch.setenv("POISE_TOKENIZE_PROCESSES", "1")
    one = tokenized_set([path], tokenizer, 64, report=False)
    items = one.items(np.arange(len(one)))
    monkeypatch.setenv("POISE_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv("POISE_TOKENIZE_PROCESSES", "2")
    two = tokenized_set([path], tokenizer, 64, report=False)
    assert len(two.meta["shards"]) == 2
    assert two.rows.tolist() == one.rows.tolist()
    assert [t.input_ids for t in two.items(np.arange(len(two)))] == [t.input_ids for t in items]


def test_input_errors_are_the_same_lines_as_before(tmp_path) -> None:
    tokenizer = tiny_tokenizer()
    dup = write_jsonl(tmp_path / "dup.jsonl", [conversation(0, 3), conversation(0, 4)])
    with pytest.raises(PoiseError, match=r"dup\.jsonl:2: duplicate id 'ex0' \(first at .*dup\.jsonl:1\)$"):
        tokenized_set([dup], tokenizer, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conversation(0, 3)) + "\n{not json\n")
    with pytest.raises(PoiseError, match=r"bad\.jsonl:2: "):
        tokenized_set([bad], tokenizer, 64)
    with pytest.raises(PoiseError, match="no such file or folder"):
        tokenized_set([tmp_path / "missing.jsonl"], tokenizer, 64)
    only_users = write_jsonl(tmp_path / "users.jsonl", [{"id": "u", "messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(PoiseError, match=r"^all 1 examples were excluded; the first, .*users\.jsonl:1 \(id 'u'\)"):
        tokenized_set([only_users], tokenizer, 64)
