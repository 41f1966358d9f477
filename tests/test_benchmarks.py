"""Smoke test of the selection benchmark: it runs end to end and fast BIDS matches the naive loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_select.py"


def test_bench_select_quick(tmp_path):
    markdown = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fast BIDS == naive loop: ok" in result.stdout
    assert "MISMATCH" not in result.stdout
    assert "fast BIDS == naive loop: **ok**" in markdown.read_text(encoding="utf-8")


def test_bench_select_1m_quick(tmp_path):
    """The million-row benchmark end to end on a tiny matrix: every method runs memory-mapped on float16."""
    bench = BENCH.parent / "bench_select_1m.py"
    markdown = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, str(bench), "--quick", "--folder", str(tmp_path / "matrix"), "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = markdown.read_text(encoding="utf-8")
    for label in ("bids", "bids (raw)", "instance-max", "instance-max (norm)", "task-max", "sum", "random", "rds"):
        assert f"| {label} | 1,000 |" in text
    assert "NOT memory-mapped" not in text and "stopped after" not in text
