"""`poise run --plan`: the units, tokens, disk and time of a run before it runs; its disk figures against the
real run's folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_fixtures import conversation, write_pool
from tiny import write_jsonl

from poise import pipeline
from poise.io import disk_size


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("plan")
    write_pool(root / "pool.jsonl", 240)
    for k, task in enumerate(("math", "code")):
        write_jsonl(root / "validation" / f"{task}.jsonl", [conversation(500 + 10 * k + i, 3 + i) for i in range(4)])
    return root


def config(inputs: Path, tiny_model_dir: Path, out: Path) -> dict:
    return {"model": str(tiny_model_dir), "pool": str(inputs / "pool.jsonl"), "validation": str(inputs / "validation"),
            "out": str(out), "max_seq_length": 64,
            "warmup": {"epochs": 2, "fraction": 0.5, "batch_size": 8, "lora_r": 8, "lora_alpha": 16},
            "features": {"dim": 2048}, "select": {"methods": ["bids", "task-max", "random"], "budgets": ["0.25"]},
            "train": {"epochs": 1, "batch_size": 8, "lora_r": 8, "lora_alpha": 16}}


def test_plan_runs_nothing_and_prints_every_stage(inputs, tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    result = pipeline.run(config(inputs, tiny_model_dir, out), plan=True)
    printed = capsys.readouterr().out
    assert set(result.actions.values()) == {"planned"}
    assert not out.exists() or not any(out.glob("*/arguments.json"))
    for stage in ("warmup", "features", "attribute", "select", "train", "report", "total"):
        assert stage in printed
    assert "estimate" in printed and "measured on this machine" in printed


@pytest.mark.slow  # a run through attribution (make test-slow)
def test_plan_disk_is_within_ten_percent_of_the_real_run(inputs, tiny_model_dir, tmp_path) -> None:
    from poise.pipeline.estimate import Throughput, estimate_units
    from poise.pipeline.executor import build_units, check_inputs, parse_config

    out = tmp_path / "run"
    run_config = parse_config(config(inputs, tiny_model_dir, out), "config")
    found = check_inputs(run_config, str(inputs / "pool.jsonl"), str(inputs / "validation"), None)
    units = build_units(run_config, out, found)
    estimates, _ = estimate_units(run_config, found, units, throughput=Throughput(1e3, 3e3, 1e3, 1e9, "given"))
    pipeline.run(config(inputs, tiny_model_dir, out), until="train")
    planned = {e.unit: e.disk for e in estimates}
    for unit in [u.name for u in units if u.stage in ("warmup", "features", "attribute", "select", "train")]:
        actual = disk_size(out / unit)
        assert abs(planned[unit] - actual) <= 0.1 * actual, (unit, planned[unit], actual)
