"""Benchmark: selection and attribution at a million rows, on a memory-mapped float16 matrix, in bounded RAM.

Claim measured (docs/design.md §2.5, "Memory"): BIDS and every selection rule run on a memory-mapped
1,000,000 x 1,000 float16 attribution matrix (`scores.npy`, 2 GB on disk) without holding it in RAM - not as
float32 (4 GB), not as float16, not as any other full-size copy - because every pass reads row blocks and
hands the pages back, and what grows with the pool is a few 1-D arrays (and the picks).

What is measured:

* the matrix, generated once and cached in FOLDER (a poise attribution folder: scores.npy float16,
  columns.jsonl, rows.jsonl, info.json) the way `poise attribute` streams one: per chunk of training rows,
  unit feature rows times the unit validation features (cosines), written into a memory-mapped .npy. The
  features (dimension --dim) are drawn on the fly: each row comes from one of K+1 sources, each task's
  columns sit near their own source, and every task has its own influence scale (up to 12x apart, after the
  BIDS paper's Figure 1), so raw selection crowds into the large-scale tasks. Its seconds and peak RSS are
  reported (the real stage also reads and dequantises a feature store, usually of dimension 8192);
* for BIDS and every registered rule (and the ablations bids without normalisation, instance-max with it)
  at --budget (default 5%): in a fresh subprocess, `load_attribution(FOLDER)` (opens the memory map and
  runs the finite check, one pass) and then `poise.select`, each timed; RSS after loading and the peak RSS
  of the selection (VmHWM of /proc/self/status, reset just before the selection via /proc/self/clear_refs,
  so the load's own peak is reported apart). rds runs instance-max on the same scores read as an rds
  matrix (the arithmetic does not depend on what the scores mean).
* a method still running after --timeout seconds is stopped; its time is extrapolated from its last
  progress reports (BIDS reports every 4,096 picks, the rules every block of rows: the time of the last
  report plus what is left at the rate between the last two) and marked as such.

Run from the repository root (a 2-core shared machine: nice it):

    nice -n 10 .venv/bin/python benchmarks/bench_select_1m.py --markdown /tmp/bench_1m.md
    .venv/bin/python benchmarks/bench_select_1m.py --quick            # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

#: (label, method, normalize, kind) - normalize None means the method's default; kind overrides the folder's.
RUNS: list[tuple[str, str, bool | None, str | None]] = [
    ("bids", "bids", None, None),
    ("bids (raw)", "bids", False, None),
    ("instance-max", "instance-max", None, None),
    ("instance-max (norm)", "instance-max", True, None),
    ("task-max", "task-max", None, None),
    ("sum", "sum", None, None),
    ("random", "random", None, None),
    ("rds", "rds", None, "rds"),
]
#: Influence scale per task, cycled: after the BIDS paper's Figure 1 (MMLU-like columns dwarf code columns).
SCALES = (0.25, 0.35, 0.5, 0.6, 0.8, 1.0, 1.5, 3.0)
GENERATOR_VERSION = 1


# ------------------------------------------------------------------------------------------- helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import proc_status, reset_peak  # noqa: E402  (one reading of /proc/self/status for the benchmarks)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (less sensitive than wall time to a busy shared machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, str]:
    import poise

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        load = "n/a"
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        memory = "n/a"
    return {"nproc": str(len(os.sched_getaffinity(0))), "cpu": cpu, "RAM": memory,
            "python": platform.python_version(), "numpy": np.__version__, "poise": poise.__version__,
            "load average at start": load}


def command_line() -> str:
    exe = sys.executable
    rel = os.path.relpath(exe)
    return shlex.join([rel if not rel.startswith("..") else exe, *sys.argv])


def fmt_s(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:.0f}"
    if seconds >= 1:
        return f"{seconds:.1f}"
    return f"{seconds:.2f}"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MiB"


# ------------------------------------------------------------------------------------- the matrix
def layout(args: argparse.Namespace) -> dict:
    """What the cached matrix was made with: a folder made otherwise is made again."""
    return {"rows": args.rows, "columns": args.columns, "tasks": args.tasks, "dim": args.dim, "seed": args.seed,
            "generator": GENERATOR_VERSION}


def generate_worker(args: argparse.Namespace) -> None:
    """Fresh interpreter: write the attribution folder the way `poise attribute` streams one; print JSON."""
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, v, k, d = args.rows, args.columns, args.tasks, args.dim
    rng = np.random.default_rng(args.seed)
    task_of_col = np.arange(v) * k // v  # k contiguous groups of columns
    names = [f"task{t}" for t in range(k)]
    centers = rng.standard_normal((k + 1, d)).astype(np.float32)  # source k serves no task
    val = centers[task_of_col] + 1.2 * rng.standard_normal((v, d)).astype(np.float32)
    val /= np.linalg.norm(val, axis=1, keepdims=True)
    scale = (np.array([SCALES[t % len(SCALES)] for t in range(k)])[task_of_col]
             * rng.lognormal(0.0, 0.35, size=v)).astype(np.float32)
    offset = (rng.normal(0.0, 0.1, size=v) * scale).astype(np.float32)
    tmp = folder / ".scores.npy.tmp"
    start_time = time.perf_counter()
    scores = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, v))
    handle = None
    if args.write == "file":  # sequential writes after the header: no written page stays in this process
        header = scores.offset
        del scores
        handle = open(tmp, "r+b")  # noqa: SIM115 - closed below
        handle.seek(header)
    chunk = 16384
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block_rng = np.random.default_rng([args.seed, start])
        source = block_rng.integers(0, k + 1, size=stop - start)
        train = 0.8 * centers[source] + block_rng.standard_normal((stop - start, d), dtype=np.float32)
        train /= np.linalg.norm(train, axis=1, keepdims=True)
        block = ((train @ val.T) * scale + offset).astype(np.float16)  # cosines, per-task scales
        if handle is None:
            scores[start:stop] = block
        else:
            handle.write(block.tobytes())
    if handle is None:
        scores.flush()
        del scores
    else:
        handle.close()
    write_s = time.perf_counter() - start_time
    peak = maxrss_mib()
    status = proc_status()
    os.replace(tmp, folder / "scores.npy")
    with open(folder / "columns.jsonl", "w", encoding="utf-8") as handle:
        for j in range(v):
            handle.write(json.dumps({"id": f"{names[task_of_col[j]]}-{j}", "task": names[task_of_col[j]]}) + "\n")
    with open(folder / "rows.jsonl", "w", encoding="utf-8") as handle:
        for start in range(0, n, 100_000):
            handle.write("".join(f'{{"id": "pool-{i}"}}\n' for i in range(start, min(n, start + 100_000))))
    info = {"n_rows": n, "n_columns": v, "kind": "influence", "bench_layout": layout(args)}
    (folder / "info.json").write_text(json.dumps(info), encoding="utf-8")
    print(json.dumps({"write_s": write_s, "total_s": time.perf_counter() - start_time, "peak_mib": peak,
                      "rss_file_mib": status.get("RssFile"), "rss_anon_mib": status.get("RssAnon"),
                      "bytes": (folder / "scores.npy").stat().st_size}))


def ensure_matrix(args: argparse.Namespace) -> dict | None:
    """Generate the folder unless a complete one of the same layout is there; the generation's numbers or None."""
    info_path = Path(args.folder) / "info.json"
    if not args.regenerate and info_path.exists() and (Path(args.folder) / "scores.npy").exists():
        try:
            if json.loads(info_path.read_text()).get("bench_layout") == layout(args):
                return None
        except (OSError, ValueError):
            pass
    if info_path.exists():
        info_path.unlink()
    out = run_worker(args, ["--generate-worker"], timeout=None)
    return out["result"]


# -------------------------------------------------------------------------------------- selections
def select_worker(args: argparse.Namespace) -> None:
    """Fresh interpreter: load the folder, run one selection; progress lines on stderr, JSON on stdout."""
    import poise
    from poise.matrix import AttributionMatrix, load_attribution
    from poise.selection import bids

    warnings.simplefilter("ignore")
    label, method, normalize, kind = next(run for run in RUNS if run[0] == args.label)
    counters = {"fills": 0, "fill_s": 0.0, "stats_s": 0.0}
    fill, stats = bids._Prefixes._fill, AttributionMatrix.column_stats

    def timed_fill(self, *a, **k):
        start = time.perf_counter()
        fill(self, *a, **k)
        counters["fills"] += 1
        counters["fill_s"] += time.perf_counter() - start

    def timed_stats(self):
        start = time.perf_counter()
        out = stats(self)
        counters["stats_s"] += time.perf_counter() - start
        return out

    bids._Prefixes._fill = timed_fill
    AttributionMatrix.column_stats = timed_stats
    start = time.perf_counter()
    matrix = load_attribution(args.folder, kind=kind)
    load_s = time.perf_counter() - start
    load_peak = maxrss_mib()
    after_load = proc_status()
    reset = reset_peak()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"progress {done} {total} {time.perf_counter() - t0:.3f}", file=sys.stderr, flush=True)

    selection = poise.select(matrix, method, args.budget, normalize=normalize, seed=args.seed, progress=progress)
    select_s = time.perf_counter() - t0
    select_cpu = cpu_seconds() - cpu0
    end = proc_status()
    print(json.dumps({
        "label": label, "picks": int(selection.indices.shape[0]), "load_s": load_s, "select_s": select_s,
        "select_cpu_s": select_cpu,
        "rss_after_load_mib": after_load.get("VmRSS"), "load_peak_mib": load_peak,
        "select_peak_mib": end.get("VmHWM") if reset else None, "rss_anon_end_mib": end.get("RssAnon"),
        "rss_file_end_mib": end.get("RssFile"), "memory_mapped": matrix.memory_mapped,
        "dtype": str(matrix.scores.dtype), **counters,
    }))


def run_worker(args: argparse.Namespace, extra: list[str], timeout: float | None) -> dict:
    """Run this script as a worker; {"result": JSON or None, "progress": last (done, total, seconds) or None}."""
    command = [sys.executable, __file__, "--folder", str(args.folder), "--rows", str(args.rows),
               "--columns", str(args.columns), "--tasks", str(args.tasks), "--dim", str(args.dim),
               "--budget", repr(args.budget), "--seed", str(args.seed), "--write", args.write, *extra]
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            stdout, _ = process.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, _ = process.communicate()
            timed_out = True
        err.seek(0)
        log = err.read()
    last = previous = None
    for line in log.splitlines():
        if line.startswith("progress "):
            _, done, total, seconds = line.split()
            previous, last = last, (int(done), int(total), float(seconds))
    if last and previous and last[0] > previous[0]:  # the rate of the last stretch, for the extrapolation
        last = (*last, (last[2] - previous[2]) / (last[0] - previous[0]))
    if not timed_out and process.returncode != 0:
        raise SystemExit(f"worker {extra} failed ({process.returncode}):\n{log[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1]) if not timed_out else None
    return {"result": result, "progress": last}


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "poise-bench-1m"),
                        help="where the generated attribution folder is cached (default: /tmp/poise-bench-1m)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows N (default 1000000)")
    parser.add_argument("--columns", type=int, default=1000, help="validation columns V (default 1000)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks the columns are split into (default 8)")
    parser.add_argument("--dim", type=int, default=64, help="feature dimension of the generated cosines (default 64)")
    parser.add_argument("--budget", type=float, default=0.05, help="budget fraction (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated matrix and of random")
    parser.add_argument("--methods", default=",".join(run[0] for run in RUNS),
                        help="comma-separated labels to run, none to only generate (default: all: "
                        + ", ".join(r[0] for r in RUNS) + ")")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds before a method is stopped and extrapolated (default 600)")
    parser.add_argument("--regenerate", action="store_true", help="generate the matrix again even if it is cached")
    parser.add_argument("--write", choices=("file", "mmap"), default="file",
                        help="generation writes each chunk to the file (default) or into a writable memory map, as "
                        "`poise attribute` does today (its written pages stay resident: RSS grows to the file size)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes in a temporary folder, for a smoke test")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as markdown to PATH")
    parser.add_argument("--generate-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--select-worker", metavar="LABEL", dest="label", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scratch = False  # a folder of our own, removed at the end
    if args.quick:
        args.rows, args.columns, args.tasks, args.dim = 20_000, 40, 4, 16
        if args.folder == parser.get_default("folder"):
            args.folder = os.path.join(tempfile.gettempdir(), f"poise-bench-1m-quick-{os.getpid()}")
            args.scratch = True
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in {run[0] for run in RUNS}]
    if unknown:
        parser.error(f"unknown method label(s) {unknown}; choose from {[run[0] for run in RUNS]}")
    args.labels = labels
    if not 0 < args.budget <= 1:
        parser.error("--budget must be a fraction in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate_worker:
        generate_worker(args)
        return 0
    if args.label:
        select_worker(args)
        return 0
    info = machine()
    cmd = command_line()
    print(f"command: {cmd}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    generated = ensure_matrix(args)
    size = (Path(args.folder) / "scores.npy").stat().st_size
    shape = f"{args.rows:,} x {args.columns:,} float16 ({size / 2**30:.2f} GiB on disk, "
    shape += f"{args.rows * args.columns * 4 / 2**30:.2f} GiB as float32)"
    print(f"matrix: {shape} in {args.folder}" + (" (generated now)" if generated else " (cached)"))
    lines = [f"Command: `{cmd}`", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             f"Matrix: {shape}, {args.tasks} tasks, generated with feature dimension {args.dim}.", ""]
    if generated:
        how = "into a writable memory map" if args.write == "mmap" else "written to the file chunk by chunk"
        text = (f"Generation (`poise attribute`-style streaming: unit rows x unit validation features per chunk of "
                f"16,384 rows, float16, {how}): {fmt_s(generated['write_s'])} s, peak RSS "
                f"{mib(generated['peak_mib'])} (at its end RssFile {mib(generated['rss_file_mib'])}, RssAnon "
                f"{mib(generated['rss_anon_mib'])}).")
        print(text)
        lines += [text, ""]

    header = ["method", "picks", "load s", "select s", "select CPU s", "RSS after load", "peak RSS during select",
              "load peak", "stats s", "BIDS fills (s)", "note"]
    rows = []
    for label in args.labels:
        out = run_worker(args, ["--select-worker", label], timeout=args.timeout)
        result, last = out["result"], out["progress"]
        if result is None:
            if last and last[0]:  # at the last stretch's rate, else the average rate so far
                rate = last[3] if len(last) > 3 else last[2] / last[0]
                estimate = last[2] + (last[1] - last[0]) * rate
                note = (f"stopped after {fmt_s(args.timeout)} s at {last[0]:,}/{last[1]:,}; "
                        f"extrapolated select ~{fmt_s(estimate)} s")
            else:
                note = f"stopped after {fmt_s(args.timeout)} s before its first progress report"
            row = [label, "-", "-", "-", "-", "-", "-", "-", "-", "-", note]
        else:
            fills = f"{result['fills']} ({fmt_s(result['fill_s'])})" if result["fills"] else "-"
            row = [label, f"{result['picks']:,}", fmt_s(result["load_s"]), fmt_s(result["select_s"]),
                   fmt_s(result["select_cpu_s"]),
                   mib(result["rss_after_load_mib"]), mib(result["select_peak_mib"]), mib(result["load_peak_mib"]),
                   fmt_s(result["stats_s"]) if result["stats_s"] else "-", fills,
                   "" if result["memory_mapped"] else "NOT memory-mapped"]
        rows.append(row)
        print("  " + " | ".join(row), flush=True)

    table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if k in (0, len(header) - 1) else "---:"
                                                             for k in range(len(header))) + "|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [
        "load s: `load_attribution` (memory map, labels, row ids, the finite check: one pass). select s: "
        "`poise.select` (column statistics: two passes, where normalised; the selection; the per-pick trace); "
        "select CPU s: its user + system CPU time (the machine is shared: wall time includes waiting for a core). "
        "RSS after load: VmRSS once loaded (the interpreter, numpy, the row-id list). peak RSS during select: "
        "VmHWM reset to the current RSS just before `poise.select`, so it includes what was already resident. "
        "load peak: ru_maxrss before that reset. stats s: the column statistics inside select. BIDS fills: "
        "streaming passes that (re)filled the per-column prefixes and their seconds (the first fills every "
        "column)."
    ]
    print("\n" + "\n".join(table) + "\n\n" + notes[0])
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines + table + [""] + notes) + "\n", encoding="utf-8")
        print(f"wrote {args.markdown}")
    if args.scratch:
        import shutil

        shutil.rmtree(args.folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
