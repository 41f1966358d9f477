"""The data layer: every input format, ids, bad input, assistant-only labels, truncation, batching, collation."""

from __future__ import annotations

import copy
import json
import os
import random
import re

import pytest
from tiny import CHATML_TEMPLATE, tiny_llama, tiny_tokenizer, write_jsonl

from poise.data import (
    IGNORE_INDEX,
    Example,
    Tokenized,
    collate,
    read_examples,
    restore_order,
    token_budget_batches,
    tokenize_example,
    tokenize_examples,
)
from poise.errors import PoiseError, PoiseWarning

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": " Paris. "},
]
ANSWERS = ["Two plus two is four.", "Paris."]


def conversation(messages=CHAT, id_="c", where="mem:1") -> Example:
    return Example(id_, [dict(m) for m in messages], None, None, None, where)


def target_runs(tokenizer, item: Tokenized) -> list[str]:
    """The decoded maximal runs of target tokens, in order."""
    runs, run = [], []
    for token, label in zip(item.input_ids, item.labels, strict=True):
        if label == IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            assert label == token  # a target's label is the token itself
            run.append(token)
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


def with_template(template: str, add_bos: bool = False):
    tokenizer = copy.deepcopy(tiny_tokenizer(chat_template=True, add_bos=add_bos))  # the cached one stays as it is
    tokenizer.chat_template = template
    return tokenizer


# ------------------------------------------------------------------------------------ formats
def test_tulu_messages_keep_id_dataset_and_task(tmp_path) -> None:
    path = write_jsonl(tmp_path / "pool.jsonl", [
        {"id": "a", "dataset": "flan_v2", "task": "math", "messages": CHAT},
        {"messages": [{"role": "user", "content": "hi", "extra": 1}, {"role": "assistant", "content": "yo"}]},
    ])
    first, second = read_examples(path, task="pool")
    assert (first.id, first.dataset, first.task, first.where) == ("a", "flan_v2", "math", f"{path}:1")
    assert first.messages == CHAT and first.input_ids is None and first.labels is None
    assert (second.id, second.task, second.where) == ("1", "pool", f"{path}:2")
    assert second.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_alpaca_joins_instruction_and_nonempty_input_with_a_blank_line(tmp_path) -> None:
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour."},
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        {"instruction": "Name a color.", "output": "Blue.", "id": 7},
    ])
    a, b, c = read_examples(path)
    assert a.messages == [{"role": "user", "content": "Translate to French.\n\ngood morning"},
                          {"role": "assistant", "content": "Bonjour."}]
    assert b.messages[0] == {"role": "user", "content": "Name a color."}
    assert (c.id, c.messages[1]["content"]) == ("7", "Blue.")


def test_sharegpt_speakers_become_roles(tmp_path) -> None:
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "Again"}, {"from": "model", "value": "Hello again"},
        {"from": "human", "value": "Once more"}, {"from": "assistant", "value": "Hi"},
    ]}])
    (example,) = read_examples(path)
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                                     "assistant"]
    assert example.messages[2]["content"] == "Hello"


def test_prompt_completion_plain_and_conversational(tmp_path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "What is 7 + 2?", "completion": "9"},
        {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
    ])
    plain, chat = read_examples(path)
    assert plain.messages == [{"role": "user", "content": "What is 7 + 2?"}, {"role": "assistant", "content": "9"}]
    assert chat.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_pretokenized_labels_default_to_every_input_id(tmp_path) -> None:
    path = write_jsonl(tmp_path / "tok.jsonl", [
        {"input_ids": [5, 6, 7]},
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ])
    given, masked = read_examples(path)
    assert (given.messages, given.input_ids, given.labels) == (None, [5, 6, 7], [5, 6, 7])
    assert masked.labels == [-100, 6, 7]


def test_json_list_rows_are_named_by_index(tmp_path) -> None:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"id": "x", "prompt": "c", "completion": "d"}]))
    first, second = read_examples(path)
    assert (first.id, first.where, second.id, second.where) == ("0", f"{path}[0]", "x", f"{path}[1]")


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path) -> None:
    path = write_jsonl(tmp_path / "pool.json", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    assert [e.where for e in read_examples(path)] == [f"{path}:1", f"{path}:2"]


def test_parquet_rows_with_absent_columns_read_as_null(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {  # a union schema, as when mixed sources are concatenated: absent fields are null
        "id": ["m", "p"],
        "messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None],
        "instruction": [None, "Name a color."],
        "output": [None, "Red."],
    }
    pq.write_table(pa.Table.from_pydict(columns), tmp_path / "pool.parquet")
    m, p = read_examples(tmp_path / "pool.parquet", task="t")
    assert (m.id, m.where, m.task) == ("m", f"{tmp_path / 'pool.parquet'}[0]", "t")
    assert m.messages[1] == {"role": "assistant", "content": "a"}
    assert p.messages == [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."}]


def test_datasets_folder_from_save_to_disk(tmp_path) -> None:
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    examples = read_examples(tmp_path / "ds")
    assert [e.id for e in examples] == ["0", "1", "2"]
    assert examples[2].where == f"{tmp_path / 'ds'}[2]"
    assert examples[2].messages == rows[2]["messages"]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "only_train")
    assert len(read_examples(tmp_path / "only_train")) == 3
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)})
    splits.save_to_disk(tmp_path / "two")
    with pytest.raises(PoiseError, match=r"two: a DatasetDict with splits .*point to one split's folder"):
        read_examples(tmp_path / "two")
    assert len(read_examples(tmp_path / "two" / "test")) == 3


@pytest.fixture
def hub_datasets(tmp_path, monkeypatch):
    """An empty datasets cache under tmp_path, in offline mode: no test here may reach the network.

    datasets and huggingface_hub read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / HF_DATASETS_CACHE into their config
    modules at import, so those are patched as well as the environment.
    """
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "datasets"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", str(tmp_path / "hf")), ("HF_DATASETS_CACHE", str(cache)),
                        ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_hub_dataset(cache, repo: str, rows: list[dict], split: str = "train") -> None:
    """Put `rows` into the datasets cache the way `load_dataset(repo)` leaves a downloaded dataset there
    (`org___name/default/<version>/<hash>/name-<split>.arrow` + dataset_info.json), built offline from JSON."""
    import shutil

    import datasets

    build = cache.parent / "build"
    build.mkdir(exist_ok=True)
    datasets.load_dataset("json", data_files={split: str(write_jsonl(build / "rows.jsonl", rows))},
                          cache_dir=str(build))
    prepared = next(p for p in (build / "json").glob("*/*/*") if p.is_dir())
    org, name = repo.split("/")
    target = cache / f"{org}___{name}" / "default" / prepared.parent.name / prepared.name
    target.mkdir(parents=True)
    for file in prepared.iterdir():
        shutil.copy(file, target / file.name.replace("json-", f"{name}-", 1))


def test_offline_hub_dataset_not_in_the_cache_is_one_line(hub_datasets, capsys) -> None:
    with pytest.raises(PoiseError) as caught:
        read_examples("some-org/not-cached")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("some-org/not-cached: no such file or folder, and the Hugging Face Hub dataset "
                              "some-org/not-cached is not in the local datasets cache")
    assert "offline mode is on (HF_HUB_OFFLINE=1" in message and "local file" in message
    assert capsys.readouterr().err == ""  # no download announced


def test_hub_dataset_in_the_local_cache_is_read_offline_like_a_datasets_folder(hub_datasets) -> None:
    rows = [{"id": "a", "prompt": "1+1", "completion": "2", "task": None},
            {"id": "b", "prompt": "2+2", "completion": "4", "task": "math"}]
    cache_hub_dataset(hub_datasets, "poise-test/tiny_pool", rows)
    for spec in ("poise-test/tiny_pool", "poise-test/tiny_pool:train", "poise-test/tiny_pool@default:train"):
        a, b = read_examples(spec, task="chat")
        assert (a.id, a.task, a.where) == ("a", "chat", f"{spec}[0]")
        assert (b.id, b.task, b.where) == ("b", "math", f"{spec}[1]")
        assert b.messages == [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    with pytest.raises(PoiseError, match=r"^poise-test/tiny_pool:test: Unknown split \"test\". Should be one of "
                                         r"\['train'\]. \(choose with poise-test/tiny_pool@CONFIG:SPLIT\)$"):
        read_examples("poise-test/tiny_pool:test")
    with pytest.raises(PoiseError, match=r"^poise-test/tiny_pool@other: Couldn't find cache .* 'other'"):
        read_examples("poise-test/tiny_pool@other")


def test_online_hub_dataset_is_announced_and_loaded_with_load_dataset(hub_datasets, monkeypatch, capsys) -> None:
    import datasets
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):  # the Hub, as far as this test is concerned
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    [example] = read_examples("allenai/tulu-v2-sft-mixture")
    assert (example.id, example.where) == ("0", "allenai/tulu-v2-sft-mixture[0]")
    read_examples("HuggingFaceH4/ultrachat_200k@default:train_sft")
    assert calls == [("allenai/tulu-v2-sft-mixture", None, {"split": "train"}),
                     ("HuggingFaceH4/ultrachat_200k", "default", {"split": "train_sft"})]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"poise: downloading dataset allenai/tulu-v2-sft-mixture from the Hugging Face Hub into "
                      f"{hub_datasets} (once: later runs use the cache; HF_HOME or HF_DATASETS_CACHE moves it)")
    assert len(err) == 2


@pytest.mark.parametrize("spec", ["data/pool.jsonl", "data/pool.parquet", "./org/name", "org/name/", "a/b/c",
                                  "~/org/name", "org\\name", "pool"])
def test_missing_local_paths_are_never_taken_for_hub_datasets(hub_datasets, spec) -> None:
    from pathlib import Path

    with pytest.raises(PoiseError) as caught:
        read_examples(spec)
    assert str(caught.value) == f"{Path(spec)}: no such file or folder"  # as before hub ids existed


def test_an_existing_folder_wins_over_a_hub_id_and_a_path_object_is_a_path(hub_datasets, tmp_path,
                                                                          monkeypatch) -> None:
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    write_jsonl(tmp_path / "org" / "name" / "math.jsonl", [{"prompt": "1+1", "completion": "2"}])
    assert [e.task for e in read_examples("org/name")] == ["math"]
    with pytest.raises(PoiseError, match=r"^other/name: no such file or folder$"):
        read_examples(Path("other/name"))


def test_folder_of_task_files_takes_task_from_stem_unless_the_row_has_one(tmp_path) -> None:
    write_jsonl(tmp_path / "math.jsonl", [{"prompt": "1+1", "completion": "2"}, {"prompt": "2+2", "completion": "4"}])
    write_jsonl(tmp_path / "code.jsonl", [{"prompt": "p", "completion": "c", "task": "python", "id": "own"}])
    (tmp_path / "notes.txt").write_text("ignored")
    examples = read_examples(tmp_path, task="ignored")
    assert [(e.id, e.task) for e in examples] == [("own", "python"), ("math/0", "math"), ("math/1", "math")]
    assert examples[1].where == f"{tmp_path / 'math.jsonl'}:1"


def test_task_argument_is_the_default_and_the_row_field_wins(tmp_path) -> None:
    path = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "a", "completion": "b", "task": "own"},
                                              {"prompt": "a", "completion": "b"}])
    assert [e.task for e in read_examples(path, task="arg")] == ["own", "arg"]
    assert [e.task for e in read_examples(path)] == ["own", None]


def test_ids_come_from_the_field_else_the_index_and_may_mix(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b", "id": 10},
                                              {"prompt": "a", "completion": "b"},
                                              {"prompt": "a", "completion": "b", "id": "z"}])
    assert [e.id for e in read_examples(path)] == ["10", "1", "z"]


def test_duplicate_ids_name_both_places(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b", "id": "x"},
                                              {"prompt": "a", "completion": "b"},
                                              {"prompt": "a", "completion": "b", "id": "x"}])
    with pytest.raises(PoiseError, match=re.escape(f"{path}:3: duplicate id 'x' (first at {path}:1)")):
        read_examples(path)
    index_clash = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "completion": "b", "id": "1"},
                                                     {"prompt": "a", "completion": "b"}])
    with pytest.raises(PoiseError, match=re.escape(f"{index_clash}:2: duplicate id '1' (first at {index_clash}:1)")):
        read_examples(index_clash)


# ------------------------------------------------------------------------------------ bad input
def bad(tmp_path, lines: list[str], name: str = "bad.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "a", "completion": "b"})


def test_malformed_json_line_names_file_and_line(tmp_path) -> None:
    path = bad(tmp_path, [GOOD, '{"prompt": "a", "completion": '])
    with pytest.raises(PoiseError, match=re.escape(f"{path}:2: not valid JSON")):
        read_examples(path)


def test_malformed_json_file_names_the_line(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": }\n]')
    with pytest.raises(PoiseError, match=re.escape(f"{path}:3: not valid JSON")):
        read_examples(path)


def test_unknown_row_format_lists_the_accepted_ones(tmp_path) -> None:
    path = bad(tmp_path, [GOOD, json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(PoiseError) as caught:
        read_examples(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: unknown row format (fields: answer, question); expected one of:")
    for name in ("messages", "conversations", "alpaca", "prompt/completion", "input_ids"):
        assert name in message
    assert "\n" not in message


def test_unknown_role_names_line_message_and_the_roles_expected(tmp_path) -> None:
    path = bad(tmp_path, [GOOD, GOOD, json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                {"role": "bot", "content": "a"}]})])
    with pytest.raises(PoiseError, match=re.escape(
            f"{path}:3: message 2 has unknown role 'bot' (expected system, user, assistant)")):
        read_examples(path)


def test_unknown_sharegpt_speaker(tmp_path) -> None:
    turns = [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]
    path = bad(tmp_path, [json.dumps({"conversations": turns})])
    with pytest.raises(PoiseError, match=re.escape(f"{path}:1: message 2 has unknown 'from' 'bot' (expected human")):
        read_examples(path)


@pytest.mark.parametrize("row, field", [
    ({"messages": [{"role": "user", "content": ["a", "b"]}]}, "message 1 content must be a string, got list"),
    ({"messages": [{"role": "user"}]}, "message 1 content must be a string, got NoneType"),
    ({"conversations": [{"from": "human", "value": 3}]}, "message 1 value must be a string, got int"),
    ({"instruction": "i", "output": 5}, "field 'output' must be a string, got int"),
    ({"prompt": "p", "completion": {"text": "c"}}, "field 'completion' must be a string, got dict"),
    ({"messages": []}, "field 'messages' is empty"),
    ({"messages": "hi"}, "field 'messages' must be a list of messages, got str"),
    ({"id": [1], "prompt": "p", "completion": "c"}, "field 'id' must be a string or an integer, got list"),
    ({"task": 3, "prompt": "p", "completion": "c"}, "field 'task' must be a string, got int"),
])
def test_non_string_content_and_bad_fields_name_the_field(tmp_path, row, field) -> None:
    path = bad(tmp_path, [GOOD, json.dumps(row)])
    with pytest.raises(PoiseError, match=re.escape(f"{path}:2: {field}")):
        read_examples(path)


@pytest.mark.parametrize("row, field", [
    ({"input_ids": [1, 2, 3], "labels": [1, 2]}, "field 'labels' has 2 items but 'input_ids' has 3"),
    ({"input_ids": [1, "2", 3]}, "field 'input_ids' must be a list of integers (item 1 is '2')"),
    ({"input_ids": [1, 2.5]}, "field 'input_ids' must be a list of integers (item 1 is 2.5)"),
    ({"input_ids": [1, 2], "labels": [1, True]}, "field 'labels' must be a list of integers (item 1 is True)"),
    ({"input_ids": [1, -2]}, "field 'input_ids' holds a negative token id"),
    ({"input_ids": [1, 2], "labels": [-1, 2]}, "field 'labels' holds a negative label other than -100"),
    ({"input_ids": []}, "field 'input_ids' is empty"),
])
def test_bad_pretokenized_rows_name_the_field(tmp_path, row, field) -> None:
    path = bad(tmp_path, [json.dumps(row)])
    with pytest.raises(PoiseError, match=re.escape(f"{path}:1: {field}")):
        read_examples(path)


def test_bad_row_in_a_json_list_is_named_by_index(tmp_path) -> None:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, ["not", "an", "object"]]))
    with pytest.raises(PoiseError, match=re.escape(f"{path}[1]: expected an object, got list")):
        read_examples(path)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.json", "[]"),
                                        ("nothing.json", "")])
def test_empty_file_is_an_error(tmp_path, name, text) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(PoiseError, match=re.escape(f"{tmp_path / name}: empty file")):
        read_examples(tmp_path / name)


def test_empty_task_file_in_a_folder_is_an_error(tmp_path) -> None:
    write_jsonl(tmp_path / "math.jsonl", [{"prompt": "1+1", "completion": "2"}])
    (tmp_path / "code.jsonl").write_text("")
    with pytest.raises(PoiseError, match=re.escape(f"{tmp_path / 'code.jsonl'}: empty file")):
        read_examples(tmp_path)


def test_missing_file_unknown_suffix_and_folder_without_data(tmp_path) -> None:
    with pytest.raises(PoiseError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file or folder")):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "pool.csv").write_text("a,b\n")
    with pytest.raises(PoiseError, match=r"pool.csv: unsupported file type '.csv'"):
        read_examples(tmp_path / "pool.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoiseError, match=r"empty: no .jsonl, .json or .parquet files"):
        read_examples(tmp_path / "empty")


def test_binary_file_is_reported_not_utf8(tmp_path) -> None:
    (tmp_path / "pool.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PoiseError, match=r"pool.jsonl: not UTF-8 text"):
        read_examples(tmp_path / "pool.jsonl")
    (tmp_path / "pool.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PoiseError, match=r"pool.parquet: cannot read as parquet"):
        read_examples(tmp_path / "pool.parquet")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_reported(tmp_path) -> None:
    path = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "a", "completion": "b"}])
    path.chmod(0)
    try:
        with pytest.raises(PoiseError, match=re.escape(f"{path}: cannot read")):
            read_examples(path)
    finally:
        path.chmod(0o644)


# ------------------------------------------------------------------------------------ labels
def test_chat_template_targets_are_exactly_assistant_contents_and_end_of_turn() -> None:
    tokenizer = tiny_tokenizer()
    item = tokenize_example(conversation(), tokenizer, 512)  # auto -> the tokenizer's ChatML template
    assert tokenizer.decode(item.input_ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert target_runs(tokenizer, item) == ["Two plus two is four.<|im_end|>", " Paris. <|im_end|>"]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(label == IGNORE_INDEX for token, label in zip(item.input_ids, item.labels, strict=True)
               if token == im_start)  # no header token is ever a target


def test_tulu_template_targets_are_exactly_stripped_assistant_contents_and_eos() -> None:
    tokenizer = tiny_tokenizer()
    item = tokenize_example(conversation(), tokenizer, 512, template="tulu")
    assert tokenizer.decode(item.input_ids) == (
        "<|system|>\nYou are a helpful assistant.\n<|user|>\nWhat is two plus two?\n"
        "<|assistant|>\nTwo plus two is four.</s>\n<|user|>\nAnd the capital of France?\n<|assistant|>\nParis.</s>\n")
    assert target_runs(tokenizer, item) == [answer + "</s>" for answer in ANSWERS]


def test_auto_template_is_tulu_without_a_chat_template() -> None:
    plain = tiny_tokenizer(chat_template=False)
    auto = tokenize_example(conversation(), plain, 512)
    assert auto == tokenize_example(conversation(), plain, 512, template="tulu")
    with pytest.raises(PoiseError, match=r"template 'chat' was asked for but the tokenizer has no chat template"):
        tokenize_example(conversation(), plain, 512, template="chat")


def test_tulu_adds_the_tokenizers_bos_once() -> None:
    tokenizer = tiny_tokenizer(chat_template=True, add_bos=True)  # prepends <s> like Llama's
    tulu = tokenize_example(conversation(), tokenizer, 512, template="tulu")
    assert tulu.input_ids[0] == tokenizer.bos_token_id and tulu.input_ids.count(tokenizer.bos_token_id) == 1
    assert tulu.labels[0] == IGNORE_INDEX
    assert target_runs(tokenizer, tulu) == [answer + "</s>" for answer in ANSWERS]
    chat = tokenize_example(conversation(), tokenizer, 512, template="chat")  # the template decides: no BOS in it
    assert tokenizer.bos_token_id not in chat.input_ids


def test_chat_template_that_writes_bos_gets_it_once() -> None:
    tokenizer = with_template("{{ bos_token }}" + CHATML_TEMPLATE, add_bos=True)
    item = tokenize_example(conversation(), tokenizer, 512)
    assert item.input_ids[0] == tokenizer.bos_token_id and item.input_ids.count(tokenizer.bos_token_id) == 1
    assert target_runs(tokenizer, item) == ["Two plus two is four.<|im_end|>", " Paris. <|im_end|>"]


def test_chat_template_without_generation_prompt_still_masks_the_header() -> None:
    tokenizer = with_template(CHATML_TEMPLATE.split("{% if add_generation_prompt %}")[0])
    item = tokenize_example(conversation(), tokenizer, 512)
    assert target_runs(tokenizer, item) == ["Two plus two is four.<|im_end|>", " Paris. <|im_end|>"]


def test_conversation_opening_with_the_assistant() -> None:
    messages = [{"role": "assistant", "content": "Hello, how are you today?"}, {"role": "user", "content": "Fine."},
                {"role": "assistant", "content": "Thank you!"}]
    for template, end in (("chat", "<|im_end|>"), ("tulu", "</s>")):
        item = tokenize_example(conversation(messages), tiny_tokenizer(), 512, template=template)
        assert target_runs(tiny_tokenizer(), item) == ["Hello, how are you today?" + end, "Thank you!" + end]


def test_token_straddling_the_header_falls_back_to_character_offsets(monkeypatch) -> None:
    # "Assistant: " + "two..." tokenises as "Assistant", ":", " two": the header's space joins the content,
    # so the rendered prefix's tokens are not a prefix of the conversation's tokens
    template = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n"
                "{% else %}Assistant: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}Assistant: {% endif %}")
    tokenizer = with_template(template)
    messages = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "two is four."}]
    item = tokenize_example(conversation(messages), tokenizer, 512)
    assert target_runs(tokenizer, item) == [" two is four.</s>"]  # the straddling token is content: a target
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    with pytest.raises(PoiseError, match=r"mem:1: a token spans an assistant-turn boundary .* slow tokenizer"):
        tokenize_example(conversation(messages), tokenizer, 512)


def test_template_that_rewrites_earlier_turns_is_refused() -> None:
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                "{% if loop.last %} (last){% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(PoiseError, match=r"mem:1: the chat template renders the first 3 messages differently"):
        tokenize_example(conversation(), with_template(template), 512)


def test_template_that_refuses_the_conversation_is_reported_with_where() -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(PoiseError, match=r"chat template refused this conversation \(roles must alternate\)"):
        tokenize_example(conversation(), with_template(template), 512)


def test_alpaca_and_sharegpt_examples_get_assistant_only_labels(tmp_path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour."},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ])
    tokenizer = tiny_tokenizer()
    kept, items, excluded = tokenize_examples(read_examples(path), tokenizer, 512)
    assert kept == [0, 1] and excluded == []
    assert [target_runs(tokenizer, item) for item in items] == [["Bonjour.<|im_end|>"], ["Hello<|im_end|>"]]


def test_truncation_keeps_the_left_part() -> None:
    tokenizer = tiny_tokenizer()
    full = tokenize_example(conversation(), tokenizer, 512)
    cut = len(full) - 8  # inside the last answer
    item = tokenize_example(conversation(), tokenizer, cut)
    assert item.input_ids == full.input_ids[:cut] and item.labels == full.labels[:cut]
    assert len(item) == cut and 0 < item.n_targets < full.n_targets


def test_prompt_filling_max_seq_length_is_excluded_with_one_warning(tmp_path) -> None:
    long_question = "Explain why the sky is blue in one sentence. " * 6
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"id": "ok", "prompt": "Hi", "completion": "Hello"},
        {"id": "x", "prompt": long_question, "completion": "Light scatters."},
        {"id": "nothing", "messages": [{"role": "user", "content": "Hi"}]},
    ])
    tokenizer = tiny_tokenizer()
    examples = read_examples(path)
    prompt = len(tokenizer.apply_chat_template(examples[1].messages[:1], add_generation_prompt=True)["input_ids"])
    assert prompt > 32
    with pytest.warns(PoiseWarning) as caught:
        kept, items, excluded = tokenize_examples(examples, tokenizer, 32)
    messages = [str(w.message) for w in caught]
    assert messages == [
        f"{path}:2 (id 'x'): no target tokens within max_seq_length=32 (prompt is {prompt} tokens); excluded",
        f"{path}:3 (id 'nothing'): no assistant turn to train on; excluded",
    ]
    assert kept == [0] and len(items) == 1 and [(e.id, r) for e, r in excluded][1] == ("nothing",
                                                                                     "no assistant turn to train on")


def test_every_example_excluded_is_an_error() -> None:
    only_user = conversation([{"role": "user", "content": "Hi"}])
    with pytest.raises(PoiseError, match=r"all 1 examples were excluded; the first, mem:1 \(id 'c'\): no assistant"):
        tokenize_examples([only_user], tiny_tokenizer(), 64)


def test_pretokenized_examples_pass_through_and_are_truncated() -> None:
    given = Example("t", None, [9, 8, 7, 6], [-100, -100, 7, 6], None, "mem:1")
    assert tokenize_example(given, tiny_tokenizer(), 512) == Tokenized([9, 8, 7, 6], [-100, -100, 7, 6])
    assert tokenize_example(given, tiny_tokenizer(), 3) == Tokenized([9, 8, 7], [-100, -100, 7])
    with pytest.warns(PoiseWarning, match=r"mem:1 \(id 't'\): no target tokens within max_seq_length=2 \(prompt is 2"):
        kept, _, excluded = tokenize_examples([given, Example("u", None, [1, 2], None, None, "mem:2")],
                                              tiny_tokenizer(), 2)
    assert kept == [1] and excluded[0][0] is given


# ------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_tokens, max_batch_size", [(64, None), (200, 4), (1000, None), (7, 2)])
def test_token_budget_batches_cover_every_index_once_within_budget_longest_first(seed, max_tokens,
                                                                                 max_batch_size) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 60))]
    batches = token_budget_batches(lengths, max_tokens, max_batch_size)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert flat == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for batch in batches:
        assert batch
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= max_tokens
        assert max_batch_size is None or len(batch) <= max_batch_size
    assert batches == token_budget_batches(list(lengths), max_tokens, max_batch_size)  # deterministic


def test_token_budget_batches_pack_greedily_and_isolate_long_examples() -> None:
    assert token_budget_batches([3, 10, 3, 3, 2], max_tokens=8) == [[1], [0, 2], [3, 4]]
    assert token_budget_batches([4, 4, 4, 4], max_tokens=16, max_batch_size=3) == [[0, 1, 2], [3]]
    assert token_budget_batches([], max_tokens=8) == []
    with pytest.raises(ValueError):
        token_budget_batches([1], max_tokens=0)


def test_collate_right_padding() -> None:
    batch = collate([Tokenized([5, 6, 7], [-100, 6, 7]), Tokenized([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_collate_left_padding() -> None:
    batch = collate([Tokenized([5, 6, 7], [-100, 6, 7]), Tokenized([8, 9], [8, 9])], pad_id=0, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert all(t.dtype.is_floating_point is False for t in batch.values())


def test_padding_side_does_not_change_the_logits_of_real_tokens() -> None:
    import torch

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    items = [tokenize_example(conversation(), tokenizer, 512),
             tokenize_example(conversation(CHAT[1:3]), tokenizer, 512)]
    short = len(items[1])
    with torch.no_grad():
        right = model(**{k: v for k, v in collate(items, tokenizer.pad_token_id).items() if k != "labels"}).logits
        left = model(**{k: v for k, v in collate(items, tokenizer.pad_token_id, "left").items()
                        if k != "labels"}).logits
        alone = model(input_ids=torch.tensor([items[1].input_ids])).logits
    torch.testing.assert_close(right[1, :short], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left[1, -short:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left[0], right[0], rtol=1e-5, atol=1e-5)


def test_restore_order_puts_results_back_in_input_order() -> None:
    lengths = [5, 1, 9, 3, 9, 2]
    batches = token_budget_batches(lengths, max_tokens=10)
    results = [[f"r{i}" for i in batch] for batch in batches]
    assert restore_order(batches, results) == [f"r{i}" for i in range(len(lengths))]
    with pytest.raises(ValueError, match="exactly once"):
        restore_order([[0, 1], [1]], [["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="batch 0 has 2 indices but 1 results"):
        restore_order([[0, 1]], [["a"]])


def test_many_exclusions_are_summarised_after_the_first_twenty() -> None:
    from poise.data import templates

    only_user = [conversation([{"role": "user", "content": "Hi"}], id_=str(i), where=f"mem:{i}") for i in range(25)]
    with pytest.warns(PoiseWarning) as caught:
        kept, _, excluded = tokenize_examples([conversation()] + only_user, tiny_tokenizer(), 512)
    assert kept == [0] and len(excluded) == 25
    assert len(caught) == templates.MAX_WARNINGS + 1
    assert str(caught[-1].message) == "... and 5 more examples excluded for having no target token"


def test_progress_bar_on_a_terminal_does_not_change_the_result(monkeypatch) -> None:
    import sys

    from poise.data import templates

    examples = [conversation(id_=str(i)) for i in range(5)]
    expected = tokenize_examples(examples, tiny_tokenizer(), 512, progress=False)
    monkeypatch.setattr(templates, "PROGRESS_FROM", 1)
    monkeypatch.setattr(templates, "CHUNK", 2)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert tokenize_examples(examples, tiny_tokenizer(), 512) == expected


def test_empty_opening_assistant_turn_under_a_chat_template_is_refused() -> None:
    messages = [{"role": "assistant", "content": ""}, {"role": "user", "content": "Hi"}]
    with pytest.raises(PoiseError, match=r"mem:1: cannot find where the content of message 1 \(assistant\) starts"):
        tokenize_example(conversation(messages), tiny_tokenizer(), 512, template="chat")
