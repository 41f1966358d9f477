"""The report's header from a run directory, the run summary `poise run` prints, the report stage's
provenance, and one evaluation's table (`poise evaluate`)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from poise.config import ReportConfig, SelectConfig
from poise.errors import PoiseError
from poise.files import ARGUMENTS_FILE, REPORT_FILE, RUN_CONFIG_FILE, RUN_STATE_FILE
from poise.report import print_scores, read_run, run_facts, run_report, summarize_run
from poise.selection.stage import run_select
from poise.synthetic import DEFAULT_TASKS, synthetic_matrix
from poise.version import __version__

RESOLVED = {
    "model": "smollm2-135m", "pool": None, "validation": None, "evaluation": None, "out": "runs/demo",
    "template": "auto", "max_seq_length": 256, "device": "cpu", "dtype": "float32",
    "demo_data": {"pool_size": 200, "validation_per_task": 8, "heldout_per_task": 16, "seed": 0},
    "warmup": {"seed": 3, "epochs": 2, "fraction": 0.25, "examples": None},
    "features": {"seed": 5, "dim": 2048, "projection": "sjlt", "checkpoints": None},
    "attribute": {},
    "select": {"methods": ["bids", "random"], "budgets": ["0.1", "0.2"], "seed": 7, "tasks": None},
    "train": {"methods": ["bids", "random"], "seeds": [0, 1], "seed": 0, "epochs": 3, "full_pool": False},
    "evaluate": {"base": True},
    "report": {"metric": "nll"},
}


def _units(selections: list[str], evaluations: list[str]) -> dict[str, dict]:
    units = {"data": {"stage": "data", "fingerprint": "a", "complete": True, "seconds": 2.5},
             "warmup": {"stage": "warmup", "fingerprint": "b", "complete": True, "seconds": 120.0},
             "features/checkpoint-1/train": {"stage": "features", "fingerprint": "c", "complete": True, "seconds": 30},
             "features/checkpoint-2/train": {"stage": "features", "fingerprint": "d", "complete": True, "seconds": 31},
             "attribution": {"stage": "attribute", "fingerprint": "e", "complete": True, "seconds": 1.0}}
    units |= {name: {"stage": "select", "fingerprint": name, "complete": True, "seconds": 0.5} for name in selections}
    units |= {name: {"stage": "evaluate", "fingerprint": name, "complete": True, "seconds": 40} for name in evaluations}
    units["report"] = {"stage": "report", "fingerprint": "r", "complete": False}  # not timed: it has not finished
    return units


def write_run(folder: Path, *, inputs: bool = True, selections: list[str] = (), evaluations: list[str] = (),
              version: str = __version__) -> Path:
    """config.yaml and pipeline.json as `poise run` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    resolved = yaml.safe_dump(RESOLVED, sort_keys=False)
    (folder / RUN_CONFIG_FILE).write_text(f"# resolved by poise {version}\n{resolved}")
    state: dict = {"units": _units(list(selections), list(evaluations)), "total_units": 9}
    if inputs:
        state["inputs"] = {"pool": str(folder / "data" / "pool.jsonl"), "pool_rows": 200,
                           "validation": str(folder / "data" / "validation"), "tasks": ["math", "code", "chat"],
                           "evaluation": str(folder / "data" / "heldout")}
    (folder / RUN_STATE_FILE).write_text(json.dumps(state))
    return folder


def write_scores(folder: Path, label: str, values: dict[str, float], exact: dict[str, float] | None = None) -> str:
    scores = {task: {"nll": {"value": v, "stderr": 0.01, "higher_is_better": False}} for task, v in values.items()}
    for task, v in (exact or {}).items():
        scores[task]["exact_match"] = {"value": v, "stderr": None, "higher_is_better": True}
    folder.mkdir(parents=True)
    (folder / "scores.json").write_text(json.dumps({"label": label, "model": "m", "scores": scores}))
    return str(folder)


class Facts(HTMLParser):
    """The rows of <table class="facts">: label -> value."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, str] = {}
        self._in, self._cell, self._cells = False, None, []

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("class") == "facts":
            self._in = True
        elif self._in and tag in ("th", "td"):
            self._cell = []
        elif self._in and tag == "tr":
            self._cells = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif self._in and tag in ("th", "td") and self._cell is not None:
            self._cells.append("".join(self._cell))
            self._cell = None
        elif self._in and tag == "tr":
            self.rows[self._cells[0]] = self._cells[1]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def facts_of(page: Path) -> dict[str, str]:
    parser = Facts()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.rows


# --------------------------------------------------------------------------------------------- the header
def test_the_facts_name_the_model_data_budgets_seeds_version_and_time_per_stage(tmp_path):
    facts = dict(run_facts(read_run(write_run(tmp_path / "run"))))
    assert facts["run"] == str(tmp_path / "run")
    assert facts["model"] == "smollm2-135m"
    assert facts["pool"] == f"{tmp_path / 'run' / 'data' / 'pool.jsonl'} (200 rows)"  # the file built, not None
    assert facts["validation"] == f"{tmp_path / 'run' / 'data' / 'validation'} - 3 tasks: math, code, chat"
    assert facts["held-out evaluation"] == str(tmp_path / "run" / "data" / "heldout")
    assert facts["sequences"] == "template auto, at most 256 tokens"
    assert facts["warmup"] == "2 epochs on 25% of the pool"
    assert facts["features"] == "sjlt projection to 2048 dimensions"
    assert facts["selection"] == "methods bids, random; budgets 0.1, 0.2"
    assert facts["training"] == "on bids, random; 3 epochs"
    assert facts["seeds"] == "warmup 3, projection 5, training 0, 1, random selection 7"
    assert facts["poise"] == __version__
    # per stage, the sum over its units, in the order the stages ran; the unfinished report is not timed
    assert facts["time per stage"] == ("data 2.5s, warmup 120s, features 61s, attribute 1.0s "
                                       "(total 184s; each unit when it last ran)")


def test_without_the_inputs_record_the_facts_come_from_the_config(tmp_path):
    facts = dict(run_facts(read_run(write_run(tmp_path / "run", inputs=False, version="0.0.1"))))
    assert facts["pool"] == "poise's demo data"
    assert "validation" not in facts  # neither file says which
    assert facts["held-out evaluation"] == "none"
    assert facts["poise"] == f"{__version__} (the run's config was resolved by poise 0.0.1)"


def test_a_folder_that_is_not_a_run_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoiseError, match="not a poise run directory"):
        read_run(tmp_path / "empty")
    with pytest.raises(PoiseError, match="no such folder"):
        read_run(tmp_path / "gone")
    assert read_run(tmp_path / "gone", required=False).units == {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with an attribution folder, two selections made by the select stage, two evaluations."""
    run = tmp_path_factory.mktemp("run")
    matrix, _ = synthetic_matrix(n_rows=300, columns_per_task=3, tasks=DEFAULT_TASKS[:3], seed=1)
    matrix.save(run / "attribution")
    selections = []
    for method in ("bids", "random"):
        name = f"selections/{method}-0.1"
        run_select(SelectConfig(attribution=str(run / "attribution"), method=method, budget="0.1",
                                out=str(run / name)))
        selections.append(name)
    tasks = matrix.task_names
    write_scores(run / "evaluation" / "base", "base", {t: 2.0 + k for k, t in enumerate(tasks)})
    write_scores(run / "evaluation" / "bids-0.1", "bids-0.1", {t: 1.5 + k for k, t in enumerate(tasks)})
    write_run(run, selections=selections, evaluations=["evaluation/base", "evaluation/bids-0.1"])
    return run


def _report_config(folder: Path, out: Path, **extra) -> ReportConfig:
    return ReportConfig(selections=[str(folder / "selections" / "bids-0.1"), str(folder / "selections" / "random-0.1"),
                                    str(folder / "evaluation" / "base")], out=str(out), **extra)


def _evaluations_config(folder: Path, out: Path, **extra) -> ReportConfig:
    """A report on evaluations alone (no figures: quick)."""
    return ReportConfig(selections=[str(folder / "evaluation" / "base"), str(folder / "evaluation" / "bids-0.1")],
                        out=str(out), **extra)


def test_the_page_header_states_the_run_when_given_one(run_dir, tmp_path):
    page = run_report(_report_config(run_dir, tmp_path / "with", run=str(run_dir)))
    facts = facts_of(page)
    assert facts["model"] == "smollm2-135m" and facts["seeds"].startswith("warmup 3, projection 5")
    assert facts["time per stage"].startswith("data 2.5s, warmup 120s, features 61s")
    html = page.read_text(encoding="utf-8")
    assert html.index('class="facts"') < html.index("Downstream results") < html.index("<h2>Selections</h2>")
    assert f"poise: {__version__}" not in html  # the facts name the version; the meta line does not repeat it


def test_a_page_of_evaluations_alone_gets_the_header_too(run_dir, tmp_path):
    page = run_report(_evaluations_config(run_dir, tmp_path / "r", run=str(run_dir)))
    assert facts_of(page)["model"] == "smollm2-135m"
    assert facts_of(run_report(_evaluations_config(run_dir, tmp_path / "without"))) == {}  # no run: no header


def test_a_run_that_is_not_a_run_directory_is_refused_before_the_folder_is_made(run_dir, tmp_path):
    with pytest.raises(PoiseError, match="not a poise run directory"):
        run_report(_report_config(run_dir, tmp_path / "r", run=str(run_dir / "attribution")))
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------- provenance
def test_the_report_folder_is_opened_and_marked_complete_through_provenance(run_dir, tmp_path):
    out = tmp_path / "report"
    run_report(_evaluations_config(run_dir, out))
    record = json.loads((out / ARGUMENTS_FILE).read_text())
    assert record["stage"] == "report" and record["complete"] is True
    assert record["settings"]["metric"] == "nll" and "overwrite" not in record["settings"]
    (out / REPORT_FILE).unlink()
    run_report(_evaluations_config(run_dir, out))  # the same settings: written again
    assert (out / REPORT_FILE).is_file()
    with pytest.raises(PoiseError, match=r"other settings \(metric: 'nll' -> 'exact_match'\)"):
        run_report(_evaluations_config(run_dir, out, metric="exact_match"))
    run_report(_evaluations_config(run_dir, out, metric="exact_match", overwrite=True))
    assert json.loads((out / ARGUMENTS_FILE).read_text())["settings"]["metric"] == "exact_match"


def test_a_folder_not_made_by_poise_is_refused_unless_overwrite(run_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PoiseError, match="not made by poise report"):
        run_report(_evaluations_config(run_dir, out))
    run_report(_evaluations_config(run_dir, out, overwrite=True))
    assert (out / "notes.txt").read_text() == "keep me" and (out / REPORT_FILE).is_file()


# -------------------------------------------------------------------------------------------- the summary
def test_summarize_run_prints_the_outcome_from_the_run_directory(run_dir):
    console = Console(record=True, width=200)
    summarize_run(run_dir, {"data": "skipped", "warmup": "skipped", "report": "ran"}, 12.3, console)
    text = console.export_text()
    lines = text.splitlines()
    assert lines[0] == f"poise run {run_dir}: 2 skipped, 1 ran in 12s"
    assert lines[1] == "time per stage (when it last ran): data 2.5s, warmup 120s, features 61s, attribute 1.0s, " \
                       "select 1.0s, evaluate 80s"
    comparison = text[text.index("THI share"):text.index("Downstream")]  # on the matrix the selections record
    assert "│ bids " in comparison and "│ random " in comparison
    assert "Downstream, NLL (lower is better)" in text and "macro-average" in text
    downstream = text[text.index("Downstream, NLL"):]
    assert downstream.index("│ base") < downstream.index("│ bids-0.1")  # base first: the order the units ran
    assert "report:" not in text  # the report was not written


def test_summarize_run_names_the_report_and_survives_a_run_that_made_nothing_yet(run_dir, tmp_path):
    (run_dir / "report").mkdir(exist_ok=True)
    (run_dir / "report" / REPORT_FILE).write_text("<html></html>")
    console = Console(record=True, width=200)
    summarize_run(run_dir, {}, 1.0, console)
    assert f"report: {run_dir / 'report' / REPORT_FILE}" in console.export_text()
    (run_dir / "report" / REPORT_FILE).unlink()
    console = Console(record=True, width=200)
    summarize_run(tmp_path / "nothing", {"data": "not reached"}, 0.0, console)
    assert console.export_text().strip() == f"poise run {tmp_path / 'nothing'}: 1 not reached in 0s"


# ------------------------------------------------------------------------------------- one evaluation
def test_print_scores_takes_the_macro_average_and_worst_task_from_the_downstream_table(tmp_path):
    scores = json.loads(Path(write_scores(tmp_path / "ev", "bids", {"math": 1.0, "code": 2.0, "chat": 1.5},
                                          exact={"math": 0.5, "code": 0.25})).joinpath("scores.json").read_text())
    console = Console(record=True, width=200)
    print_scores(scores, console)
    lines = console.export_text().splitlines()
    assert "bids: m" in lines[0]
    assert "1.0000 ± 0.0100" in next(line for line in lines if line.startswith("│ math"))
    assert "–" in next(line for line in lines if line.startswith("│ chat"))  # chat reports no exact match
    macro = next(line for line in lines if line.startswith("│ macro-average"))
    worst = next(line for line in lines if line.startswith("│ worst"))
    assert "1.5000" in macro and "0.3750" in macro  # nll over 3 tasks, exact match over the 2 that report it
    assert "2.0000 (code)" in worst and "0.2500 (code)" in worst  # highest nll, lowest exact match


def test_the_cli_prints_scores_through_the_report(tmp_path):
    from poise.cli import print_scores as cli_print_scores

    scores = {"label": "x", "model": "m", "scores": {"a": {"acc": {"value": 0.2}}, "b": {"acc": {"value": 0.6}}}}
    console = Console(record=True, width=120)
    cli_print_scores(scores, console)
    worst = next(line for line in console.export_text().splitlines() if line.startswith("│ worst"))
    assert "0.2000 (a)" in worst
