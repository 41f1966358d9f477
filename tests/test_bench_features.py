"""Smoke test of the gradient-features benchmark: it runs end to end on a tiny random Llama and prints its
results table (no timing assertions: the machine is shared)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_features.py"


def test_bench_features_quick(tmp_path):
    markdown = tmp_path / "features.md"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Gradient features: examples/s" in out
    for variant in ("floor", "poise sjlt", "poise rademacher", "LESS-style reference"):
        assert variant in out
    assert "features identical to the timed path: yes" in out
    assert "floor time / sjlt time" in out and "sjlt / LESS-style reference" in out
    text = markdown.read_text(encoding="utf-8")
    assert "| variant | batch | examples | seconds | examples/s | vs floor | vs LESS-style ref. |" in text


def test_prompt_share_makes_that_share_of_the_tokens_prompt():
    sys.path.insert(0, str(BENCH.parent))
    from bench_features import make_examples
    from tiny import tiny_tokenizer

    from poise.data import tokenize_examples

    tokenizer = tiny_tokenizer()
    for share in (None, 0.6):
        _, tokenized, _ = tokenize_examples(make_examples(tokenizer, 12, 60, 200, 0, share), tokenizer, 2048,
                                            progress=False)
        masked = 1 - sum(t.n_targets for t in tokenized) / sum(len(t) for t in tokenized)
        assert (masked < 0.4) if share is None else (0.55 <= masked <= 0.75), (share, masked)
        assert min(len(t) for t in tokenized) >= 60
