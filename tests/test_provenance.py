"""poise.provenance is the one place that writes and compares `arguments.json`, and every stage goes through it.

- `open_folder` refuses a folder made with other settings, naming every differing key with both of its values,
  unless overwrite (which starts over); the same settings resume; a non-poise folder is refused.
- Every stage's module (warmup, features, attribute, select, train, import-checkpoint, evaluate, report) opens
  and completes its folder through it.
- No module but poise.provenance names the arguments file.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from poise import provenance
from poise.config import EvaluateConfig, SelectConfig, WarmupConfig, validate
from poise.errors import PoiseError
from poise.files import ARGUMENTS_FILE

SRC = Path(__file__).resolve().parent.parent / "src" / "poise"


def _select(tmp_path: Path, **changes) -> SelectConfig:
    values = {"scores": str(tmp_path / "scores.npy"), "columns": str(tmp_path / "columns.jsonl"),
              "out": str(tmp_path / "sel"), "method": "bids", "budget": "3"}
    values.update(changes)
    return SelectConfig(**values)


@pytest.fixture
def matrix_files(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "scores.npy", rng.standard_normal((12, 4)).astype(np.float32))
    (tmp_path / "columns.jsonl").write_text("".join(json.dumps({"id": f"v{j}", "task": "ab"[j % 2]}) + "\n"
                                                    for j in range(4)))
    return tmp_path


def test_other_settings_are_refused_with_every_differing_key_and_both_values(matrix_files) -> None:
    provenance.open_folder(matrix_files / "sel", "select", _select(matrix_files))
    (matrix_files / "sel" / "work.txt").write_text("partial work")
    with pytest.raises(PoiseError) as error:
        provenance.open_folder(matrix_files / "sel", "select", _select(matrix_files, budget="5", seed=3))
    message = str(error.value)
    assert "budget: '3' -> '5'" in message and "seed: 0 -> 3" in message and "overwrite" in message
    assert (matrix_files / "sel" / "work.txt").exists()  # nothing lost


def test_same_settings_resume_and_overwrite_starts_over(matrix_files) -> None:
    config = _select(matrix_files)
    first = provenance.open_folder(config.out, "select", config)
    assert not first.resumed and not first.complete
    (Path(config.out) / "work.txt").write_text("partial work")
    again = provenance.open_folder(config.out, "select", config)
    assert again.resumed and not again.complete and (Path(config.out) / "work.txt").exists()
    provenance.mark_complete(config.out, rows=3)
    assert provenance.is_complete(config.out)
    assert provenance.open_folder(config.out, "select", config).complete
    other = _select(matrix_files, budget="4", overwrite=True)
    fresh = provenance.open_folder(other.out, "select", other)
    assert not fresh.resumed and not (Path(config.out) / "work.txt").exists()
    assert not provenance.is_complete(config.out)
    record = provenance.stored(config.out)
    assert record["settings"]["budget"] == "4" and record["stage"] == "select" and record["poise_version"]


def test_a_setting_added_since_at_its_none_default_resumes_an_older_folder(matrix_files) -> None:
    """A folder written before a setting existed (here select's `stratify`) lacks the key; the new setting at
    None, its "off" default, computes the same thing, so the folder resumes; any other value is a change."""
    config = _select(matrix_files)
    provenance.open_folder(config.out, "select", config)
    provenance.mark_complete(config.out)
    path = Path(config.out) / ARGUMENTS_FILE
    record = json.loads(path.read_text())
    del record["settings"]["stratify"]
    path.write_text(json.dumps(record))
    assert provenance.open_folder(config.out, "select", config).complete
    with pytest.raises(PoiseError, match="stratify: None -> 'dataset'"):
        provenance.open_folder(config.out, "select", _select(matrix_files, method="random", stratify="dataset"))


def test_execution_only_settings_are_not_compared(matrix_files) -> None:
    """overwrite, device, batch sizes ...: changing them reopens the same folder (and reruns nothing)."""
    a = EvaluateConfig(model="m", out=str(matrix_files / "ev"), data=["x"], batch_size=8, device="cpu")
    b = EvaluateConfig(model="m", out=str(matrix_files / "ev"), data=["x"], batch_size=1, device="cuda")
    assert provenance.settings(a) == provenance.settings(b)
    provenance.open_folder(a.out, "evaluate", a)
    assert provenance.open_folder(b.out, "evaluate", b).resumed


def test_a_folder_not_made_by_poise_is_refused_and_an_abandoned_open_is_not(matrix_files) -> None:
    foreign = matrix_files / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PoiseError, match="not empty and not made by poise select"):
        provenance.open_folder(foreign, "select", _select(matrix_files, out=str(foreign)))
    # opened, then stopped before any work (an input error): the next call with other settings just proceeds
    provenance.open_folder(matrix_files / "sel", "select", _select(matrix_files))
    assert not provenance.open_folder(matrix_files / "sel", "select", _select(matrix_files, budget="5")).resumed


def test_api_errors_name_the_field_not_a_flag(matrix_files) -> None:
    with pytest.raises(PoiseError, match=r"^SelectConfig\.out is required"):
        provenance.open_folder(None, "select", _select(matrix_files, out=None))
    with pytest.raises(PoiseError, match=r"^SelectConfig\.method must be one of"):
        validate(_select(matrix_files, method="nope"))
    with pytest.raises(PoiseError, match=r"^WarmupConfig\.fraction must be in \(0, 1\]"):
        validate(WarmupConfig(model="m", data=["d"], out="o", fraction=0.0))


def test_every_stage_module_opens_and_completes_its_folder_through_provenance() -> None:
    """Read from the source (ast): each stage's module calls open_folder and mark_complete (or, for features,
    its store does) — so each refuses other settings and marks completion the same way."""
    modules = {"train": ["train.py", "warmup.py"], "features": ["features/stage.py", "features/store.py"],
               "attribute": ["attribution.py"], "select": ["selection/stage.py"], "evaluate": ["evaluate.py"],
               "report": ["report"], "import-checkpoint": ["hf_import.py"]}
    for stage, paths in modules.items():
        files = [f for rel in paths for f in ([SRC / rel] if (SRC / rel).suffix == ".py" else
                                              sorted((SRC / rel).rglob("*.py"))) if f.exists()]
        assert files, stage
        called = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                  for f in files for node in ast.walk(ast.parse(f.read_text())) if isinstance(node, ast.Call)}
        assert {"open_folder", "mark_complete"} <= called, f"{stage}: {sorted(called & {'open_folder'})}"


def test_only_provenance_names_the_arguments_file() -> None:
    """Exactly one module writes or compares arguments.json: no other module's code names the file or its constant
    (read with ast; docstrings and help texts may mention it)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in ("provenance.py", "files.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = (isinstance(node, ast.Name) and node.id == "ARGUMENTS_FILE") or \
                (isinstance(node, ast.alias) and node.name == "ARGUMENTS_FILE") or \
                (isinstance(node, ast.Constant) and node.value == ARGUMENTS_FILE)
            if named:
                offenders.append(f"{path.relative_to(SRC)}:{getattr(node, 'lineno', '?')}")
    assert offenders == []
