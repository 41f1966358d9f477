"""The report of a whole run (`poise run`): downstream results first, with one sentence computed from the
numbers, then the selection comparison, then first picks beside the validation example each one served."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import poise
from poise.config import ReportConfig
from poise.errors import PoiseError
from poise.matrix import AttributionMatrix
from poise.report import first_picks, print_run_summary, read_validation, run_report
from poise.report.downstream import describe, downstream_table, downstream_tables, read_evaluation

TASKS = ("arithmetic", "strings")
PER_TASK = 3


# ------------------------------------------------------------------------------------------ fixtures
def _matrix(n_rows: int = 240, seed: int = 0) -> AttributionMatrix:
    """Column ids as `poise features` gives a validation folder whose rows have no "id": <stem>/<index>."""
    rng = np.random.default_rng(seed)
    source = rng.integers(0, len(TASKS), size=n_rows)
    tasks = [t for t in TASKS for _ in range(PER_TASK)]
    match = (source[:, None] == np.repeat(np.arange(len(TASKS)), PER_TASK)[None, :]).astype(np.float32)
    scale = np.repeat(np.array([3.0, 0.5], dtype=np.float32), PER_TASK)  # arithmetic's influence is larger
    scores = (match + 0.6 * rng.standard_normal((n_rows, len(tasks))).astype(np.float32)) * scale
    return AttributionMatrix(scores=scores.astype(np.float32),
                             column_ids=[f"{t}/{k}" for t in TASKS for k in range(PER_TASK)],
                             tasks=tasks, row_ids=[f"pool-{i}" for i in range(n_rows)], kind="influence")


def _validation_text(task: str, k: int) -> str:
    return f"{task} question {k}: " + ("what is 2 + 3?" if task == "arithmetic" else "reverse 'abc'")


def _write_validation(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for task in TASKS:
        lines = [json.dumps({"messages": [{"role": "user", "content": _validation_text(task, k)},
                                          {"role": "assistant", "content": "ok"}]}) for k in range(PER_TASK)]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _pool_lines(matrix: AttributionMatrix) -> list[str]:
    return [json.dumps({"id": matrix.row_id(i), "messages": [{"role": "user", "content": f"Pool example {i}?"},
                                                              {"role": "assistant", "content": "ok"}]})
            for i in range(matrix.n_rows)]


def _scores(folder: Path, label: str, nll: dict[str, float], exact: dict[str, float] | None = None,
            stderr: float | None = 0.001) -> str:
    """A scores.json as `poise evaluate` writes it (scores_from_results: per task, per metric)."""
    scores: dict[str, dict] = {}
    for task, value in nll.items():
        scores[task] = {"nll": {"value": value, "stderr": stderr, "higher_is_better": False},
                        "acc": {"value": 0.5, "stderr": None, "higher_is_better": True}}
        if exact is not None:
            scores[task]["exact_match"] = {"value": exact[task], "stderr": stderr, "higher_is_better": True}
    folder.mkdir(parents=True)
    (folder / "scores.json").write_text(json.dumps({"label": label, "model": "m", "adapter": None,
                                                    "scores": scores}))
    return str(folder)


NLL = {"base": {"arithmetic": 1.60, "strings": 2.10}, "random-0.1": {"arithmetic": 1.20, "strings": 1.42},
       "task-max-0.1": {"arithmetic": 1.00, "strings": 1.70}, "bids-0.1": {"arithmetic": 1.10, "strings": 1.36}}
EXACT = {"base": {"arithmetic": 0.10, "strings": 0.05}, "random-0.1": {"arithmetic": 0.30, "strings": 0.40},
         "task-max-0.1": {"arithmetic": 0.45, "strings": 0.20}, "bids-0.1": {"arithmetic": 0.40, "strings": 0.35}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as `poise run` leaves it: attribution/, selections/, evaluation/, a validation folder."""
    root = tmp_path_factory.mktemp("run")
    matrix = _matrix()
    matrix.save(root / "attribution")
    selections = {}
    for method in ("bids", "task-max", "random"):
        selection = poise.select(matrix, method, 0.1)
        folder = root / "selections" / f"{method}-0.1"
        poise.write_selection(selection, folder, _pool_lines(matrix))
        selections[method] = (selection, str(folder))
    evaluations = [_scores(root / "evaluation" / label, label, NLL[label], EXACT[label]) for label in NLL]
    validation = _write_validation(root / "validation")
    return {"root": root, "matrix": matrix, "selections": selections, "evaluations": evaluations,
            "validation": str(validation)}


def _config(run, out: Path, **extra) -> ReportConfig:
    folders = [folder for _, folder in run["selections"].values()]
    values = {"attribution": str(run["root"] / "attribution"), "selections": folders + run["evaluations"],
              "out": str(out), "validation": [run["validation"]], **extra}
    return ReportConfig(**values)


@pytest.fixture(scope="module")
def page(run, tmp_path_factory):
    return run_report(_config(run, tmp_path_factory.mktemp("report")))


class Tables(HTMLParser):
    """Every <table>: its class and its rows of cell texts; and the <p class="finding"> sentences."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.findings: list[str] = []
        self._cell: list[str] | None = None
        self._finding: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append((attrs.get("class") or "", []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "p" and attrs.get("class") == "finding":
            self._finding = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "p" and self._finding is not None:
            self.findings.append("".join(self._finding))
            self._finding = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._finding is not None:
            self._finding.append(data)


def tables_of(path: Path) -> Tables:
    parser = Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


# ---------------------------------------------------------------------------------------- the page
def test_the_page_reads_downstream_first_then_the_selection_comparison_then_the_first_picks(page):
    html = page.read_text(encoding="utf-8")
    order = [html.index(needle) for needle in (
        "<h2>Downstream results</h2>", 'class="finding"', '<table class="downstream"', "<h2>Selections</h2>",
        "<h2>Per-task summary</h2>", "Average Influence Distribution", "<img ", "Task frequency with Highest",
        "Coverage as the selection grows", "Overlap between selections", "<h2>First picks</h2>")]
    assert order == sorted(order)


def test_the_page_shows_the_nll_table_first_and_the_exact_match_table_after_it(page):
    parsed = tables_of(page)
    downstream = [rows for kind, rows in parsed.tables if kind == "downstream"]
    assert len(downstream) == 2
    nll, exact = downstream
    assert nll[0] == ["run", "arithmetic (nll)", "strings (nll)", "macro-average", "worst"]
    assert exact[0] == ["run", "arithmetic (exact_match)", "strings (exact_match)", "macro-average", "worst"]
    assert [row[0] for row in nll[1:]] == list(NLL)  # the runs in the order given
    html = page.read_text(encoding="utf-8")
    assert html.index("NLL (lower is better)") < html.index("exact match (higher is better)")
    assert len(parsed.findings) == 2
    assert parsed.findings[0].startswith("bids-0.1 has the best macro-average (NLL 1.230 vs 1.310 for random-0.1")
    assert "on arithmetic task-max-0.1 is better (1.000 vs 1.100)" in parsed.findings[0]
    # exact match: bids best on average (0.375) and on the worst capability, but best on no capability
    assert parsed.findings[1].startswith("The ranking is mixed: bids-0.1 has the best macro-average "
                                         "(exact match 0.375 vs 0.350 for random-0.1; higher is better)")


def test_the_chosen_metric_comes_first(run, tmp_path):
    path = run_report(_config(run, tmp_path, metric="exact_match"))
    downstream = [rows for kind, rows in tables_of(path).tables if kind == "downstream"]
    assert downstream[0][0][1] == "arithmetic (exact_match)" and downstream[1][0][1] == "arithmetic (nll)"


# ------------------------------------------------------------------------------------ the sentence
def _read(tmp_path: Path, runs: dict[str, dict[str, float]], metric: str = "nll",
          stderr: float | None = 0.001) -> list[dict]:
    folders = []
    for label, values in runs.items():
        if metric == "nll":
            folders.append(_scores(tmp_path / label, label, values, stderr=stderr))
        else:
            folders.append(_scores(tmp_path / label, label, {t: 1.0 for t in values}, exact=values, stderr=stderr))
    return [read_evaluation(folder) for folder in folders]


def test_sentence_names_the_lowest_nll_as_best(tmp_path):
    evaluations = _read(tmp_path, {"base": {"a": 1.5, "b": 2.0}, "random": {"a": 1.2, "b": 1.42},
                                   "bids": {"a": 1.1, "b": 1.36}})
    sentence = describe(downstream_table(evaluations, "nll"))
    assert sentence == ("bids has the best macro-average (NLL 1.230 vs 1.310 for random; lower is better) and the "
                        "best worst-capability score (1.360 on b); it is best on every capability.")


def test_sentence_names_the_highest_exact_match_as_best(tmp_path):
    # the same numbers as exact match: now the higher is better, so base (the highest) wins
    evaluations = _read(tmp_path, {"base": {"a": 0.5, "b": 0.6}, "random": {"a": 0.2, "b": 0.42},
                                   "bids": {"a": 0.1, "b": 0.36}}, metric="exact_match")
    sentence = describe(downstream_table(evaluations, "exact_match"))
    assert sentence.startswith("base has the best macro-average (exact match 0.550 vs 0.310 for random; "
                               "higher is better) and the best worst-capability score (0.500 on a)")
    assert "mixed" not in sentence and "tie" not in sentence


def test_sentence_says_the_ranking_is_mixed_when_the_best_average_is_not_the_best_worst(tmp_path):
    evaluations = _read(tmp_path, {"random": {"a": 1.0, "b": 1.9}, "bids": {"a": 1.5, "b": 1.6}})
    sentence = describe(downstream_table(evaluations, "nll"))
    assert sentence.startswith("The ranking is mixed: random has the best macro-average (NLL 1.450 vs 1.550 for bids")
    assert "but bids has the best worst-capability score (1.600 on b vs 1.900 on b for random)" in sentence


def test_sentence_says_the_ranking_is_tied_when_the_averages_are_equal(tmp_path):
    evaluations = _read(tmp_path, {"random": {"a": 1.2, "b": 1.4}, "bids": {"a": 1.4, "b": 1.2},
                                   "base": {"a": 2.0, "b": 2.0}})
    sentence = describe(downstream_table(evaluations, "nll"))
    assert sentence.startswith("The ranking is tied: random and bids tie on the macro-average (NLL 1.300 vs "
                               "2.000 for base")
    assert "random on b, bids on a" in sentence  # each one's worst capability
    assert "the best run per capability: random on a, bids on b" in sentence


def test_sentence_says_when_the_gap_is_within_the_standard_error_or_under_one_percent(tmp_path):
    noisy = _read(tmp_path / "noisy", {"random": {"a": 1.2, "b": 1.4}, "bids": {"a": 1.15, "b": 1.4}}, stderr=0.05)
    sentence = describe(downstream_table(noisy, "nll"))
    assert "bids has the best macro-average (NLL 1.275 vs 1.300 for random" in sentence
    assert "smaller than their combined standard error" in sentence and "may be noise" in sentence
    small = _read(tmp_path / "small", {"random": {"a": 1.2, "b": 1.4}, "bids": {"a": 1.2, "b": 1.39}}, stderr=None)
    sentence = describe(downstream_table(small, "nll"))
    assert "the gap is small (under 1%)" in sentence and "best or tied on every capability" in sentence
    close = _read(tmp_path / "close", {"random": {"a": 1.23456, "b": 1.0}, "bids": {"a": 1.23441, "b": 1.0}},
                  stderr=None)
    assert "1.1172 vs 1.1173" in describe(downstream_table(close, "nll"))  # 3 decimals would show 1.117 twice


def test_sentence_leaves_out_incomplete_runs_and_mixed_directions_have_no_average():
    def run(label, scores):
        return {"label": label, "scores": {t: {m: {"value": v}} for t, (m, v) in scores.items()}}

    table = downstream_table([run("a", {"x": ("nll", 1.0), "y": ("nll", 2.0)}), run("b", {"x": ("nll", 0.9)}),
                              run("c", {"x": ("nll", 1.1), "y": ("nll", 2.2)})])
    sentence = describe(table)
    assert sentence.startswith("a has the best macro-average (NLL 1.500 vs 1.650 for c")
    assert "on x b is better (0.900 vs 1.000)" in sentence
    assert sentence.endswith("; b lacks some capabilities and is left out of the averages.")
    mixed = downstream_table([run("a", {"x": ("nll", 1.0), "y": ("acc", 0.5)}),
                              run("b", {"x": ("nll", 0.9), "y": ("acc", 0.4)})])
    assert describe(mixed) == ("The capabilities' metrics point in different directions, so there is no "
                               "macro-average; the best run per capability: b on x, a on y.")


def test_a_report_on_evaluations_alone_has_the_sentences_and_both_tables(run, tmp_path):
    path = run_report(ReportConfig(selections=run["evaluations"], out=str(tmp_path / "r")))
    parsed = tables_of(path)
    assert len([kind for kind, _ in parsed.tables if kind == "downstream"]) == 2
    assert parsed.findings[0].startswith("bids-0.1 has the best macro-average")


def test_downstream_tables_add_no_second_table_without_exact_match(tmp_path):
    evaluations = _read(tmp_path, {"random": {"a": 1.2}, "bids": {"a": 1.1}})
    assert len(downstream_tables(evaluations, "nll")) == 1


# ------------------------------------------------------------------------------------- first picks
def _picks(path: Path) -> list[list[list[str]]]:
    return [rows for kind, rows in tables_of(path).tables if kind == "picks"]


def test_first_picks_show_the_served_validation_example_its_task_and_the_gain(run, page):
    matrix = run["matrix"]
    tables = _picks(page)
    assert len(tables) == 3  # bids, task-max, random
    for table, method in zip(tables, ("bids", "task-max"), strict=False):
        selection = run["selections"][method][0]
        header, *rows = table
        assert header == ["rank", "row", "id", "task", "validation example", "gain" if method == "bids" else "score",
                          "pool example (first user message)", "served validation example (first user message)"]
        assert len(rows) == 10
        for row, entry in zip(rows, selection.trace, strict=False):
            task, k = entry["column_id"].split("/")
            assert row[3] == entry["task"] == task and row[4] == entry["column_id"]
            assert float(row[5]) == pytest.approx(entry["score"], rel=1e-3)
            assert row[6] == f"Pool example {entry['row']}?"
            assert row[7] == _validation_text(task, int(k))
    header, *rows = tables[2]  # random serves nothing: its text only
    assert header[-1] == "example (first user message)" and "served validation example" not in " ".join(header)
    assert all(row[3] == row[4] == "–" for row in rows)
    assert matrix.n_columns == len(TASKS) * PER_TASK


def test_a_served_id_missing_from_the_validation_files_shows_a_dash(run, tmp_path):
    import copy

    selection = copy.deepcopy(run["selections"]["bids"][0])
    selection.trace[0] = {**selection.trace[0], "column_id": "not-there"}
    validation = read_validation([run["validation"]])
    rows = first_picks(selection, 3, run["selections"]["bids"][1], validation=validation)
    assert rows[0]["served_text"] is None and rows[1]["served_text"]
    from poise.report import build_report

    path = build_report(run["matrix"], [selection], tmp_path, validation=validation)
    first = _picks(path)[0][1]
    assert first[4] == "not-there" and first[7] == "–"


def test_validation_ids_are_the_rows_id_else_the_file_stem_and_index(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "math.jsonl").write_text(
        json.dumps({"id": 7, "messages": [{"role": "user", "content": "seven"}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "second   row\n"}]}) + "\n")
    (tmp_path / "code.jsonl").write_text(json.dumps({"prompt": "print it", "completion": "x"}) + "\n")
    texts = read_validation([folder, tmp_path / "code.jsonl"])
    assert texts.get(7) == texts.get("7") == "seven"
    assert texts.get("math/1", "math") == "second row"
    assert texts.get("0", "code") == "print it" and texts.get("nope") is None


def test_a_missing_validation_file_is_one_error_line_naming_it_before_any_figure(run, tmp_path):
    missing = tmp_path / "no-such-folder" / "val.jsonl"
    with pytest.raises(PoiseError) as error:
        run_report(_config(run, tmp_path / "out", validation=[run["validation"], str(missing)]))
    message = str(error.value)
    assert str(missing) in message and "no such file" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    # "a/b" is never taken for a hub data set
    with pytest.raises(PoiseError, match="no such file"):
        read_validation(["org/name"])


def test_an_unreadable_validation_file_is_one_error_line_naming_it(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    with pytest.raises(PoiseError, match=re.escape(str(bad))):
        read_validation([bad])


def test_the_command_takes_validation_files(run, tmp_path, capsys):
    from poise.cli import main

    folders = [folder for _, folder in run["selections"].values()]
    code = main(["report", *folders, "--attribution", str(run["root"] / "attribution"),
                 "--validation", run["validation"], "--out", str(tmp_path / "r")])
    assert code == 0
    assert _picks(tmp_path / "r" / "report.html")[0][0][-1] == "served validation example (first user message)"
    code = main(["report", *folders, "--attribution", str(run["root"] / "attribution"),
                 "--validation", str(tmp_path / "gone"), "--out", str(tmp_path / "r2")])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"poise: error: validation: {tmp_path / 'gone'}: no such file or folder"]


# ------------------------------------------------------------------------------------ the terminal
def test_print_run_summary_prints_the_selection_comparison_and_the_downstream_tables(run):
    console = Console(record=True, width=220)
    selections = [selection for selection, _ in run["selections"].values()]
    evaluations = [read_evaluation(folder) for folder in run["evaluations"]]
    print_run_summary(run["matrix"], selections, evaluations, metric="nll", console=console)
    text = console.export_text()
    for needle in ("THI share", "Mean normalised influence", "arithmetic", "strings", "task-max",
                   "Downstream, NLL (lower is better)", "Downstream, exact match (higher is better)",
                   "macro-average", "worst", "bids-0.1 has the best macro-average"):
        assert needle in text, needle
    assert text.index("THI share") < text.index("Downstream, NLL") < text.index("Downstream, exact match")
    bids = next(line for line in text.splitlines() if line.startswith("│ bids-0.1"))
    assert "1.2300" in bids and "1.3600" in bids  # macro (1.10 + 1.36) / 2 and worst = the highest nll


def test_run_report_prints_the_same_summary_to_its_console(run, tmp_path):
    console = Console(record=True, width=220)
    run_report(_config(run, tmp_path), console=console)
    text = console.export_text()
    assert "THI share" in text and "Downstream, NLL" in text and "bids-0.1 has the best macro-average" in text


def test_a_sentence_over_many_tied_runs_counts_them_instead_of_naming_all(tmp_path):
    runs = {f"run{k}": {"a": 0.0, "b": 0.5} for k in range(8)} | {"base": {"a": 0.0, "b": 0.0}}
    sentence = describe(downstream_table(_read(tmp_path, runs, metric="exact_match"), "exact_match"))
    assert "8 runs (run0, run1, run2, ...) tie on the macro-average" in sentence
    assert "run7" not in sentence and len(sentence) < 400
