"""Write the mini BIDS study's results from its run directory into small committed files.

    python experiments/mini_bids/summarize.py runs/mini_bids --out experiments/mini_bids/results

Writes these files:

- `runs.csv`: one row per evaluation (method, budget, seed, per capability NLL and exact match, macro,
  worst).
- `summary.json`: means, 95% t intervals, paired comparisons, the paper's orderings.
- `tables.md`: the paper's Table 2 and 3 layouts, the paired comparisons and which of the paper's orderings
  hold, for NLL and exact match.
- `answers.md`: Appendix A.7, held-out prompts answered by the base model and by the BIDS, task-max and
  random fine-tunes.
- `progress.md`: which units are done.
- `overlap.md`: BIDS's overlap with every other method; with `--second`, also how much the task-max and
  BIDS selections move when the warmup and the projection are redone with another seed.
- The report's AID, THI and z-score figures, copied; `aid_<budget>.png` and `thi_<budget>.png` show the
  selections of the paper's Figures 3 and 4 (unnormalised, normalised, BIDS, with task-max and random).
- `balance.md` and `balance_thi_<budget>.png` / `balance_aid_<budget>.png`: the balancing rules (BIDS, round-robin,
  task-round-robin, RDS+, task-max, balanced and plain random) side by side on the same influence matrix.

With `--epochs4`, the 15% BIDS selection trained for 4 epochs joins the tables as the method
`bids-epochs4`. It works on a partial run: whatever is evaluated so far is summarised, and `progress.md`
says what is missing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
from pathlib import Path

from poise.report.study import (
    collect,
    collect_samples,
    markdown_tables,
    orderings,
    orderings_table,
    overlap_table,
    overlap_with,
    paired,
    selection_overlap,
    side_by_side,
    summarize,
)

FIGURES = ("aid_comparison.png", "thi_comparison.png", "zscore_fit.png")


#: The selections of the paper's Figures 3 and 4 (unnormalised, normalised, BIDS) with LESS and random beside.
FIGURE_METHODS = ("random-{b}-seed0", "task-max-{b}", "instance-max-{b}", "instance-max-norm-{b}", "bids-{b}")


#: The balancing rules side by side (docs/study.md, "How the balancing rules differ"): BIDS, the peers' turns,
#: LESS's task-max and the two random baselines.
BALANCE_METHODS = ("task-max-{b}", "bids-{b}", "round-robin-{b}", "task-round-robin-{b}", "rds+-{b}",
                   "random-stratified-{b}-seed0", "random-{b}-seed0")


def paper_figures(run: Path, budget: str, out: Path, methods: tuple[str, ...] = FIGURE_METHODS,
                  prefix: str = "") -> None:
    """AID and THI of the Table 3 selections at one budget (paper Figures 3 and 4): aid_<b>.png, thi_<b>.png
    (with a prefix, the same figures of other selections)."""
    import tempfile

    from poise.config import ReportConfig
    from poise.report import run_report

    folders = [run / "selections" / m.format(b=budget) for m in methods]
    if not (run / "attribution").is_dir() or not all((f / "selection.json").is_file() for f in folders):
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_report(ReportConfig(selections=[str(f) for f in folders], attribution=str(run / "attribution"),
                                out=tmp, embed_images=False, title=f"selections at {budget}"))
        for name, target in (("aid_comparison.png", f"{prefix}aid_{budget}.png"),
                             ("thi_comparison.png", f"{prefix}thi_{budget}.png")):
            if (Path(tmp) / name).is_file():
                shutil.copy(Path(tmp) / name, out / target)


def balance_table(run: Path, budgets: tuple[str, ...]) -> str:
    """Per budget and balancing rule, on the run's influence matrix column-normalised (A', the paper's Section
    6.2): each task's instance-wise THI share (the task of a pick's highest A' column), the spread between the
    largest and the smallest share, and how many validation instances are the highest column of at least one
    pick. Empty when the selections are not there yet."""
    import numpy as np

    from poise.analysis import profile
    from poise.matrix import load_attribution
    from poise.selection import read_selection

    if not (run / "attribution").is_dir():
        return ""
    matrix = load_attribution(run / "attribution")
    names = matrix.task_names
    text = ["**Instance-wise THI share per task on A' (the task of each pick's highest normalised column), its "
            "spread (largest minus smallest share), and the validation instances that are some pick's highest "
            f"column (of {matrix.n_columns})**\n\n",
            "| budget | method | " + " | ".join(names) + " | spread | instances served |\n",
            "|---|---|" + "---:|" * (len(names) + 2) + "\n"]
    families = _capability_families(run)
    own_text = ["\n**Picks whose pool family (the row's `dataset`) is one of the capability's own families, for "
                "the capability each pick served (the trace's task), and picks from the families that serve none "
                "(the demo data's `UNRELATED`)**\n\n", "| budget | method | own family | unrelated families |\n",
                "|---|---|---:|---:|\n"] if families else []
    aid_text = ["\n**AID per task on A': the mean normalised influence of the picks on the task's validation "
                "instances (averaged over them)**\n\n", "| budget | method | " + " | ".join(names) + " |\n",
                "|---|---|" + "---:|" * len(names) + "\n"]
    rows = 0
    for budget in budgets:
        for pattern in BALANCE_METHODS:
            folder = run / "selections" / pattern.format(b=budget)
            if not (folder / "selection.json").is_file():
                continue
            selection = read_selection(folder)
            picks = selection.indices
            shares = profile(matrix, picks, normalized=True).summary(matrix)
            values = [shares[n]["thi_share"] for n in names]
            best = np.argmax(matrix.normalized_rows(np.sort(picks)), axis=1)
            label = pattern.format(b="").rstrip("-").replace("--", "-")
            text.append(f"| {budget} | {label} | " + " | ".join(f"{v:.2f}" for v in values)
                        + f" | {max(values) - min(values):.2f} | {np.unique(best).size} |\n")
            if families:
                served = [(p.get("task"), families["rows"][p["row"]]) for p in selection.trace]
                own = sum(1 for task, family in served if task and family in families["capabilities"].get(task, ()))
                unrelated = sum(1 for _, family in served if family in families["unrelated"])
                n = len(served)
                own_text.append(f"| {budget} | {label} | " + (f"{own} of {n}" if any(t for t, _ in served) else "–")
                                + f" | {unrelated} of {n} |\n")
            aid_text.append(f"| {budget} | {label} | "
                            + " | ".join(f"{shares[n]['mean_normalized_influence']:.2f}" for n in names) + " |\n")
            rows += 1
    if not rows:
        return ""
    # what a task's columns offer a gain-based rule: the best row of each column, and the 10th best (the tail)
    tops = {name: np.sort(matrix.read_columns(cols), axis=0)[::-1] for name, cols in matrix.task_columns().items()}
    tail = ["\n**The tail of each task's columns on A': the median over its columns of the column's highest value "
            "and of its 10th highest**\n\n", "| | " + " | ".join(names) + " |\n",
            "|---|" + "---:|" * len(names) + "\n"]
    stats = matrix.column_stats()
    for k, what in ((0, "highest"), (9, "10th highest")):
        cells = []
        for name, cols in matrix.task_columns().items():
            mean, std = stats.mean[cols], stats.std[cols]
            cells.append(f"{np.median((tops[name][min(k, len(tops[name]) - 1)] - mean) / std):.2f}")
        tail.append(f"| {what} | " + " | ".join(cells) + " |\n")
    return "".join(text + own_text + aid_text + tail)


def _capability_families(run: Path) -> dict | None:
    """For the demo data: each pool row's reasoning-gym family (in row order), the families of each capability
    and the unrelated ones. None when the run's pool is not the demo data."""
    from poise.data.demo import CAPABILITIES, UNRELATED

    pool = run / "data" / "pool.jsonl"
    if not pool.is_file():
        return None
    rows = [str(json.loads(line).get("dataset", "")).rsplit("/", 1)[-1]
            for line in pool.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"rows": rows, "capabilities": {k: set(v) for k, v in CAPABILITIES.items()}, "unrelated": set(UNRELATED)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the study's run directory (runs/mini_bids)")
    parser.add_argument("--out", required=True, help="folder for the result files")
    parser.add_argument("--budget", default="0.15", help="budget of the runs in answers.md (default 0.15)")
    parser.add_argument("--second", help="the same study's selections with another warmup/projection seed "
                        "(runs/mini_bids_seed1): their Jaccard overlap goes to overlap.md")
    parser.add_argument("--epochs4", help="the 15%% BIDS selection trained for 4 epochs (runs/mini_bids_epochs4): "
                        "the paper's 'BIDS (epochs=4)' row, compared with the full pool")
    args = parser.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    within = overlap_with(run) if (run / "selections").is_dir() else []
    text = ("**Within the run: the BIDS selection's overlap with each method's at the same budget (random: "
            "seed 0)**\n\n| budget | method | shared with BIDS | Jaccard |\n|---|---|---:|---:|\n" +
            "".join(f"| {e['budget']} | {e['method']} | {e['shared']} of {e['size']} | {e['jaccard']:.2f} |\n"
                    for e in within))
    entries = []
    if args.second and (Path(args.second) / "selections").is_dir():
        entries = selection_overlap(run, args.second)
        text += (f"\n**Selections of {run} (seed A) and {args.second} (seed B: warmup and projection redone with "
                 "another seed), Jaccard overlap of the picked example ids**\n\n" + overlap_table(entries))
    if within or entries:
        (out / "overlap.json").write_text(json.dumps({"bids_vs_methods": within, "across_seeds": entries},
                                                     indent=1), encoding="utf-8")
        (out / "overlap.md").write_text(text, encoding="utf-8")

    state = json.loads((run / "pipeline.json").read_text()) if (run / "pipeline.json").is_file() else {"units": {}}
    units = state["units"]
    done = [n for n, u in units.items() if u.get("complete")]
    seconds = sum(float(u.get("seconds") or 0) for u in units.values() if u.get("complete"))
    total = state.get("total_units")
    of = f"{total} in the run" if total else f"{len(units)} started or done"
    lines = [f"# Progress of {run}\n\n", f"- units complete: {len(done)} of {of}\n",
             f"- compute time of the complete units: {seconds / 3600:.2f} h\n"]
    by_stage: dict[str, list[float]] = {}
    for unit in units.values():
        if unit.get("complete"):
            by_stage.setdefault(unit["stage"], []).append(float(unit.get("seconds") or 0))
    lines += [f"- {stage}: {len(times)} units, {sum(times) / 60:.1f} min\n" for stage, times in by_stage.items()]
    (out / "progress.md").write_text("".join(lines), encoding="utf-8")

    for budget in ("0.1", "0.15"):  # the selections' figures need no evaluation
        paper_figures(run, budget, out)
        paper_figures(run, budget, out, BALANCE_METHODS, prefix="balance_")
    balance = balance_table(run, ("0.1", "0.15"))
    if balance:
        (out / "balance.md").write_text(balance, encoding="utf-8")
    if not (run / "evaluation").is_dir():
        print(f"{run}: no evaluations yet; wrote {out / 'progress.md'}")
        return 0
    rows = collect(run)
    samples = {metric: collect_samples(run, metric) for metric in ("nll", "exact_match")}
    if args.epochs4 and (Path(args.epochs4) / "evaluation").is_dir():  # the paper's "BIDS (epochs=4)" row
        for row in collect(args.epochs4):
            rows.append({**row, "method": "bids-epochs4", "label": f"epochs4/{row['label']}"})
        for metric in samples:
            samples[metric].update({f"epochs4/{label}": values
                                    for label, values in collect_samples(args.epochs4, metric).items()})
    tasks = sorted({t for r in rows for t in (r.get("nll") or {}).get("tasks", {})})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "method", "budget", "seed"] + [f"{m}:{t}" for m in ("nll", "exact_match")
                                                             for t in [*tasks, "macro", "worst"]])
    for r in rows:
        cells = []
        for metric in ("nll", "exact_match"):
            values = r.get(metric) or {"tasks": {}}
            cells += [values["tasks"].get(t, "") for t in tasks] + [values.get("macro", ""), values.get("worst", "")]
        writer.writerow([r["label"], r["method"], r["budget"] or "", "" if r["seed"] is None else r["seed"], *cells])
    (out / "runs.csv").write_text(buffer.getvalue(), encoding="utf-8")
    summary = {metric: {"by_method": summarize(rows, metric), "bids_paired": paired(rows, metric=metric),
                        "orderings": orderings(rows, metric, samples[metric])}
               for metric in ("nll", "exact_match")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    (out / "tables.md").write_text("\n".join(markdown_tables(rows, metric) + "\n" +
                                             orderings_table(summary[metric]["orderings"], metric)
                                             for metric in ("nll", "exact_match")), encoding="utf-8")
    names = ["base"] + [n for n in (f"bids-{args.budget}-seed0", f"task-max-{args.budget}-seed0",
                                    f"random-{args.budget}-seed0") if (run / "evaluation" / n).is_dir()]
    (out / "answers.md").write_text(side_by_side(run, names), encoding="utf-8")
    for figure in FIGURES:
        if (run / "report" / figure).is_file():
            shutil.copy(run / "report" / figure, out / figure)
    print(f"wrote {out}: {len(rows)} evaluations summarised")
    return 0


if __name__ == "__main__":
    sys.exit(main())
