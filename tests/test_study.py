"""The study tables: t intervals over seeds, BIDS paired by seed, label parsing, side-by-side answers; and the
mini BIDS study's config run end to end on a tiny model with minimal sizes (so that it cannot rot)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from poise.report.study import (
    collect,
    collect_samples,
    markdown_tables,
    mean_ci,
    orderings,
    orderings_table,
    overlap_table,
    overlap_with,
    paired,
    parse_label,
    selection_overlap,
    side_by_side,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def test_mean_ci_is_the_student_t_interval() -> None:
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # t(0.975, 2) * sd / sqrt(n)
    assert math.isnan(mean_ci([5.0])[1])


@pytest.mark.parametrize(("label", "parsed"), [
    ("bids-0.1-seed2", ("bids", "0.1", 2)), ("instance-max-norm-0.15", ("instance-max-norm", "0.15", None)),
    ("full-seed1", ("full", None, 1)), ("base", ("base", None, None)), ("bids-raw-100-seed0", ("bids-raw", "100", 0)),
])
def test_labels_parse_into_method_budget_and_seed(label, parsed) -> None:
    assert parse_label(label) == parsed


def write_scores(run: Path, label: str, nll: dict[str, float]) -> None:
    folder = run / "evaluation" / label
    folder.mkdir(parents=True)
    scores = {task: {"nll": {"value": v, "higher_is_better": False}, "exact_match": {"value": 0.5}}
              for task, v in nll.items()}
    (folder / "scores.json").write_text(json.dumps({"label": label, "scores": scores}))


def test_seeds_are_summarised_and_bids_is_paired_by_seed(tmp_path) -> None:
    run = tmp_path / "run"
    write_scores(run, "base", {"a": 3.0, "b": 4.0})
    for seed, (bids, rand) in enumerate([((1.0, 2.0), (1.5, 2.2)), ((1.2, 2.1), (1.1, 2.6)), ((1.1, 1.9), (1.4, 2.4))]):
        write_scores(run, f"bids-0.1-seed{seed}", {"a": bids[0], "b": bids[1]})
        write_scores(run, f"random-0.1-seed{seed}", {"a": rand[0], "b": rand[1]})
        write_scores(run, f"full-seed{seed}", {"a": 0.9, "b": 2.0})
    rows = collect(run)
    assert len(rows) == 10
    summary = {(e["method"], e["budget"]): e for e in summarize(rows)}
    assert summary[("bids", "0.1")]["seeds"] == 3
    assert summary[("bids", "0.1")]["macro"][0] == pytest.approx((1.5 + 1.65 + 1.5) / 3)
    assert summary[("bids", "0.1")]["worst"][0] == pytest.approx((2.0 + 2.1 + 1.9) / 3)  # worst = highest NLL
    comparisons = {(c["method"], c["budget"]): c for c in paired(rows)}
    random = comparisons[("random", "0.1")]
    diffs = [1.5 - 1.85, 1.65 - 1.85, 1.5 - 1.9]
    assert random["macro"]["difference"] == pytest.approx(sum(diffs) / 3)
    assert random["macro"]["bids_better_on"] == 3  # lower NLL on every seed
    assert comparisons[("full", "0.1")]["pairs"] == 3
    text = markdown_tables(rows)
    assert "Table 2 layout" in text and "BIDS minus each method" in text and "± " in text


def test_orderings_say_whether_each_claim_holds_and_exceeds_the_seed_noise(tmp_path) -> None:
    run = tmp_path / "run"
    for seed in range(3):
        write_scores(run, f"instance-max-0.1-seed{seed}", {"a": 2.0 + 0.01 * seed, "b": 3.0})
        write_scores(run, f"instance-max-norm-0.1-seed{seed}", {"a": 1.5 + 0.01 * seed, "b": 3.0})  # clearly better
        write_scores(run, f"bids-0.1-seed{seed}", {"a": 1.5 + 0.2 * (seed - 1), "b": 3.0})  # same mean, noisy
        write_scores(run, f"random-0.1-seed{seed}", {"a": 1.0, "b": 3.5})  # same macro, worse worst
        write_scores(run, f"full-seed{seed}", {"a": 1.4, "b": 3.0})
    entries = {(e["better"], e["worse"]): e for e in orderings(collect(run))}
    norm = entries[("instance-max-norm", "instance-max")]["macro"]
    assert norm["difference"] == pytest.approx(-0.25) and norm["holds"] and norm["beyond_noise"]
    assert norm["seeds_agreeing"] == 3
    iteration = entries[("bids", "instance-max-norm")]["macro"]
    # per seed -0.1, -0.005, +0.09: the mean agrees with the paper, the interval contains 0
    assert iteration["difference"] == pytest.approx(-0.005) and iteration["holds"]
    assert not iteration["beyond_noise"] and iteration["seeds_agreeing"] == 2
    versus_random = entries[("bids", "random")]
    assert versus_random["macro"]["difference"] == pytest.approx(0.0, abs=1e-12)
    assert versus_random["worst"]["difference"] == pytest.approx(-0.5) and versus_random["worst"]["beyond_noise"]
    assert entries[("bids", "full")]["budget"] == "0.1" and not entries[("bids", "full")]["macro"]["holds"]
    assert ("bids", "task-max") not in entries  # no task-max runs: no line
    text = orderings_table(list(entries.values()))
    assert "holds, beyond noise" in text and "within noise" in text


def test_the_item_interval_is_the_evaluation_sets_sampling_error_of_the_paired_difference(tmp_path) -> None:
    """Per item the difference averaged over seed pairs; per capability var/n; averaged over capabilities."""
    run = tmp_path / "run"
    per_item = {"a": [0.0, 0.2, 0.4, 0.6], "b": [1.0, 1.0, 1.0, 1.0]}  # differences of bids minus random, per item
    for seed in range(2):
        for label, shift in ((f"bids-0.1-seed{seed}", 1.0), (f"random-0.1-seed{seed}", 0.0)):
            values = {task: [v * shift + 2.0 + (task == "b") * 0.5 for v in diffs] for task, diffs in per_item.items()}
            write_scores(run, label, {task: sum(v) / len(v) for task, v in values.items()})
            (run / "evaluation" / label / "samples.jsonl").write_text("".join(
                json.dumps({"capability": task, "id": f"{task}{i}", "nll": v}) + "\n"
                for task, vs in values.items() for i, v in enumerate(vs)))
    samples = collect_samples(run)
    assert samples["bids-0.1-seed1"][("a", "a3")] == pytest.approx(2.6)  # worst capability: b, in every run
    (entry,) = [e for e in orderings(collect(run), samples=samples) if e["worse"] == "random"]
    # capability a: differences 0, .2, .4, .6 (variance 1/15, n 4); b: constant; df = 8 - 2 = 6 (t 2.447)
    assert entry["macro"]["items_ci"] == pytest.approx(2.447 * math.sqrt((1 / 15) / 4) / 2)
    assert entry["macro"]["difference"] == pytest.approx((0.3 + 1.0) / 2) and not entry["macro"]["holds"]
    assert entry["macro"]["ci"] == pytest.approx(0.0) and entry["macro"]["beyond_noise"]
    assert entry["worst"]["items_ci"] == pytest.approx(0.0)  # worst is b for both runs: constant differences


def test_side_by_side_answers_come_from_the_samples(tmp_path) -> None:
    for name, answer in (("base", "I think it is 4"), ("bids-0.1-seed0", "4")):
        folder = tmp_path / "evaluation" / name
        folder.mkdir(parents=True)
        (folder / "samples.jsonl").write_text(json.dumps({"capability": "math", "id": "m0", "answer": "4",
                                                          "generation": answer, "nll": 0.1}) + "\n")
    table = side_by_side(tmp_path, ["base", "bids-0.1-seed0"])
    assert "| math | m0 | 4 | I think it is 4 | 4 |" in table


def write_selection(run: Path, name: str, ids: list[int], n_pool: int = 100) -> None:
    folder = run / "selections" / name
    folder.mkdir(parents=True)
    (folder / "selection.json").write_text(json.dumps({"method": "bids", "budget": 0.1, "n_pool": n_pool,
                                                       "indices": ids, "trace": []}))
    (folder / "selected.jsonl").write_text("".join(json.dumps({"id": f"ex{i}"}) + "\n" for i in ids))


def test_selection_overlap_is_the_jaccard_of_the_picked_ids(tmp_path) -> None:
    write_selection(tmp_path / "a", "bids-0.1", list(range(10)))
    write_selection(tmp_path / "b", "bids-0.1", list(range(5, 15)))
    write_selection(tmp_path / "a", "task-max-0.1", [1, 2])  # only in one run: not compared
    (entry,) = selection_overlap(tmp_path / "a", tmp_path / "b")
    assert entry["selection"] == "bids-0.1" and entry["shared"] == 5
    assert entry["jaccard"] == pytest.approx(5 / 15)
    # two independent uniform 10-of-100 draws share 1 example on average: 1 / (10 + 10 - 1)
    assert entry["random_jaccard"] == pytest.approx(1 / 19)
    assert "| bids-0.1 | 10 / 10 | 5 | 0.33 | 0.05 |" in overlap_table([entry])


def test_overlap_with_compares_bids_with_each_method_at_its_budget(tmp_path) -> None:
    write_selection(tmp_path, "bids-0.1", [0, 1, 2, 3])
    write_selection(tmp_path, "task-max-0.1", [2, 3, 4, 5])
    write_selection(tmp_path, "random-0.1-seed0", [0, 9, 8, 7])
    write_selection(tmp_path, "random-0.1-seed1", [0, 1, 2, 3])  # only seed 0 is compared
    write_selection(tmp_path, "task-max-0.15", [0, 1, 2, 3])  # another budget: not compared
    entries = {e["method"]: e for e in overlap_with(tmp_path)}
    assert set(entries) == {"task-max", "random"}
    assert (entries["task-max"]["shared"], entries["task-max"]["jaccard"]) == (2, pytest.approx(2 / 6))
    assert (entries["random"]["shared"], entries["random"]["budget"]) == (1, "0.1")


def makefile_overrides(variable: str) -> tuple[list[str], list[str]]:
    """A study run's `--set` overrides and its other arguments, as `make study` passes them (Makefile variable)."""
    import shlex

    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith(f"{variable} :="))
    words = shlex.split(line.split(":=", 1)[1])
    sets = [words[k + 1] for k, w in enumerate(words) if w == "--set"]
    rest = [w for k, w in enumerate(words) if w != "--set" and (k == 0 or words[k - 1] != "--set")]
    return [o for o in sets if not o.startswith("out=")], rest


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_the_study_config_runs_on_a_tiny_model_and_summarises(tmp_path) -> None:
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("lm_eval")
    from tiny import tiny_llama, tiny_tokenizer

    from poise import pipeline

    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run = tmp_path / "study"
    tiny = [f"model={tmp_path / 'model'}", "demo_data.pool_size=60", "demo_data.validation_per_task=2",
            "demo_data.heldout_per_task=2", "max_seq_length=64", "warmup.lora_r=4", "train.lora_r=4", "features.dim=32"]
    result = pipeline.run(ROOT / "experiments" / "mini_bids" / "config.yaml", overrides=[
        *tiny, f"out={run}", "train.methods=[random,bids]", "train.seeds=[0,1]", "evaluate.max_gen_toks=2"])
    assert set(result.actions.values()) == {"ran"}
    assert {"selections/random-0.1-seed0", "selections/random-0.1-seed1", "selections/bids-raw-0.15",
            "selections/instance-max-norm-0.1", "training/full-seed1", "evaluation/bids-0.15-seed1",
            "selections/round-robin-0.1", "selections/task-round-robin-0.15", "selections/rds+-0.1",
            "selections/random-stratified-0.15-seed1", "features/reps-rds+/train", "attribution-rds+"} <= \
        set(result.actions)
    second = tmp_path / "study_seed1"
    overrides, rest = makefile_overrides("STUDY_SEED1")
    assert rest == ["--until", "select"]
    again = pipeline.run(ROOT / "experiments" / "mini_bids" / "config.yaml", until="select",
                         overrides=[*tiny, f"out={second}", *overrides])
    assert {"selections/bids-0.1", "selections/task-max-0.15"} <= set(again.actions)
    ran = {name for name, action in again.actions.items() if action == "ran"}
    assert not any(name.startswith(("training", "evaluation", "selections/random")) for name in ran), again.actions
    longer = tmp_path / "study_epochs4"
    overrides, rest = makefile_overrides("STUDY_EPOCHS4")
    assert rest == [] and "train.epochs=4" in overrides
    third = pipeline.run(ROOT / "experiments" / "mini_bids" / "config.yaml",
                         overrides=[*tiny, f"out={longer}", *overrides, "train.seeds=[0,1]", "evaluate.max_gen_toks=2"])
    assert {"evaluation/bids-0.15-seed1"} <= set(third.actions) and "evaluation/base" not in third.actions
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "mini_bids" / "summarize.py"), str(run),
                           "--second", str(second), "--epochs4", str(longer), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert {"runs.csv", "summary.json", "tables.md", "answers.md", "progress.md", "zscore_fit.png", "aid_0.1.png",
            "thi_0.15.png", "overlap.md"} <= \
        {p.name for p in out.iterdir()}
    assert "| random | 0.1 | 2 |" in (out / "tables.md").read_text()
    assert "| bids-0.15 |" in (out / "overlap.md").read_text()
    tables = (out / "tables.md").read_text()
    assert "| bids-epochs4 | 0.15 | 2 |" in tables
    assert "| a BIDS subset trained for 4 epochs over the full pool |" in tables
    balance = (out / "balance.md").read_text()  # the balancing rules side by side (docs/study.md)
    for method in ("task-max", "bids", "round-robin", "task-round-robin", "rds+", "random-stratified-seed0"):
        assert f"| 0.15 | {method} |" in balance
    assert {"balance_thi_0.1.png", "balance_aid_0.15.png"} <= {p.name for p in out.iterdir()}


def test_the_readme_gpu_command_is_a_valid_config_with_the_papers_sizes() -> None:
    """experiments/mini_bids/README.md's GPU command parses against the study config (no model load)."""
    import shlex

    from poise.pipeline import load_config

    text = (ROOT / "experiments" / "mini_bids" / "README.md").read_text()
    block = text[text.index("**On a GPU**"):].split("```bash\n", 1)[1].split("```", 1)[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:3] == ["poise", "run", "experiments/mini_bids/config.yaml"]
    overrides = [words[k + 1] for k, w in enumerate(words) if w == "--set"]
    config = load_config(ROOT / "experiments" / "mini_bids" / "config.yaml", overrides)
    warmup, features, train = (config.section(s) for s in ("warmup", "features", "train"))
    assert (warmup["fraction"], warmup["epochs"], warmup["lora_r"], warmup["lora_alpha"]) == (1.0, 4, 128, 512)
    assert (features["dim"], train["lr"], train["batch_size"], config.device) == (8192, 2e-5, 128, "cuda")
