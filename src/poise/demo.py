"""`poise demo`: the whole pipeline on the embedded default, or (`--synthetic`) the selection methods alone.

The default is `poise run demo`: the run config poise ships (configs/demo.yaml) on SmolLM2-135M-Instruct and
poise's demo data (poise.data.demo), ending with the selection comparison, the downstream table and the
report. The synthetic default is a deterministic synthetic attribution matrix with seven tasks whose influence scales
differ by an order of magnitude (like the BIDS paper's Figure 1), a matching tulu-format pool and an
RDS similarity matrix. It shows the paper's finding in seconds: raw-influence rules pile into the
large-scale task; BIDS spreads the budget across tasks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from poise.config import DemoConfig, SelectConfig
from poise.io import atomic_write_lines
from poise.report import build_report, print_summary
from poise.selection.stage import run_select
from poise.synthetic import synthetic_matrix, synthetic_pool, synthetic_rds_matrix

#: (folder, method, normalize, label): the paper's methods and its two ablations.
DEMO_METHODS: tuple[tuple[str, str, bool | None, str], ...] = (
    ("bids", "bids", None, "bids"),
    ("bids-raw", "bids", False, "bids (raw)"),
    ("instance-max-norm", "instance-max", True, "instance-max (norm)"),
    ("instance-max", "instance-max", None, "instance-max"),
    ("task-max", "task-max", None, "task-max"),
    ("sum", "sum", None, "sum"),
    ("rds", "rds", None, "rds"),
    ("random", "random", None, "random"),
)


def run_demo(config: DemoConfig, console: Console | None = None) -> Path | None:
    """The real-model demo (`poise run demo`), or the synthetic one; returns the report's path."""
    console = console or Console(soft_wrap=True)
    if config.synthetic:
        return run_synthetic_demo(config, console)
    from poise import distributed
    from poise.pipeline import run, summarize

    result = run("demo", overrides=[f"out={config.out or 'runs/demo'}"])
    if distributed.is_main():
        summarize(result, console)
    return result.report


def run_synthetic_demo(config: DemoConfig, console: Console | None = None) -> Path:
    """Build the synthetic inputs under `config.out`, run every method, write and summarise the report."""
    console = console or Console(soft_wrap=True)
    started = time.perf_counter()
    out = Path(config.out or "runs/demo-synthetic")
    matrix, sources = synthetic_matrix(config.rows, config.columns_per_task, seed=config.seed)
    settings = {"generator": "poise.synthetic", "rows": config.rows,
                "columns_per_task": config.columns_per_task, "seed": config.seed}
    matrix.save(out / "attribution", info=settings)
    synthetic_rds_matrix(sources, matrix, seed=config.seed).save(out / "attribution-rds", info=settings)
    pool = out / "pool.jsonl"
    atomic_write_lines(pool, (json.dumps(row) for row in synthetic_pool(sources, seed=config.seed)))
    console.print(
        f"[bold]poise demo[/]: synthetic pool of {matrix.n_rows} examples, {matrix.n_columns} validation "
        f"examples in {len(matrix.task_names)} tasks, budget {config.budget}"
    )
    selections = []
    for folder, method, normalize, label in DEMO_METHODS:
        attribution = out / ("attribution-rds" if method == "rds" else "attribution")
        selection, _ = run_select(
            SelectConfig(
                attribution=str(attribution), method=method, budget=config.budget,
                out=str(out / "selections" / folder), pool=str(pool), seed=config.seed,
                normalize=normalize, label=label, overwrite=True,
            )
        )
        selections.append(selection)
    report = build_report(matrix, selections, out / "report", title="poise demo: selection methods compared")
    print_summary(matrix, selections, console=console)
    console.print(f"selections: {out / 'selections'}/<method>/selected.jsonl")
    console.print(f"report: {report}")
    console.print(f"done in {time.perf_counter() - started:.1f}s")
    return report
