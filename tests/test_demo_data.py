"""poise's demo data: deterministic, six capabilities, disjoint splits, formats poise reads, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poise.errors import PoiseError

pytest.importorskip("reasoning_gym")

from poise.data import read_examples  # noqa: E402
from poise.data.demo import CAPABILITIES, UNRELATED, write_demo_data  # noqa: E402
from poise.evaluate import read_items  # noqa: E402


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    write_demo_data(out, pool_size=120, validation_per_task=4, heldout_per_task=6, seed=3)
    return out


def prompts(rows: list, key: str = "messages") -> list[str]:
    return [" ".join((r["prompt"] if key == "prompt" else r["messages"][0]["content"]).split()).lower() for r in rows]


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_data(demo, tmp_path) -> None:
    write_demo_data(tmp_path / "again", pool_size=120, validation_per_task=4, heldout_per_task=6, seed=3)
    assert files(tmp_path / "again") == files(demo)
    write_demo_data(tmp_path / "other", pool_size=120, validation_per_task=4, heldout_per_task=6, seed=4)
    assert (tmp_path / "other" / "pool.jsonl").read_bytes() != (demo / "pool.jsonl").read_bytes()


def test_six_capabilities_with_equal_validation_and_held_out_files(demo) -> None:
    tasks = sorted(p.stem for p in (demo / "validation").glob("*.jsonl"))
    assert tasks == sorted(CAPABILITIES) and len(tasks) >= 5
    assert sorted(p.stem for p in (demo / "heldout").glob("*.jsonl")) == tasks
    validation = read_examples(demo / "validation")  # the folder poise run reads: task = file name
    assert {t: sum(e.task == t for e in validation) for t in tasks} == dict.fromkeys(tasks, 4)
    for task in tasks:
        assert len(read_items(demo / "heldout" / f"{task}.jsonl")) == 6


def test_splits_share_no_prompt_and_hold_no_duplicates(demo) -> None:
    pool = [json.loads(line) for line in (demo / "pool.jsonl").read_text().splitlines()]
    validation = [json.loads(line) for p in sorted((demo / "validation").glob("*.jsonl"))
                  for line in p.read_text().splitlines()]
    heldout = [json.loads(line) for p in sorted((demo / "heldout").glob("*.jsonl"))
               for line in p.read_text().splitlines()]
    sets = {"pool": prompts(pool), "validation": prompts(validation), "heldout": prompts(heldout, "prompt")}
    for name, items in sets.items():
        assert len(set(items)) == len(items), name
    assert not set(sets["pool"]) & set(sets["validation"])
    assert not set(sets["pool"]) & set(sets["heldout"])
    assert not set(sets["validation"]) & set(sets["heldout"])


def test_the_pool_is_tulu_messages_with_a_share_that_serves_no_capability(demo) -> None:
    pool = read_examples(demo / "pool.jsonl")
    assert len(pool) == 120 and len({e.id for e in pool}) == 120
    assert all(e.messages[-1]["role"] == "assistant" and e.messages[-1]["content"] for e in pool)
    unrelated = [e for e in pool if e.dataset.split("/")[-1] in UNRELATED]
    assert len(unrelated) == 36  # 30%
    rows = [json.loads(line) for line in (demo / "pool.jsonl").read_text().splitlines()]
    assert all("task" not in row for row in rows)  # the pool does not say which capability a row serves
    sources = json.loads((demo / "sources.json").read_text())
    assert sources["sources"]["licence"] == "Apache-2.0" and sources["sources"]["package"].startswith("reasoning-gym==")


def test_answers_are_short(demo) -> None:
    heldout = [json.loads(line) for p in (demo / "heldout").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert max(len(item["answer"]) for item in heldout) <= 40


@pytest.mark.parametrize(("sizes", "message"), [
    ({"pool_size": 10}, "pool_size 10: at least 30"),
    ({"validation_per_task": 0}, "must be at least 1"),
])
def test_bad_sizes_are_one_clear_error(tmp_path, sizes, message) -> None:
    with pytest.raises(PoiseError, match=message):
        write_demo_data(tmp_path / "x", **sizes)
    assert not (tmp_path / "x").exists()


def test_a_missing_reasoning_gym_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(PoiseError, match=r"pip install 'poise\[demo\]'"):
        write_demo_data(tmp_path / "x")


def test_cli_writes_the_demo_data(tmp_path, capsys) -> None:
    from poise.cli import main

    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--pool-size", "60", "--validation-per-task", "2",
                 "--heldout-per-task", "2"]) == 0
    assert "pool.jsonl 60 examples (18 of them serve no capability)" in capsys.readouterr().out
