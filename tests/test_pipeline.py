"""`poise run`: every stage on a tiny model; resume after SIGKILL equals an uninterrupted run; a changed
setting reruns only the stages it reaches; every bad config fails before a model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import conversation, write_pool
from tiny import write_jsonl

from poise import pipeline
from poise.cli import main
from poise.errors import PoiseError

pytest.importorskip("lm_eval")

TASKS = ("math", "code")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny model, a 24-example pool, 3 validation and 2 held-out items per task."""
    root = tmp_path_factory.mktemp("pipeline")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    write_pool(root / "pool.jsonl", 24)
    for k, task in enumerate(TASKS):
        write_jsonl(root / "validation" / f"{task}.jsonl", [conversation(100 + 10 * k + i, 3 + i) for i in range(3)])
        write_jsonl(root / "heldout" / f"{task}.jsonl",
                    [{"id": f"{task}{i}", "prompt": conversation(300 + 10 * k + i, 3)["messages"][0]["content"],
                      "answer": "alpha beta"} for i in range(2)])
    return root


def config(inputs: Path, out: Path, **changes) -> dict:
    data = {
        "model": str(inputs / "model"), "pool": str(inputs / "pool.jsonl"), "validation": str(inputs / "validation"),
        "evaluation": str(inputs / "heldout"), "out": str(out), "max_seq_length": 64,
        "warmup": {"epochs": 2, "fraction": 0.5, "batch_size": 4, "lora_r": 4, "lora_alpha": 8},
        "features": {"dim": 32, "max_batch_size": 4},
        "select": {"methods": ["bids", "task-max", "random"], "budgets": ["0.25"]},
        "train": {"epochs": 1, "batch_size": 4, "lora_r": 4, "lora_alpha": 8},
        "evaluate": {"max_gen_toks": 4, "batch_size": 2},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return data


def outputs(run: Path) -> dict:
    """The numbers a user reads off a run: every selection's picks and every evaluation's scores."""
    picks = {p.parent.name: json.loads(p.read_text())["indices"]
             for p in sorted(run.glob("selections/*/selection.json"))}
    scores = {p.parent.name: json.loads(p.read_text())["scores"] for p in sorted(run.glob("evaluation/*/scores.json"))}
    return {"picks": picks, "scores": scores}


@pytest.fixture(scope="module")
def complete_run(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    result = pipeline.run(config(inputs, out))
    assert set(result.actions.values()) == {"ran"}
    return out


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_run_writes_every_stage_and_a_rerun_skips_them_all(complete_run, inputs, capsys) -> None:
    run = complete_run
    for folder in ("warmup/checkpoint-1", "warmup/checkpoint-2", "features/checkpoint-1/train",
                   "features/checkpoint-2/val", "attribution", "selections/bids-0.25", "selections/task-max-0.25",
                   "selections/random-0.25", "training/bids-0.25", "training/random-0.25", "evaluation/base",
                   "evaluation/bids-0.25", "report"):
        assert (run / folder).is_dir(), folder
        assert (run / folder / "arguments.json").is_file() or folder.startswith("warmup/"), folder
    assert (run / "report" / "report.html").is_file()
    assert (run / "config.yaml").is_file()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["warmup"]["epochs"] == 2 and resolved["train"]["lr_scheduler"] == "cosine"  # defaults filled in
    scores = json.loads((run / "evaluation" / "bids-0.25" / "scores.json").read_text())["scores"]
    assert set(scores) == set(TASKS) and "nll" in scores["math"] and "exact_match" in scores["math"]

    # the rerun through the command line: everything up to date, the summary printed
    capsys.readouterr()
    path = run.parent / "config.yaml"
    path.write_text(yaml.safe_dump(config(inputs, run)))
    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "ran" not in printed.split("\n")[0]
    assert "macro-average" in printed and "report:" in printed
    state = json.loads((run / "pipeline.json").read_text())
    assert all(unit["complete"] for unit in state["units"].values())
    assert state["total_units"] == len(state["units"])


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_changing_a_select_setting_reruns_only_the_units_it_reaches(complete_run, inputs, tmp_path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(complete_run, run)
    before = outputs(run)
    result = pipeline.run(config(inputs, run, select__seed=7))
    ran = {name for name, action in result.actions.items() if action == "ran"}
    # the seed changes only the random selection: it, its training and evaluation, and the report rerun
    assert ran == {"selections/random-0.25", "training/random-0.25", "evaluation/random-0.25", "report"}
    after = outputs(run)
    assert after["picks"]["bids-0.25"] == before["picks"]["bids-0.25"]
    assert after["picks"]["random-0.25"] != before["picks"]["random-0.25"]

    # a setting every selection reads: all selections and what follows rerun, nothing before them
    result = pipeline.run(config(inputs, run, select__seed=7, select__budgets=["0.5"]))
    stages = {name.split("/")[0] for name, action in result.actions.items() if action == "ran"}
    assert stages == {"selections", "training", "evaluation", "report"}
    assert {n for n, a in result.actions.items() if a == "ran" and n.startswith("evaluation")} == \
        {"evaluation/bids-0.5", "evaluation/task-max-0.5", "evaluation/random-0.5"}  # base is unchanged


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_changing_execution_only_settings_reruns_nothing(complete_run, inputs, tmp_path) -> None:
    """evaluate.batch_size, features.max_batch_size, device ... are execution-only (their field's role): a run that
    changes them finds every unit up to date."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(complete_run, run)
    result = pipeline.run(config(inputs, run, evaluate__batch_size=1, features__max_batch_size=2,
                                 attribute={"chunk_rows": 5}))
    assert set(result.actions.values()) == {"skipped"}


def test_execution_only_settings_leave_every_fingerprint_unchanged(inputs, tmp_path, no_model_load) -> None:
    """The units of a run config with other batch sizes, chunking and device have the same fingerprints, so
    `poise run` reruns nothing (the end-to-end twin below checks it on a finished run)."""
    from poise import provenance

    def prints(data: dict) -> dict[str, str]:
        run_config = pipeline.parse_config(data, "config")
        checked = pipeline.check_inputs(run_config, run_config.pool, run_config.validation, run_config.evaluation)
        units = pipeline.build_units(run_config, tmp_path / "run", checked)
        out: dict[str, str] = {}
        for unit in units:
            out[unit.name] = provenance.fingerprint(unit.settings, [out[n] for n in unit.needs], tmp_path / "run")
        return out

    base = prints(config(inputs, tmp_path / "run"))
    assert len(base) > 10
    assert prints(config(inputs, tmp_path / "run", evaluate__batch_size=1, features__max_batch_size=2,
                         features__max_tokens=999, attribute={"chunk_rows": 5}, device="cuda")) == base
    changed = prints(config(inputs, tmp_path / "run", evaluate__max_gen_toks=5))
    assert {n for n in base if base[n] != changed[n]} == {n for n in base if n.startswith("evaluation/")} | {"report"}


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_sigkill_during_features_then_rerun_equals_an_uninterrupted_run(complete_run, inputs, tmp_path) -> None:
    run = tmp_path / "run"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(inputs, run)))
    command = [sys.executable, "-m", "poise", "run", str(path)]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "POISE_KILL_AT": "writes:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((run / "pipeline.json").read_text())["units"]
    assert state["warmup"]["complete"] and not state["features/checkpoint-1/train"]["complete"]
    assert not (run / "attribution").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "features/checkpoint-1/train: resuming" in resumed.stderr
    assert outputs(run) == outputs(complete_run)


def test_set_overrides_from_and_until(inputs, tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(inputs, tmp_path / "run")))
    result = pipeline.run(path, overrides=["select.methods=[bids]", "train.methods=[bids]", "evaluate.base=false"],
                          until="select")
    assert result.actions["selections/bids-0.25"] == "ran"
    assert result.actions["training/bids-0.25"] == "not reached"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["select"]["methods"] == ["bids"]
    again = pipeline.run(path, overrides=["select.methods=[bids]", "train.methods=[bids]", "evaluate.base=false"],
                         from_stage="select", until="select")
    assert again.actions["selections/bids-0.25"] == "ran"  # rerun on request
    assert again.actions["attribution"] == "skipped"


# ------------------------------------------------------------------------------------------- bad configs
@pytest.fixture
def no_model_load(monkeypatch):
    """Any model or tokenizer load fails the test: a bad config must be refused before."""
    import poise.model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(poise.model, "load_model", refuse)
    monkeypatch.setattr(poise.model, "load_tokenizer", refuse)


@pytest.mark.parametrize(("change", "message"), [
    ({"warmup__epohcs": 2}, "unknown key warmup.epohcs; did you mean 'epochs'?"),
    ({"selcet": {}}, "unknown key 'selcet'; did you mean 'select'?"),
    ({"warmup__out": "x"}, "warmup.out: not a setting of a run config"),
    ({"pool": "/nonexistent/pool.jsonl"}, "pool: /nonexistent/pool.jsonl: no such file or folder"),
    ({"select__budgets": ["1.5"]}, "select.budgets: 1.5 is a fraction of the pool and must lie in (0, 1]"),
    ({"select__budgets": ["100"]}, "select.budgets: "),
    ({"select__methods": ["bidz"]}, "unknown method 'bidz'; did you mean 'bids'?"),
    ({"train__methods": ["sum"]}, "train.methods: sum not in select.methods"),
    ({"warmup__lr": "fast"}, "warmup: lr: expected a number"),
    ({"template": "alpaca"}, "template must be one of"),
])
def test_bad_config_is_one_error_before_any_model_load(inputs, tmp_path, no_model_load, change, message) -> None:
    with pytest.raises(PoiseError) as error:
        pipeline.run(config(inputs, tmp_path / "run", **change))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_task_files_must_match_between_validation_and_evaluation(inputs, tmp_path, no_model_load) -> None:
    import shutil

    validation, heldout = tmp_path / "validation", tmp_path / "heldout"
    shutil.copytree(inputs / "validation", validation)
    shutil.copytree(inputs / "heldout", heldout)
    write_jsonl(heldout / "logic.jsonl", [{"id": "l0", "prompt": "p", "answer": "a"}])
    with pytest.raises(PoiseError, match=r"logic.jsonl: task 'logic' has no validation file"):
        pipeline.run(config(inputs, tmp_path / "run", validation=str(validation), evaluation=str(heldout)))
    (heldout / "logic.jsonl").unlink()
    (heldout / "code.jsonl").unlink()
    with pytest.raises(PoiseError, match=r"task 'code' has no held-out file"):
        pipeline.run(config(inputs, tmp_path / "run", validation=str(validation), evaluation=str(heldout)))
    shutil.copy(inputs / "heldout" / "code.jsonl", heldout / "code.jsonl")
    (validation / "code.jsonl").write_text("")
    with pytest.raises(PoiseError, match=r"code.jsonl: empty file"):
        pipeline.run(config(inputs, tmp_path / "run", validation=str(validation), evaluation=str(heldout)))


def test_cli_run_errors_are_one_line(inputs, tmp_path, capsys) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(inputs, tmp_path / "run", warmup__epohcs=2)))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"poise: error: {path}: unknown key warmup.epohcs; did you mean 'epochs'?"]
    assert main(["run", str(path), "--set", "warmup.epohcs"]) == 2
    assert "expected key.path=value" in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_two_rank_torchrun_run_matches_one_process(inputs, tmp_path) -> None:
    """warmup, features and training on both ranks, the rest on rank 0: the same matrix (within float32
    reduction order), the same picks, every stage complete and one report."""
    import numpy as np

    small = config(inputs, tmp_path / "one", select={"methods": ["bids", "task-max"], "budgets": ["0.25"]},
                   train={"methods": ["bids"], "epochs": 1, "batch_size": 4, "lora_r": 4, "lora_alpha": 8,
                          "lora_dropout": 0.0},
                   evaluate={"base": False, "max_gen_toks": 4, "batch_size": 2})
    small["warmup"]["lora_dropout"] = 0.0  # dropout masks differ between 1 and 2 processes
    one = pipeline.run(small)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({**small, "out": str(tmp_path / "two")}))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "poise", "run",
         str(path)], capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    state = json.loads((two / "pipeline.json").read_text())["units"]
    assert set(state) == set(one.actions) and all(unit["complete"] for unit in state.values())
    a, b = np.load(one.out / "attribution" / "scores.npy"), np.load(two / "attribution" / "scores.npy")
    np.testing.assert_allclose(b, a, atol=1e-3)  # cosines, after 2-rank vs 1-process Adam warmup steps
    assert outputs(two)["picks"] == outputs(one.out)["picks"]
    assert set(outputs(two)["scores"]) == {"bids-0.25"}
    assert (two / "report" / "report.html").is_file()


# ------------------------------------------------------------------------------------------------ demo
def test_the_shipped_demo_config_is_valid_and_names_the_real_model(no_model_load) -> None:
    config = pipeline.load_config(pipeline.config_path("demo"))
    assert config.model == "smollm2-135m" and config.demo_data is not None
    assert {"bids", "task-max", "random"} <= set(config.section("train")["methods"])
    assert set(config.section("select")["methods"]) >= {"bids", "task-max", "instance-max", "sum", "rds", "random"}


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_the_shipped_demo_config_runs_end_to_end_on_a_tiny_model(inputs, tmp_path) -> None:
    """`poise run demo` with the model swapped for the tiny one and the sizes cut: the demo cannot rot."""
    pytest.importorskip("reasoning_gym")
    result = pipeline.run("demo", overrides=[
        f"model={inputs / 'model'}", f"out={tmp_path / 'demo'}", "demo_data.pool_size=60",
        "demo_data.validation_per_task=2", "demo_data.heldout_per_task=2", "max_seq_length=64",
        "warmup.lora_r=4", "train.lora_r=4", "features.dim=32", "evaluate.max_gen_toks=2"])
    assert set(result.actions.values()) == {"ran"}
    assert result.report is not None and result.report.is_file()
    tasks = sorted(p.stem for p in (tmp_path / "demo" / "data" / "validation").glob("*.jsonl"))
    assert len(tasks) >= 5
    scores = json.loads((tmp_path / "demo" / "evaluation" / "bids-0.1" / "scores.json").read_text())["scores"]
    assert sorted(scores) == tasks


def test_synthetic_demo_still_runs_in_seconds(tmp_path, capsys) -> None:
    assert main(["demo", "--synthetic", "--rows", "2000", "--out", str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert "THI share" in capsys.readouterr().out


def test_pool_examples_the_features_left_out_are_matched_by_id(tmp_path) -> None:
    """A matrix with fewer rows than the pool (examples without a target token within max_seq_length were
    left out by features): select takes the pool lines by id, with one warning; unmatched ids are refused."""
    import numpy as np

    from poise.matrix import AttributionMatrix
    from poise.selection import check_pool

    rows = [{"id": f"p{k}", "messages": [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": "a"}]}
            for k in range(5)]
    write_jsonl(tmp_path / "pool.jsonl", rows)
    matrix = AttributionMatrix(np.ones((3, 2), dtype=np.float32), column_ids=["v0", "v1"], tasks=["t", "u"],
                               row_ids=["p0", "p2", "p4"])
    with pytest.warns(Warning, match="2 of its 5 examples have no row in the matrix"):
        lines = check_pool(tmp_path / "pool.jsonl", matrix)
    assert [json.loads(line)["id"] for line in lines] == ["p0", "p2", "p4"]
    other = AttributionMatrix(np.ones((3, 2), dtype=np.float32), column_ids=["v0", "v1"], tasks=["t", "u"],
                              row_ids=["p0", "p2", "x9"])
    with pytest.raises(PoiseError, match="5 examples but the matrix has 3 rows"):
        check_pool(tmp_path / "pool.jsonl", other)


def test_lm_eval_tasks_without_local_held_out_files_still_get_evaluation_units(inputs, tmp_path) -> None:
    """`evaluate.tasks` alone (e.g. bids-suite on the hub) evaluates base and every training; nothing is loaded."""
    data = config(inputs, tmp_path / "run", evaluation=None, evaluate__tasks=["gsm8k"])
    run_config = pipeline.parse_config(data, "config")
    found = pipeline.check_inputs(run_config, data["pool"], data["validation"], None)
    units = pipeline.build_units(run_config, tmp_path / "run", found)
    evaluations = [u.name for u in units if u.stage == "evaluate"]
    assert evaluations == ["evaluation/base", "evaluation/bids-0.25", "evaluation/task-max-0.25",
                           "evaluation/random-0.25"]
    report = next(u for u in units if u.stage == "report")
    assert set(evaluations) <= set(report.needs)


def test_each_evaluation_runs_right_after_the_training_it_reads(inputs, tmp_path) -> None:
    """A run stopped halfway holds whole results: base is evaluated before the first training, every training is
    followed at once by its evaluation, the report comes last, and every unit still follows what it needs."""
    data = config(inputs, tmp_path / "run", train__seeds=[0, 1])
    run_config = pipeline.parse_config(data, "config")
    found = pipeline.check_inputs(run_config, data["pool"], data["validation"], data["evaluation"])
    units = pipeline.build_units(run_config, tmp_path / "run", found)
    names = [u.name for u in units]
    trainings = [k for k, u in enumerate(units) if u.stage == "train"]
    assert names[trainings[0] - 1] == "evaluation/base"
    for k in trainings:
        assert units[k + 1].stage == "evaluate" and units[k + 1].needs == [units[k].name]
    assert units[-1].stage == "report"
    for k, unit in enumerate(units):
        assert set(unit.needs) <= set(names[:k]), unit.name
