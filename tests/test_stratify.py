"""Balanced random: `poise select --method random --stratify FIELD` and `random-stratified` in a run config.

The draw itself (equal shares per stratum) is tested in test_balance.py; here: the field read from the pool,
the selection's record of it, the one-line errors, and the run config's entry grammar and select unit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_columns
from tiny import write_jsonl

from poise.cli import main
from poise.errors import PoiseError
from poise.matrix import AttributionMatrix
from poise.selection import pool_strata, read_selection, select

DATASETS = ["flan"] * 20 + ["oasst"] * 12 + ["gsm"] * 6 + ["code"] * 2  # 40 rows, unequal strata


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str) -> str:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("poise: warning:")]
    assert len(lines) == 1 and lines[0].startswith("poise: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A 40 x 4 score matrix and its pool, whose rows carry `dataset` (and `meta.source`)."""
    rng = np.random.default_rng(3)
    np.save(tmp_path / "scores.npy", rng.normal(size=(40, 4)).astype(np.float32))
    write_columns(tmp_path / "columns.jsonl", ["code", "code", "math", "math"])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"id": f"ex{i}"}) + "\n" for i in range(40)))
    rows = [{"id": f"ex{i}", "dataset": d, "meta": {"source": d.upper()},
             "messages": [{"role": "user", "content": f"q{i}"}]} for i, d in enumerate(DATASETS)]
    write_jsonl(tmp_path / "pool.jsonl", rows)
    return {"scores": tmp_path / "scores.npy", "columns": tmp_path / "columns.jsonl", "rows": tmp_path / "rows.jsonl",
            "pool": tmp_path / "pool.jsonl", "dir": tmp_path}


def argv(files: dict[str, Path], out: Path, *extra: object) -> list:
    return ["select", "--scores", files["scores"], "--columns", files["columns"], "--rows", files["rows"],
            "--out", out, *extra]


def assert_balanced(counts: dict[str, int], sizes: dict[str, int], budget: int) -> None:
    """Every value's share is within one of the others', except where a value has too few rows to take it."""
    assert sum(counts.values()) == budget
    assert all(counts[v] <= sizes[v] for v in counts)
    full = [counts[v] for v in counts if counts[v] < sizes[v]]  # values that could have taken more
    if full:
        assert max(full) - min(full) <= 1, counts
        assert all(counts[v] == sizes[v] or counts[v] >= min(full) for v in counts), counts


# ------------------------------------------------------------------------------------------- poise select
def test_select_random_stratify_draws_equal_shares_and_records_them(files, capsys) -> None:
    out = files["dir"] / "sel"
    code, stdout, _ = run(argv(files, out, "--method", "random", "--budget", "16", "--stratify", "dataset",
                               "--pool", files["pool"], "--seed", "5"), capsys)
    assert code == 0
    assert "random-stratified" in stdout
    data = json.loads((out / "selection.json").read_text())
    arguments = data["arguments"]
    assert arguments["stratify"] == "dataset"
    assert list(arguments["strata_counts"]) == ["code", "flan", "gsm", "oasst"]  # sorted values
    sizes = {v: DATASETS.count(v) for v in set(DATASETS)}
    assert_balanced(arguments["strata_counts"], sizes, 16)
    assert arguments["settings"]["stratify"] == "dataset"
    assert [pick["stratum"] for pick in data["trace"]] == [DATASETS[i] for i in data["indices"]]
    pool = files["pool"].read_text().splitlines()
    assert (out / "selected.jsonl").read_text().splitlines() == [pool[i] for i in data["indices"]]
    assert read_selection(out).label == "random-stratified"


def test_select_random_stratify_reads_a_nested_field(files, capsys) -> None:
    out = files["dir"] / "sel"
    code, _, _ = run(argv(files, out, "--method", "random", "--budget", "8", "--stratify", "meta.source",
                          "--pool", files["pool"]), capsys)
    assert code == 0
    counts = json.loads((out / "selection.json").read_text())["arguments"]["strata_counts"]
    assert list(counts) == ["CODE", "FLAN", "GSM", "OASST"] and counts == {"CODE": 2, "FLAN": 2, "GSM": 2, "OASST": 2}


def test_plain_random_records_no_strata(files, capsys) -> None:
    out = files["dir"] / "sel"
    assert run(argv(files, out, "--method", "random", "--budget", "8"), capsys)[0] == 0
    data = json.loads((out / "selection.json").read_text())
    assert "stratify" not in data["arguments"] and "strata_counts" not in data["arguments"]
    assert "stratum" not in data["trace"][0]
    assert read_selection(out).label == "random"


def test_stratify_with_a_method_that_reads_scores_is_one_error_line(files, capsys) -> None:
    code, _, err = run(argv(files, files["dir"] / "o", "--method", "bids", "--stratify", "dataset",
                            "--pool", files["pool"]), capsys)
    line = one_error_line(code, err)
    assert "--stratify dataset" in line and "--method random" in line and "bids" in line
    assert not (files["dir"] / "o").exists()


def test_stratify_without_a_pool_is_one_error_line(files, capsys) -> None:
    code, _, err = run(argv(files, files["dir"] / "o", "--method", "random", "--stratify", "dataset"), capsys)
    line = one_error_line(code, err)
    assert "--stratify dataset" in line and "needs --pool" in line
    assert not (files["dir"] / "o").exists()


def test_a_row_without_the_field_names_its_line_and_its_fields(files, capsys) -> None:
    lines = files["pool"].read_text().splitlines()
    row = json.loads(lines[6])
    del row["dataset"]
    lines[6] = json.dumps(row)
    files["pool"].write_text("\n".join(lines) + "\n")
    code, _, err = run(argv(files, files["dir"] / "o", "--method", "random", "--stratify", "dataset",
                            "--pool", files["pool"]), capsys)
    line = one_error_line(code, err)
    assert f"{files['pool']}:7: no field 'dataset'" in line and "the row has id, meta, messages" in line
    assert not (files["dir"] / "o").exists()


@pytest.mark.parametrize(("field", "value", "needles"), [
    ("dataset", ["a", "b"], ["field 'dataset' is a list", "the row has id, dataset"]),
    ("dataset", None, ["field 'dataset' is null"]),
    ("meta.lang", {"source": "X"}, ["no field 'meta.lang'", "the row's meta has source"]),
])
def test_a_value_that_is_not_one_scalar_is_an_error(field, value, needles) -> None:
    rows = [{"id": "a", "dataset": "x", "meta": {"lang": "en"}}, {"id": "b", "dataset": value, "meta": value}]
    lines = [json.dumps(r) for r in rows]
    with pytest.raises(PoiseError) as caught:
        pool_strata("pool.jsonl", lines, field, [1, 2])
    message = str(caught.value)
    assert message.startswith("pool.jsonl:2: "), message
    for needle in needles:
        assert needle in message, message


def test_pool_strata_codes_and_sorted_names_and_ids_without_line_numbers() -> None:
    lines = [json.dumps({"id": f"r{i}", "d": d}) for i, d in enumerate(["b", "a", 3, True, "b"])]
    codes, names = pool_strata("p.jsonl", lines, "d")
    assert names == ["3", "a", "b", "true"] and codes.dtype == np.int64
    assert codes.tolist() == [2, 1, 0, 3, 2]
    lines[2] = json.dumps({"id": "r2", "e": 1})
    with pytest.raises(PoiseError, match=r"p\.jsonl: row 2 \(id 'r2'\): no field 'd' to stratify by \(the row has "
                                         r"id, e\)"):
        pool_strata("p.jsonl", lines, "d")


def test_a_pool_matched_by_id_reports_the_pool_line(files, capsys) -> None:
    """The matrix lacks some pool rows (features left them out): the error names the pool's own line."""
    lines = files["pool"].read_text().splitlines()
    extra = json.loads(lines[0])
    extra.update(id="extra", dataset="flan")
    bad = json.loads(lines[9])
    del bad["dataset"]
    pool = [lines[0], json.dumps(extra), *lines[1:9], json.dumps(bad), *lines[10:]]  # 41 lines, row ex9 on line 11
    path = files["dir"] / "pool41.jsonl"
    path.write_text("\n".join(pool) + "\n")
    code, _, err = run(argv(files, files["dir"] / "o", "--method", "random", "--stratify", "dataset",
                            "--pool", path), capsys)
    assert f"{path}:11: no field 'dataset'" in one_error_line(code, err)


def test_select_api_refuses_strata_for_a_method_that_reads_scores() -> None:
    matrix = AttributionMatrix(np.arange(8, dtype=np.float32).reshape(4, 2), ["v0", "v1"], ["a", "b"])
    strata = (np.array([0, 1, 0, 1], dtype=np.int64), ["x", "y"])
    with pytest.raises(PoiseError, match="reads the scores"):
        select(matrix, "task-max", 2, strata=strata)
    with pytest.raises(PoiseError, match="one integer code per matrix row"):
        select(matrix, "random", 2, strata=(np.array([0, 1]), ["x", "y"]))
    picked = select(matrix, "random", 2, strata=strata, stratify="d")
    assert picked.arguments["strata_counts"] == {"x": 1, "y": 1} and picked.label == "random-stratified"
    assert select(matrix, "random", 2, strata=strata, label="balanced").label == "balanced"


# --------------------------------------------------------------------------------------------- run config
def run_config(tmp_path: Path, **select_section: object) -> dict:
    return {"model": "m", "pool": str(tmp_path / "pool.jsonl"), "validation": str(tmp_path / "validation"),
            "out": str(tmp_path / "run"), "select": {"methods": ["bids", "random"], **select_section},
            "train": {"methods": ["bids"]}}


def test_run_config_parses_random_stratified_entries() -> None:
    from poise.pipeline.runconfig import parse_method, split_method

    assert parse_method("random-stratified", "select.methods").stratified
    assert parse_method("random-stratified", "select.methods").method == "random"
    assert parse_method("instance-max-norm", "w") == parse_method("instance-max-norm", "w").__class__(
        "instance-max", True, False)
    assert split_method("random-stratified", "w") == ("random", None)
    with pytest.raises(PoiseError, match="'bids-stratified': only a method that draws at random can be stratified "
                                         r"\(random-stratified\); bids reads the scores"):
        parse_method("bids-stratified", "select.methods")
    with pytest.raises(PoiseError, match="did you mean 'random-stratified'"):
        parse_method("random-stratifed", "select.methods")
    with pytest.raises(PoiseError, match="unknown method 'random-norm'"):
        parse_method("random-norm", "select.methods")


def test_run_config_random_stratified_needs_select_stratify(tmp_path) -> None:
    from poise.pipeline import parse_config

    data = run_config(tmp_path, methods=["bids", "random-stratified"])
    with pytest.raises(PoiseError) as caught:
        parse_config(data, "config.yaml")
    assert str(caught.value) == ("config.yaml: select.methods: random-stratified needs select.stratify, the pool "
                                 "field whose values get equal shares (e.g. stratify: dataset)")
    with pytest.raises(PoiseError, match="select.methods: unknown method 'sum-stratified'|sum reads the scores"):
        parse_config(run_config(tmp_path, methods=["sum-stratified"], stratify="dataset"), "config.yaml")
    with pytest.raises(PoiseError, match="select.stratify: expected a name"):
        parse_config(run_config(tmp_path, methods=["random-stratified"], stratify=" "), "config.yaml")
    with pytest.warns(UserWarning, match="select.stratify: dataset is read only by a -stratified entry"):
        parse_config(run_config(tmp_path, stratify="dataset"), "config.yaml")


def test_run_config_random_stratified_gives_a_stratified_random_unit_per_seed(tmp_path) -> None:
    from poise.pipeline import Inputs, build_units, parse_config

    data = run_config(tmp_path, methods=["bids", "random", "random-stratified"], stratify="dataset")
    data["train"] = {"methods": ["random-stratified"], "seeds": [1, 2]}
    config = parse_config(data, "config.yaml")
    assert config.section("select")["stratify"] == "dataset"
    inputs = Inputs(tmp_path / "pool.jsonl", 40, [str(tmp_path / "validation")], ["code"], {},
                    {"pool": "p", "validation": "v"})
    units = {u.name: u for u in build_units(config, tmp_path / "run", inputs)}
    stratified = [units[f"selections/random-stratified-0.1-seed{s}"].config for s in (1, 2)]
    assert [c.stratify for c in stratified] == ["dataset", "dataset"]
    assert [c.method for c in stratified] == ["random", "random"] and stratified[0].seed != stratified[1].seed
    assert {c.label for c in stratified} == {"random-stratified"}
    assert units["selections/random-0.1-seed1"].config.stratify is None
    assert units["selections/bids-0.1"].config.stratify is None
    assert units["selections/random-stratified-0.1-seed1"].settings["stratify"] == "dataset"
    assert {"training/random-stratified-0.1-seed1", "training/random-stratified-0.1-seed2"} <= set(units)


def test_run_checks_the_stratify_field_in_the_pool_before_any_work(tmp_path) -> None:
    from poise.pipeline import check_inputs, parse_config

    write_jsonl(tmp_path / "pool.jsonl", [{"id": f"ex{i}", "dataset": "a", "prompt": "q", "completion": "a"}
                                          for i in range(5)] + [{"id": "ex5", "prompt": "q", "completion": "a"}])
    write_jsonl(tmp_path / "validation" / "code.jsonl", [{"id": "v0", "prompt": "q", "completion": "a"}])
    data = run_config(tmp_path, methods=["random-stratified"], budgets=["2"], stratify="dataset")
    data["train"] = {"methods": ["random-stratified"]}
    config = parse_config(data, "config.yaml")
    with pytest.raises(PoiseError) as caught:
        check_inputs(config, config.pool, config.validation, None)
    assert str(caught.value).startswith(f"select.stratify: {tmp_path / 'pool.jsonl'}:6: no field 'dataset'")
