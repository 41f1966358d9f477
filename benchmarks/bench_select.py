"""Benchmark of `poise.select` at the BIDS paper's scale, and of exact fast BIDS against the naive loop.

Claim measured (docs/design.md §2.5): the exact fast BIDS selects 15% of N = 288,000 training rows against
V = 350 validation columns (7 tasks of different influence scales) in seconds on a CPU, including the
column normalisation, with a peak memory of a few times the matrix, and returns exactly the picks of
the literal Algorithm-1 loop (`tests/oracles.py::bids_naive`), which costs O(B·N·V) and would take hours.

What is measured, per budget fraction (default 5%, 10%, 15%):

* every selection method (bids, instance-max, task-max, sum, random, random stratified by the rows' source,
  rds, round-robin, task-round-robin, rds+) and the ablations (bids without normalisation, instance-max,
  round-robin and task-round-robin with normalisation): the wall clock of `poise.select(...)`
  on a freshly built `AttributionMatrix` each time, so the column statistics are recomputed and the
  time includes normalisation. Building the matrix object runs its validation (finite check, labels);
  that time is reported separately. rds and rds+ run on a synthetic representation-cosine matrix of the
  same shape;
* peak memory: BIDS at the largest budget in a fresh subprocess that generates the matrix in RAM and
  reports `ru_maxrss` before and after the selection, and the peak RSS of the selection itself
  (VmHWM of /proc/self/status, reset just before the selection: ru_maxrss also counts generating
  the matrix and, on Linux, what the parent process had reached when it started the child);
* the naive loop: `bids_naive` on a row subsample (same V) at each budget fraction, seconds per step,
  and a check that fast BIDS on that subsample returns exactly the same picks, gains and columns
  (printed as `ok` or `MISMATCH`; the exit code is 1 on a mismatch). A few naive steps are also timed
  at full size (and checked against the first picks of fast BIDS). The naive full-size time is
  extrapolated as per_step × B_full, with per_step either measured at full size or scaled from the
  subsample by N / N_sub (a step costs O(N·V)).

Run from the repository root:

    .venv/bin/python benchmarks/bench_select.py                       # full scale (a few minutes)
    .venv/bin/python benchmarks/bench_select.py --markdown results.md
    .venv/bin/python benchmarks/bench_select.py --quick               # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import poise
from poise.matrix import AttributionMatrix
from poise.synthetic import synthetic_matrix, synthetic_rds_matrix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from oracles import bids_naive  # noqa: E402

#: (label, method, normalize) - normalize None means the method's default.
RUNS: list[tuple[str, str, bool | None]] = [
    ("bids", "bids", None),
    ("bids (raw)", "bids", False),
    ("instance-max", "instance-max", None),
    ("instance-max (norm)", "instance-max", True),
    ("task-max", "task-max", None),
    ("sum", "sum", None),
    ("random", "random", None),
    ("random (stratified)", "random", None),
    ("rds", "rds", None),
    ("round-robin", "round-robin", None),
    ("round-robin (norm)", "round-robin", True),
    ("task-round-robin", "task-round-robin", None),
    ("task-round-robin (norm)", "task-round-robin", True),
    ("rds+", "rds+", None),
]


# ------------------------------------------------------------------------------------------ helpers
def fresh(template: AttributionMatrix, scores: np.ndarray | None = None) -> tuple[AttributionMatrix, float]:
    """A new matrix object over the same scores (no cached column stats) and its construction time."""
    start = time.perf_counter()
    matrix = AttributionMatrix(
        scores=template.scores if scores is None else scores,
        column_ids=template.column_ids,
        tasks=template.tasks,
        row_ids=template.row_ids,
        kind=template.kind,
        source=template.source,
    )
    return matrix, time.perf_counter() - start


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        nproc = os.cpu_count() or 0
    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        load = "n/a"
    return {
        "nproc": str(nproc),
        "cpu": cpu,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "poise": poise.__version__,
        "load average at start": load,
    }


def command_line() -> str:
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        exe = rel if not rel.startswith("..") else exe
    except ValueError:  # pragma: no cover - other drive
        pass
    return shlex.join([exe, *sys.argv])


def fmt_s(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 100:
        return f"{seconds:.0f}"
    if seconds >= 1:
        return f"{seconds:.2f}"
    return f"{seconds:.3f}"


class Table:
    def __init__(self, title: str, headers: list[str]):
        self.title, self.headers, self.rows, self.notes = title, headers, [], []

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def print(self) -> None:
        try:
            from rich.console import Console
            from rich.table import Table as RichTable
        except ImportError:  # plain text
            widths = [max(len(h), *(len(r[k]) for r in self.rows)) for k, h in enumerate(self.headers)]
            print(f"\n{self.title}")
            print("  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=True)))
            for row in self.rows:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            for note in self.notes:
                print(note)
            return
        table = RichTable(title=self.title, title_justify="left")
        for k, header in enumerate(self.headers):
            table.add_column(header, justify="left" if k < 2 else "right")
        for row in self.rows:
            table.add_row(*row)
        console = Console(width=200)
        console.print(table)
        for note in self.notes:
            console.print(note, markup=False, highlight=False)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" if k < 2 else "---:" for k in range(len(self.headers))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + self.notes
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ peak-memory worker
def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS of this address space), RssAnon and RssFile in MiB, from /proc/self/status."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = float(value.split()[0]) / 1024.0
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # pragma: no cover
        return False


def peak_worker(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter: generate the matrix, then one BIDS selection; print JSON."""
    inherited = rss_mib()
    matrix, _ = synthetic_matrix(n_rows=args.rows, columns_per_task=args.columns_per_task, seed=args.seed)
    gc.collect()
    before_maxrss = rss_mib()
    before = proc_status()
    reset = reset_peak()
    start = time.perf_counter()
    selection = poise.select(matrix, "bids", args.budget_list[0])
    seconds = time.perf_counter() - start
    after = proc_status()
    print(json.dumps({
        "inherited_maxrss_mib": inherited, "before_maxrss_mib": before_maxrss, "after_maxrss_mib": rss_mib(),
        "before_rss_mib": before.get("VmRSS"), "peak_rss_mib": after.get("VmHWM") if reset else None,
        "seconds": seconds, "picks": int(selection.indices.shape[0]),
        "matrix_mib": matrix.scores.nbytes / 2**20,
    }))


def measure_peak(args: argparse.Namespace, budget: float) -> dict:
    """Run `peak_worker` in a new interpreter (call it before this process grows: Linux passes the
    parent's peak RSS on to ru_maxrss of a vfork/exec child)."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak-worker", "--budgets", repr(budget), "--rows", str(args.rows),
         "--columns-per-task", str(args.columns_per_task), "--seed", str(args.seed)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=288_000, help="training rows N (default 288000)")
    parser.add_argument("--columns-per-task", type=int, default=50,
                        help="validation columns per task; 7 tasks (default 50, V = 350)")
    parser.add_argument("--budgets", default="0.05,0.10,0.15",
                        help="comma-separated budget fractions (default 0.05,0.10,0.15)")
    parser.add_argument("--naive-rows", type=int, default=4000,
                        help="row subsample for the naive loop (default 4000)")
    parser.add_argument("--naive-steps", type=int, default=0,
                        help="cap on naive steps on the subsample (default 0: the whole budget)")
    parser.add_argument("--naive-full-steps", type=int, default=3,
                        help="naive steps timed at full size (default 3; 0 skips; ~6x the matrix in RAM)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per method and budget (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic matrix (default 0)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as markdown to PATH")
    parser.add_argument("--peak-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.columns_per_task = 3000, 4
        args.naive_rows, args.naive_full_steps = 500, 1
    args.budget_list = [float(b) for b in args.budgets.split(",") if b.strip()]
    if not args.budget_list or not all(0 < b <= 1 for b in args.budget_list):
        parser.error("--budgets must be fractions in (0, 1]")
    if args.repeat < 1 or args.rows < 1 or args.naive_rows < 2:
        parser.error("--repeat, --rows and --naive-rows must be positive")
    args.naive_rows = min(args.naive_rows, args.rows)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peak_worker:
        peak_worker(args)
        return 0
    warnings.simplefilter("ignore", poise.PoiseWarning)
    info = machine()
    cmd = command_line()
    print(f"command: {cmd}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))

    # --------------------------------------------- peak memory (first, while this process is small)
    peak_budget = max(args.budget_list)
    peak = measure_peak(args, peak_budget)
    print(f"  peak-memory subprocess: BIDS at {peak_budget:.0%} in {fmt_s(peak['seconds'])} s", flush=True)

    start = time.perf_counter()
    template, row_sources = synthetic_matrix(n_rows=args.rows, columns_per_task=args.columns_per_task,
                                             seed=args.seed)
    rds_template = synthetic_rds_matrix(row_sources, template, seed=args.seed)
    rds_plus_template = dataclasses.replace(rds_template, kind="rds+")
    source_names = sorted(set(row_sources.tolist()))
    strata = (np.searchsorted(np.array(source_names), row_sources).astype(np.int64), source_names)
    n, v = template.n_rows, template.n_columns
    print(f"matrix: N={n:,} x V={v} float32 ({template.scores.nbytes / 2**20:.0f} MiB), "
          f"{len(template.task_names)} tasks; generated in {time.perf_counter() - start:.1f} s")

    # ---------------------------------------------------------------- every method, fresh matrix
    timing = Table("Selection time (s): poise.select on a fresh matrix, incl. column normalisation",
                   ["budget", "method", "picks", "select median", "select min", "validate"])
    fast_full: dict[float, float] = {}
    fast_picks: dict[float, np.ndarray] = {}
    for budget in args.budget_list:
        for label, method, normalize in RUNS:
            base = {"rds": rds_template, "rds+": rds_plus_template}.get(method, template)
            extra = {"strata": strata, "stratify": "source"} if "stratified" in label else {}
            select_times, validate_times = [], []
            for _ in range(args.repeat):
                gc.collect()
                matrix, validate_s = fresh(base)
                t0 = time.perf_counter()
                selection = poise.select(matrix, method, budget, normalize=normalize, seed=args.seed, **extra)
                select_times.append(time.perf_counter() - t0)
                validate_times.append(validate_s)
                picks = selection.indices
                del matrix, selection
            med = statistics.median(select_times)
            timing.add(f"{budget:.0%}", label, f"{picks.shape[0]:,}", fmt_s(med), fmt_s(min(select_times)),
                       fmt_s(statistics.median(validate_times)))
            if label == "bids":
                fast_full[budget], fast_picks[budget] = med, picks
            print(f"  {budget:>4.0%} {label:<20} {fmt_s(med):>8} s  (validate {fmt_s(validate_times[0])} s)",
                  flush=True)

    # ------------------------------------------------------------------------------ naive loop
    ok = True
    n_sub = args.naive_rows
    sub_template = AttributionMatrix(
        scores=np.ascontiguousarray(template.scores[:n_sub]), column_ids=template.column_ids,
        tasks=template.tasks, row_ids=None if template.row_ids is None else template.row_ids[:n_sub],
        kind=template.kind, source="synthetic-subsample",
    )
    sub_values = sub_template.normalized()
    naive = Table(
        f"Naive Algorithm-1 loop vs fast BIDS (subsample: first {n_sub:,} rows, V={v}; "
        f"full: N={n:,})",
        ["budget", "check", "steps (sub)", "naive/step (sub)", "fast s (sub)", "B (full)",
         "naive est. A", "naive est. B", "fast s (full)", "speedup A", "speedup B"],
    )
    naive.notes.append(
        "check: fast BIDS on the subsample returns the naive loop's rows, gains and columns exactly. "
        "Naive full-size time in s (h where marked): est. A = naive/step (sub) x N/N_sub x B (full); "
        "est. B = naive/step measured at full size x B (full). speedup = est. / fast s (full)."
    )
    full_step = None
    full_check = "skipped"
    if args.naive_full_steps > 0:
        values = template.normalized()
        t0 = time.perf_counter()
        bids_naive(values, 0)  # the float64 copy the loop makes once
        setup = time.perf_counter() - t0
        k = min(args.naive_full_steps, n)
        t0 = time.perf_counter()
        rows_full, _, _ = bids_naive(values, k)
        full_step = max(time.perf_counter() - t0 - setup, 0.0) / k
        first = fast_picks[max(fast_picks)]
        full_check = "ok" if list(first[:k]) == rows_full else "MISMATCH"
        ok &= full_check == "ok"
        del values
        gc.collect()
        print(f"  naive at full size: {k} step(s), {full_step * 1e3:.1f} ms/step; "
              f"first picks vs fast: {full_check}", flush=True)
        naive.notes.append(
            f"Naive loop at full size: {k} step(s) timed, {full_step * 1e3:.1f} ms/step "
            f"(after its one-off float64 copy, {setup:.2f} s); "
            f"its picks equal fast BIDS's first {k}: {full_check}."
        )
    for budget in args.budget_list:
        sub_matrix, _ = fresh(sub_template)
        t0 = time.perf_counter()
        fast = poise.select(sub_matrix, "bids", budget)
        fast_sub = time.perf_counter() - t0
        b_sub = fast.indices.shape[0]
        steps = b_sub if args.naive_steps <= 0 else min(b_sub, args.naive_steps)
        t0 = time.perf_counter()
        bids_naive(sub_values, 0)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows, gains, cols = bids_naive(sub_values, steps)
        per_step = max(time.perf_counter() - t0 - setup, 0.0) / steps
        fast_rows = fast.indices[:steps].tolist()
        fast_gains = [t["score"] for t in fast.trace[:steps]]
        fast_cols = [t["column"] for t in fast.trace[:steps]]
        bad = [name for name, a, b in (("rows", fast_rows, rows), ("gains", fast_gains, gains),
                                       ("columns", fast_cols, cols)) if a != b]
        check = "ok" if not bad else "MISMATCH (" + ", ".join(bad) + ")"
        ok &= not bad
        b_full = fast_picks[budget].shape[0]
        est_sub = per_step * (n / n_sub) * b_full
        est_full = full_step * b_full if full_step is not None else float("nan")
        naive.add(f"{budget:.0%}", check, f"{steps:,}/{b_sub:,}", f"{per_step * 1e3:.2f} ms", fmt_s(fast_sub),
                  f"{b_full:,}", fmt_s(est_sub), fmt_s(est_full) if full_step is not None else "-",
                  fmt_s(fast_full[budget]), f"{est_sub / fast_full[budget]:,.0f}x",
                  f"{est_full / fast_full[budget]:,.0f}x" if full_step is not None else "-")
        print(f"  fast == naive on {n_sub:,} rows at {budget:.0%} ({steps} steps): {check}", flush=True)

    def mib(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.0f} MiB"

    memory = Table(
        f"Peak memory: BIDS at {peak_budget:.0%} in a fresh process (matrix generated there, in RAM)",
        ["matrix", "scores size", "RSS before select", "peak RSS during select", "select adds",
         "ru_maxrss before", "ru_maxrss after", "select s"],
    )
    added = None if peak["peak_rss_mib"] is None else peak["peak_rss_mib"] - peak["before_rss_mib"]
    memory.add(f"{n:,} x {v}", mib(peak["matrix_mib"]), mib(peak["before_rss_mib"]),
               mib(peak["peak_rss_mib"]), mib(added), mib(peak["before_maxrss_mib"]),
               mib(peak["after_maxrss_mib"]), fmt_s(peak["seconds"]))
    memory.notes.append(
        "RSS before select: VmRSS once the matrix is built. Peak RSS during select: VmHWM, reset to the "
        "current RSS just before the selection (/proc/self/clear_refs). ru_maxrss before: the process peak "
        "so far, which includes the temporaries of generating the matrix "
        f"(at interpreter start it read {peak['inherited_maxrss_mib']:,.0f} MiB). On Linux the VmHWM reset "
        "also resets what ru_maxrss reports, so ru_maxrss after is the peak of the selection alone."
    )

    print()
    for table in (timing, naive, memory):
        table.print()
    print(f"\nfast BIDS == naive loop: {'ok' if ok else 'MISMATCH'}")
    if args.markdown:
        lines = [f"Command: `{cmd}`", "",
                 "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
        lines += [table.markdown() for table in (timing, naive, memory)]
        lines.append(f"fast BIDS == naive loop: **{'ok' if ok else 'MISMATCH'}**\n")
        Path(args.markdown).write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
