"""Smoke test of the feature-store benchmark: it runs end to end on a small pool and a tiny Llama, and its table
says each kind's bytes per example and a float16 change to A within float16's precision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_store.py"
UNIT_ROUNDOFF_FLOAT16 = 2.0**-11


@pytest.mark.slow  # an end-to-end run: demo data, warmup, features (about 20 s; make test-slow, CI)
def test_bench_store_quick(tmp_path):
    markdown = tmp_path / "store.md"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--n", "30", "--dim", "128", "--val-per-task", "2", "--max-seq-length", "96",
         "--no-seed-reference", "--cache", str(tmp_path / "cache"), "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in markdown.read_text(encoding="utf-8").splitlines() if line.startswith("| ")}
    assert {kind: rows[kind][0] for kind in ("float32", "float16", "int8", "1bit")} == {
        "float32": "512", "float16": "256", "int8": "132", "1bit": "16"}
    assert float(rows["float32"][1]) == 0 and rows["float32"][3:7] == ["1.000"] * 4
    # a cosine of rows each within 2^-11 relative of the float32 ones moves by at most ~2 * 2 * 2^-11
    assert 0 < float(rows["float16"][1]) <= 4 * UNIT_ROUNDOFF_FLOAT16
    assert "train 1bit + val float32" in rows
