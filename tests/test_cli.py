"""The `poise select` contract (files, fields, pick order) and one clear error line per bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_columns

import poise
from poise.cli import main


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("poise: warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("poise: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def select_argv(files, out: Path, *extra: str) -> list:
    return ["select", "--scores", files["scores"], "--columns", files["columns"], "--out", out, *extra]


def test_select_writes_selection_json_and_selected_lines_in_pick_order(small_files, tmp_path, capsys) -> None:
    out = tmp_path / "sel"
    code, stdout, _ = run(select_argv(small_files, out, "--method", "bids", "--budget", "0.25",
                                      "--pool", small_files["pool"], "--seed", "1"), capsys)
    assert code == 0 and "selected 10 of 40 rows" in stdout
    data = json.loads((out / "selection.json").read_text())
    assert set(data) >= {"method", "budget", "n_pool", "indices", "trace", "arguments"}
    assert data["method"] == "bids" and data["budget"] == 0.25 and data["n_pool"] == 40
    assert len(data["indices"]) == 10 == len(data["trace"])
    assert {"row", "score", "column", "task"} <= set(data["trace"][0])
    pool = small_files["pool"].read_text().splitlines()
    assert (out / "selected.jsonl").read_text().splitlines() == [pool[i] for i in data["indices"]]
    # the Python API gives the same picks
    matrix = poise.load_attribution(small_files["scores"], columns=small_files["columns"])
    assert poise.select(matrix, method="bids", budget=0.25).indices.tolist() == data["indices"]


@pytest.mark.parametrize("method", ["round-robin", "task-round-robin"])
def test_select_runs_the_round_robin_rules_with_and_without_normalisation(method, small_files, tmp_path,
                                                                          capsys) -> None:
    """The CLI writes what the API picks (tests/test_balance.py pins those against the peer's loop), with the
    column and task each pick served, for the default and for --normalize."""
    matrix = poise.load_attribution(small_files["scores"], columns=small_files["columns"])
    for flag, normalize in (("--no-normalize", False), ("--normalize", True)):
        out = tmp_path / f"{method}{flag}"
        code, stdout, _ = run(select_argv(small_files, out, "--method", method, "--budget", "12", flag), capsys)
        assert code == 0 and "selected 12 of 40 rows" in stdout
        data = json.loads((out / "selection.json").read_text())
        assert data["indices"] == poise.select(matrix, method, 12, normalize=normalize).indices.tolist()
        assert all(p["column"] is not None and p["task"] for p in data["trace"])
        assert data["arguments"]["normalize"] is normalize


def test_select_reads_a_poise_attribution_folder(small_files, tmp_path, capsys) -> None:
    matrix = poise.load_attribution(small_files["scores"], columns=small_files["columns"], rows=small_files["rows"])
    matrix.save(tmp_path / "attribution")
    code, _, _ = run(["select", "--attribution", tmp_path / "attribution", "--method", "task-max",
                      "--budget", "5", "--out", tmp_path / "sel"], capsys)
    assert code == 0
    data = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert data["budget"] == 5 and data["trace"][0]["id"].startswith("ex")


def test_select_reuses_same_settings_and_refuses_other_settings(small_files, tmp_path, capsys) -> None:
    out = tmp_path / "sel"
    assert run(select_argv(small_files, out, "--budget", "5"), capsys)[0] == 0
    code, stdout, _ = run(select_argv(small_files, out, "--budget", "5"), capsys)
    assert code == 0 and "up to date" in stdout
    code, _, err = run(select_argv(small_files, out, "--budget", "6"), capsys)
    assert_one_error_line(code, err, "other settings", "budget")
    assert run(select_argv(small_files, out, "--budget", "6", "--overwrite"), capsys)[0] == 0
    assert len(json.loads((out / "selection.json").read_text())["indices"]) == 6


def test_select_reads_settings_from_yaml_and_flags_override(small_files, tmp_path, capsys) -> None:
    config = tmp_path / "select.yaml"
    config.write_text(f"scores: {small_files['scores']}\ncolumns: {small_files['columns']}\n"
                      f"method: sum\nbudget: 7\nout: {tmp_path / 'sel'}\n")
    assert run(["select", "--config", config, "--budget", "3"], capsys)[0] == 0
    data = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert data["method"] == "sum" and len(data["indices"]) == 3
    config.write_text("methd: sum\n")
    code, _, err = run(["select", "--config", config, "--out", tmp_path / "x"], capsys)
    assert_one_error_line(code, err, "select.yaml", "unknown setting 'methd'")


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_scores_give_one_error_line(small_files, tmp_path, capsys, bad) -> None:
    array = small_files["array"].copy()
    array[2, 3] = float(bad)
    np.save(tmp_path / "bad.npy", array)
    code, _, err = run(["select", "--scores", tmp_path / "bad.npy", "--columns", small_files["columns"],
                        "--out", tmp_path / "o"], capsys)
    assert_one_error_line(code, err, "bad.npy", "non-finite", "row 2, column 3")


def test_wrong_shape_gives_one_error_line(small_files, tmp_path, capsys) -> None:
    np.save(tmp_path / "flat.npy", np.ones(40, np.float32))
    code, _, err = run(["select", "--scores", tmp_path / "flat.npy", "--columns", small_files["columns"],
                        "--out", tmp_path / "o"], capsys)
    assert_one_error_line(code, err, "flat.npy", "2-D")


def test_columns_file_of_another_length_gives_one_error_line(small_files, tmp_path, capsys) -> None:
    write_columns(tmp_path / "five.jsonl", ["a"] * 5)
    code, _, err = run(["select", "--scores", small_files["scores"], "--columns", tmp_path / "five.jsonl",
                        "--out", tmp_path / "o"], capsys)
    assert_one_error_line(code, err, "five.jsonl", "5 columns", "6 score columns")


def test_unknown_task_in_tasks_option_gives_one_error_line(small_files, tmp_path, capsys) -> None:
    code, _, err = run(select_argv(small_files, tmp_path / "o", "--tasks", "code,cooking"), capsys)
    assert_one_error_line(code, err, "unknown task 'cooking'", "code, math, chat")


@pytest.mark.parametrize(("budget", "needle"), [("0", "positive"), ("-1", "positive"),
                                               ("41", "larger than the pool"), ("1.5", "fraction in (0, 1]")])
def test_bad_budget_gives_one_error_line(small_files, tmp_path, capsys, budget, needle) -> None:
    code, _, err = run(select_argv(small_files, tmp_path / "o", f"--budget={budget}"), capsys)
    assert_one_error_line(code, err, needle)


def test_unreadable_files_give_one_error_line(small_files, tmp_path, capsys) -> None:
    code, _, err = run(["select", "--scores", tmp_path / "missing.npy", "--columns", small_files["columns"],
                        "--out", tmp_path / "o"], capsys)
    assert_one_error_line(code, err, "missing.npy", "no such file")
    (tmp_path / "garbage.npy").write_bytes(b"\x00not an npy file")
    code, _, err = run(["select", "--scores", tmp_path / "garbage.npy", "--columns", small_files["columns"],
                        "--out", tmp_path / "o"], capsys)
    assert_one_error_line(code, err, "garbage.npy")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x01\x02")
    code, _, err = run(["select", "--scores", tmp_path / "garbage.safetensors", "--columns",
                        small_files["columns"], "--out", tmp_path / "o"], capsys)
    assert_one_error_line(code, err, "garbage.safetensors")
    code, _, err = run(select_argv(small_files, tmp_path / "o", "--pool", tmp_path / "nopool.jsonl"), capsys)
    assert_one_error_line(code, err, "nopool.jsonl", "cannot read")


class Payload:
    """Not on torch's weights-only allow-list."""


def test_pickle_only_pt_gives_one_error_line(small_files, tmp_path, capsys) -> None:
    import torch

    torch.save({"scores": Payload()}, tmp_path / "evil.pt")
    code, _, err = run(["select", "--scores", tmp_path / "evil.pt", "--columns", small_files["columns"],
                        "--out", tmp_path / "o"], capsys)
    assert_one_error_line(code, err, "evil.pt", "refusing to unpickle")


def test_pool_with_another_line_count_gives_one_error_line(small_files, tmp_path, capsys) -> None:
    lines = small_files["pool"].read_text().splitlines()
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    code, _, err = run(select_argv(small_files, tmp_path / "o", "--pool", tmp_path / "short.jsonl"), capsys)
    assert_one_error_line(code, err, "short.jsonl", "39 examples", "40 rows")
    assert not (tmp_path / "o" / "selection.json").exists()


def test_pool_in_another_order_than_the_rows_is_refused(small_files, tmp_path, capsys) -> None:
    lines = small_files["pool"].read_text().splitlines()
    (tmp_path / "shuffled.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    code, _, err = run(select_argv(small_files, tmp_path / "o", "--rows", small_files["rows"],
                                   "--pool", tmp_path / "shuffled.jsonl"), capsys)
    assert_one_error_line(code, err, "shuffled.jsonl:1", "does not match")


def test_installed_command_prints_no_traceback(small_files, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poise", "select", "--scores", str(small_files["scores"]),
         "--columns", str(small_files["columns"]), "--budget", "0", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "poise: error: budget must be positive, got 0"


def test_report_command_uses_the_matrix_recorded_in_the_selection(small_files, tmp_path, capsys) -> None:
    for method in ("bids", "task-max"):
        assert run(select_argv(small_files, tmp_path / method, "--method", method, "--budget", "10"), capsys)[0] == 0
    code, stdout, _ = run(["report", tmp_path / "bids", tmp_path / "task-max", "--out", tmp_path / "report"], capsys)
    assert code == 0
    assert f"report: {tmp_path / 'report' / 'report.html'}" in stdout
    assert "THI share" in stdout and "code" in stdout
    html = (tmp_path / "report" / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html  # one self-contained page
    assert (tmp_path / "report" / "aid_selections.png").is_file()


def test_report_command_errors_are_one_line(small_files, tmp_path, capsys) -> None:
    code, _, err = run(["report", tmp_path / "nothing", "--out", tmp_path / "report"], capsys)
    assert_one_error_line(code, err, "nothing", "no such selection")
    code, _, err = run(["report", "--out", tmp_path / "report"], capsys)
    assert_one_error_line(code, err, "at least one selection")


def test_missing_attribution_folder_says_no_such_folder(tmp_path, capsys) -> None:
    code, _, err = run(["select", "--attribution", tmp_path / "nope", "--out", tmp_path / "sel"], capsys)
    assert_one_error_line(code, err, "nope", "no such file or folder")


def test_misspelled_flag_suggests_the_closest_one(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--attribtion", str(tmp_path), "--out", str(tmp_path / "sel")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "poise select: error: unrecognized argument --attribtion; did you mean --attribution?" in err
    assert "usage: poise select" in err  # the sub-command's usage, not the top-level one


def test_misspelled_command_suggests_the_closest_one(capsys) -> None:
    code, _, err = run(["selct", "--out", "x"], capsys)
    assert code == 2 and "unknown command 'selct'; did you mean select?" in err


def test_every_missing_required_flag_is_named_in_one_line(capsys) -> None:
    code, _, err = run(["warmup"], capsys)
    assert_one_error_line(code, err, "--model, --data, --out are required")


def test_help_lists_required_flags_apart(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["warmup", "--help"])
    out = capsys.readouterr().out
    required = out.split("required (on the command line or in --config):")[1].split("options:")[0]
    assert "--data" in required and "--model" in required and "--out" in required
    assert "--epochs" not in required
