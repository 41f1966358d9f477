"""Study tables: a run's evaluations grouped by method, budget and training seed, summarised over seeds.

A run with `train.seeds` holds one evaluation per (method, budget, seed) (`evaluation/<method>-<budget>-seed<k>/`)
plus `base` and, with `train.full_pool`, `full-seed<k>`. For each group and metric this module gives the
mean over seeds with a 95% confidence interval from Student's t with n-1 degrees of freedom (the seeds are
the independent replicates; with three of them the normal interval would be far too narrow), and the
paired comparison of BIDS with every other method at the same budget: per seed the difference of the
macro-average and of the worst capability (the same seed means the same LoRA initialisation and data
order, so the pairs share that part of the noise), their mean and t interval, and how many seeds BIDS won.
The layouts follow the BIDS paper's Table 2 (methods x capabilities + macro-average + worst) and Table 3
(instance-max raw -> normalised -> BIDS).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poise.analysis import jaccard
from poise.errors import PoiseError
from poise.evaluate import LOWER_IS_BETTER
from poise.files import EVAL_SCORES_FILE as SCORES_FILE
from poise.files import SAMPLES_FILE, SELECTED_FILE, SELECTION_FILE
from poise.io import read_json
from poise.report.downstream import macro_and_worst

#: Two-sided 95% quantiles of Student's t, by degrees of freedom (beyond 30: the normal 1.96).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042}
LABEL = re.compile(r"^(?P<method>.+?)-(?P<budget>\d*\.?\d+)(?:-seed(?P<seed>\d+))?$")
FULL = re.compile(r"^full(?:-seed(?P<seed>\d+))?$")
#: The rows of the paper's Table 3, in order: raw instance-max, normalised instance-max, BIDS.
TABLE3 = ("instance-max", "instance-max-norm", "bids-raw", "bids")


def t95(df: int) -> float:
    if df <= 0:
        return math.nan
    known = [d for d in T95 if d <= df]
    return T95[max(known)] if df <= 30 else 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t interval (NaN for one value), n)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, 1
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t95(n - 1) * sd / math.sqrt(n), n


def parse_label(label: str) -> tuple[str, str | None, int | None]:
    """`bids-0.1-seed2` -> (bids, 0.1, 2); `full-seed1` -> (full, None, 1); `base` -> (base, None, None)."""
    if label == "base":
        return "base", None, None
    full = FULL.match(label)
    if full:
        return "full", None, int(full["seed"]) if full["seed"] else None
    match = LABEL.match(label)
    if not match:
        return label, None, None
    return match["method"], match["budget"], int(match["seed"]) if match["seed"] else None


def collect(run_dir: str | Path, metrics: Sequence[str] = ("nll", "exact_match")) -> list[dict[str, Any]]:
    """One row per evaluation of the run: label, method, budget, seed, and per metric the per-capability
    values, macro-average and worst capability."""
    run_dir = Path(run_dir)
    rows = []
    for path in sorted((run_dir / "evaluation").glob(f"*/{SCORES_FILE}")):
        data = read_json(path)
        label = str(data.get("label") or path.parent.name)
        method, budget, seed = parse_label(path.parent.name)
        row: dict[str, Any] = {"label": label, "method": method, "budget": budget, "seed": seed}
        for metric in metrics:
            values = {task: (m.get(metric) or {}).get("value") for task, m in data["scores"].items()}
            if any(v is None for v in values.values()) or not values:
                continue
            macro, worst = macro_and_worst(list(values.values()), metric not in LOWER_IS_BETTER)
            row[metric] = {"tasks": values, "macro": macro, "worst": worst}
        rows.append(row)
    if not rows:
        raise PoiseError(f"{run_dir}: no evaluations (evaluation/*/{SCORES_FILE})")
    return rows


def summarize(rows: Sequence[dict[str, Any]], metric: str = "nll") -> list[dict[str, Any]]:
    """Per (method, budget): mean and 95% t half-width over seeds of every capability, the macro-average and
    the worst capability, with the number of seeds."""
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for row in rows:
        if metric in row:
            groups.setdefault((row["method"], row["budget"]), []).append(row[metric])
    out = []
    for (method, budget), values in groups.items():
        tasks = list(values[0]["tasks"])
        entry: dict[str, Any] = {"method": method, "budget": budget, "seeds": len(values), "tasks": {}}
        for task in tasks:
            entry["tasks"][task] = mean_ci([v["tasks"][task] for v in values])[:2]
        entry["macro"] = mean_ci([v["macro"] for v in values])[:2]
        entry["worst"] = mean_ci([v["worst"] for v in values])[:2]
        out.append(entry)
    return out


def _by_key(rows: Sequence[dict[str, Any]], metric: str) -> dict[tuple, dict[str, Any]]:
    return {(r["method"], r["budget"], r["seed"]): r for r in rows if metric in r}


def _seed_pairs(by_key: dict[tuple, dict[str, Any]], better: str, budget: str, worse: str,
                worse_budget: str | None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row of `better`, row of `worse`) for every training seed both have."""
    seeds = sorted(s for (m, b, s) in by_key if m == better and b == budget and (worse, worse_budget, s) in by_key)
    return [(by_key[(better, budget, s)], by_key[(worse, worse_budget, s)]) for s in seeds]


def _difference(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]], metric: str, what: str) -> dict[str, Any]:
    """Per-seed differences (first minus second) of `what` (macro or worst): mean, 95% t half-width, and on
    how many seeds the first was better."""
    lower = metric in LOWER_IS_BETTER
    diffs = [a[metric][what] - b[metric][what] for a, b in pairs]
    mean, half, _ = mean_ci(diffs)
    return {"diffs": diffs, "mean": mean, "half": half,
            "better_on": sum(1 for d in diffs if (d < 0 if lower else d > 0))}


def paired(rows: Sequence[dict[str, Any]], reference: str = "bids", metric: str = "nll") -> list[dict[str, Any]]:
    """BIDS minus each other method at the same budget, paired by training seed: mean difference of the
    macro-average and of the worst capability with its 95% t half-width, and the seeds BIDS was better on."""
    by_key = _by_key(rows, metric)
    out = []
    others = sorted({(m, b) for (m, b, _s) in by_key if m not in (reference, "base", "full") and b is not None},
                    key=lambda k: (str(k[1]), k[0]))
    budgets = sorted({b for (m, b, _s) in by_key if m == reference and b is not None})
    others += [("full", b) for b in budgets if any(m == "full" for (m, _b, _s) in by_key)]  # BIDS subset vs all
    for method, budget in others:
        pairs = _seed_pairs(by_key, reference, budget, method, None if method == "full" else budget)
        if not pairs:
            continue
        entry: dict[str, Any] = {"method": method, "budget": budget, "pairs": len(pairs)}
        for what in ("macro", "worst"):
            d = _difference(pairs, metric, what)
            entry[what] = {"difference": d["mean"], "ci": d["half"], "bids_better_on": d["better_on"]}
        out.append(entry)
    return out


def _cell(value: tuple[float, float], digits: int) -> str:
    mean, half = value
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def markdown_tables(rows: Sequence[dict[str, Any]], metric: str = "nll", digits: int = 3) -> str:
    """Table 2 (every method per budget), Table 3 (the normalisation / iteration ablation) and the paired
    comparisons, as markdown."""
    summary = summarize(rows, metric)
    if not summary:
        return ""
    tasks = list(summary[0]["tasks"])
    direction = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    head = "| method | budget | seeds | " + " | ".join(tasks) + " | macro-average | worst |\n"
    rule = "|---|---|---:|" + "---:|" * (len(tasks) + 2) + "\n"

    def line(entry: dict[str, Any]) -> str:
        cells = [_cell(entry["tasks"][t], digits) for t in tasks]
        return (f"| {entry['method']} | {entry['budget'] or '–'} | {entry['seeds']} | " + " | ".join(cells) +
                f" | {_cell(entry['macro'], digits)} | {_cell(entry['worst'], digits)} |\n")

    order = {m: k for k, m in enumerate(("base", "random", "random-stratified", "task-max", "instance-max", "sum",
                                         "rds", "rds+", "round-robin", "task-round-robin", "instance-max-norm",
                                         "bids-raw", "bids", "bids-epochs4", "full"))}
    ranked = sorted(summary, key=lambda e: (str(e["budget"] or ""), order.get(e["method"], 99), e["method"]))
    text = [f"**Table 2 layout: {metric} ({direction}), mean ± 95% t interval over training seeds**\n\n", head, rule]
    text += [line(e) for e in ranked]
    table3 = [e for e in ranked if e["method"] in TABLE3]
    if table3:
        text += [f"\n**Table 3 layout: instance-max raw → normalised → BIDS ({metric}, {direction})**\n\n", head, rule]
        text += [line(e) for e in sorted(table3, key=lambda e: (str(e["budget"]), TABLE3.index(e["method"])))]
    comparisons = paired(rows, metric=metric)
    if comparisons:
        text += [f"\n**BIDS minus each method, paired by training seed ({metric}; {direction}: a "
                 f"{'negative' if metric in LOWER_IS_BETTER else 'positive'} difference favours BIDS)**\n\n",
                 "| method | budget | pairs | macro-average difference | BIDS better (seeds) | worst difference | "
                 "BIDS better (seeds) |\n", "|---|---|---:|---:|---:|---:|---:|\n"]
        for c in comparisons:
            text.append(f"| {c['method']} | {c['budget']} | {c['pairs']} | "
                        f"{_cell((c['macro']['difference'], c['macro']['ci']), digits)} | "
                        f"{c['macro']['bids_better_on']}/{c['pairs']} | "
                        f"{_cell((c['worst']['difference'], c['worst']['ci']), digits)} | "
                        f"{c['worst']['bids_better_on']}/{c['pairs']} |\n")
    return "".join(text)


def side_by_side(run_dir: str | Path, runs: Sequence[str], per_capability: int = 2) -> str:
    """Appendix A.7 in miniature: for the first held-out prompts of each capability, the gold answer and the
    greedy answers of the given evaluation runs (their samples.jsonl), as a markdown table."""
    run_dir = Path(run_dir)
    answers: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for name in runs:
        path = run_dir / "evaluation" / name / SAMPLES_FILE
        if path.is_file():
            answers[name] = {(r["capability"], str(r["id"])): r for r in
                             (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)}
    if not answers:
        return ""
    first = next(iter(answers.values()))
    chosen: list[tuple[str, str]] = []
    for capability in sorted({c for c, _ in first}):
        chosen += sorted(k for k in first if k[0] == capability)[:per_capability]
    names = list(answers)
    text = ["| capability | id | gold | " + " | ".join(names) + " |\n", "|---|---|---|" + "---|" * len(names) + "\n"]

    def clean(value: Any) -> str:
        return " ".join(str(value).split()).replace("|", "\\|")[:60] if value is not None else "–"

    for key in chosen:
        gold = first[key].get("answer")
        cells = [clean(answers[n].get(key, {}).get("generation")) for n in names]
        text.append(f"| {key[0]} | {key[1]} | {clean(gold)} | " + " | ".join(cells) + " |\n")
    return "".join(text)


def _selected_ids(folder: Path) -> list[str]:
    """The picks of a selection folder as example ids (selected.jsonl), or as pool rows (selection.json)."""
    lines = (folder / SELECTED_FILE)
    if lines.is_file():
        ids = [json.loads(line).get("id") for line in lines.read_text(encoding="utf-8").splitlines() if line.strip()]
        if all(i is not None for i in ids):
            return [str(i) for i in ids]
    return [f"row{i}" for i in read_json(folder / SELECTION_FILE)["indices"]]


def selection_overlap(run_a: str | Path, run_b: str | Path) -> list[dict[str, Any]]:
    """How much a selection moves when the warmup/features are redone with another seed: for every selection
    folder the two runs share, the Jaccard overlap of their picks (by example id), with the overlap two
    independent uniform draws of the same sizes would have in expectation (k_a k_b / n shared on average)."""
    run_a, run_b = Path(run_a), Path(run_b)
    out = []
    for folder in sorted(p for p in (run_a / "selections").glob("*") if (p / SELECTION_FILE).is_file()):
        other = run_b / "selections" / folder.name
        if not (other / SELECTION_FILE).is_file():
            continue
        a, b = set(_selected_ids(folder)), set(_selected_ids(other))
        n = int(read_json(folder / SELECTION_FILE)["n_pool"])
        expected = len(a) * len(b) / n if n else math.nan
        out.append({"selection": folder.name, "size": [len(a), len(b)], "shared": len(a & b),
                    "jaccard": _jaccard_of_ids(a, b),
                    "random_jaccard": expected / (len(a) + len(b) - expected) if n else math.nan})
    return out


def _jaccard_of_ids(a: set[str], b: set[str]) -> float:
    number = {example: k for k, example in enumerate(sorted(a | b))}  # ids as the indices jaccard takes
    return jaccard([number[x] for x in a], [number[x] for x in b])


def overlap_with(run_dir: str | Path, reference: str = "bids") -> list[dict[str, Any]]:
    """Within one run: for each budget, the Jaccard overlap of the `reference` selection with every other
    method's selection at that budget (random: its first seed's), by example id."""
    selections = Path(run_dir) / "selections"
    out = []
    for folder in sorted(selections.glob(f"{reference}-*")):
        budget = folder.name[len(reference) + 1:]
        if not LABEL.match(f"x-{budget}") or "seed" in budget or not (folder / SELECTION_FILE).is_file():
            continue
        ours = set(_selected_ids(folder))
        for other in sorted(selections.glob(f"*-{budget}")) + sorted(selections.glob(f"*-{budget}-seed0")):
            method = parse_label(other.name)[0]
            if other == folder or not (other / SELECTION_FILE).is_file():
                continue
            theirs = set(_selected_ids(other))
            out.append({"budget": budget, "method": method, "shared": len(ours & theirs), "size": len(ours),
                        "jaccard": _jaccard_of_ids(ours, theirs)})
    return out


def overlap_table(entries: Sequence[dict[str, Any]]) -> str:
    """`selection_overlap` as a markdown table."""
    if not entries:
        return ""
    text = ["| selection | picks (seed A / seed B) | shared | Jaccard | Jaccard of two random draws |\n",
            "|---|---:|---:|---:|---:|\n"]
    text += [f"| {e['selection']} | {e['size'][0]} / {e['size'][1]} | {e['shared']} | {e['jaccard']:.2f} | "
             f"{e['random_jaccard']:.2f} |\n" for e in entries]
    return "".join(text)


#: The paper's orderings this study checks, then BIDS against the peers' rules: (name, better method, worse
#: method, budget of the worse one relative to the better: "same" or None for the full pool). "Better" means the
#: paper found it better (for the peers' rules: the first named is the one put to the test).
CLAIMS = (
    ("normalisation: instance-max (raw) -> instance-max (normalised)", "instance-max-norm", "instance-max", "same"),
    ("iteration: instance-max (normalised) -> BIDS", "bids", "instance-max-norm", "same"),
    ("BIDS over BIDS without normalisation", "bids", "bids-raw", "same"),
    ("BIDS over random", "bids", "random", "same"),
    ("BIDS over task-max (LESS)", "bids", "task-max", "same"),
    ("a BIDS subset over the full pool", "bids", "full", None),
    ("a BIDS subset trained for 4 epochs over the full pool", "bids-epochs4", "full", None),
    # the peers' balancing rules (not claims of the BIDS paper: the comparisons its results raise)
    ("BIDS over round-robin (RDS+'s per-instance turn)", "bids", "round-robin", "same"),
    ("BIDS over task-round-robin (the per-task turn)", "bids", "task-round-robin", "same"),
    ("BIDS over RDS+", "bids", "rds+", "same"),
    ("BIDS over balanced random (stratified by source)", "bids", "random-stratified", "same"),
    ("round-robin over random", "round-robin", "random", "same"),
)


def collect_samples(run_dir: str | Path, metric: str = "nll") -> dict[str, dict[tuple[str, str], float]]:
    """Per evaluation (folder name): each held-out item's value of `metric` from its samples.jsonl."""
    out: dict[str, dict[tuple[str, str], float]] = {}
    for path in sorted(Path(run_dir).glob("evaluation/*/samples.jsonl")):
        values = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get(metric) is not None:
                    values[(str(record["capability"]), str(record["id"]))] = float(record[metric])
        if values:
            out[path.parent.name] = values
    return out


def _item_interval(samples: dict[str, dict[tuple[str, str], float]], better: Sequence[str], worse: Sequence[str],
                   capabilities: Sequence[str] | None = None) -> float:
    """95% half-width of the macro-average difference from the held-out items alone: per item the difference
    averaged over the seed pairs, per capability its variance over items / n, averaged over capabilities
    (the evaluation set's sampling error, which the interval over seeds does not contain). NaN without
    per-item values."""
    if not all(label in samples for label in (*better, *worse)):
        return math.nan
    items = set.intersection(*(set(samples[label]) for label in (*better, *worse)))
    caps = sorted({c for c, _ in items} if capabilities is None else set(capabilities))
    variance, n_items = 0.0, 0
    for capability in caps:
        diffs = [sum(samples[b][key] - samples[w][key] for b, w in zip(better, worse, strict=True)) / len(better)
                 for key in sorted(items) if key[0] == capability]
        if len(diffs) < 2:
            return math.nan
        mean = sum(diffs) / len(diffs)
        variance += sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)
        n_items += len(diffs)
    return t95(n_items - len(caps)) * math.sqrt(variance) / len(caps)


def orderings(rows: Sequence[dict[str, Any]], metric: str = "nll",
              samples: dict[str, dict[tuple[str, str], float]] | None = None) -> list[dict[str, Any]]:
    """For each of the paper's claims (CLAIMS) and budget, on the macro-average and the worst capability: the
    paired difference (claimed-better minus claimed-worse, by training seed) with its 95% t half-width over
    seeds (training noise), and with `samples` (collect_samples) the 95% half-width from the held-out items
    (evaluation-set noise; for the worst capability only when both methods have the same worst capability on
    every seed); whether the claim's direction holds on the mean, whether it is a tie, and whether the
    difference exceeds both intervals (beyond noise)."""
    lower = metric in LOWER_IS_BETTER
    by_key = _by_key(rows, metric)
    budgets = sorted({b for (_m, b, _s) in by_key if b is not None}, key=float)
    out = []
    for claim, better, worse, relation in CLAIMS:
        for budget in budgets:
            pairs = _seed_pairs(by_key, better, budget, worse, budget if relation == "same" else None)
            if not pairs:
                continue
            entry: dict[str, Any] = {"claim": claim, "better": better, "worse": worse, "budget": budget,
                                     "pairs": len(pairs)}
            labels = ([b["label"] for b, _ in pairs], [w["label"] for _, w in pairs])
            for what in ("macro", "worst"):
                d = _difference(pairs, metric, what)
                mean, half = d["mean"], d["half"]
                items = math.nan
                if samples is not None and what == "macro":
                    items = _item_interval(samples, *labels)
                elif samples is not None:  # the worst capability's items, when it is the same one throughout
                    worst = {_worst_task(r[metric], lower) for pair in pairs for r in pair}
                    items = _item_interval(samples, *labels, capabilities=sorted(worst)) if len(worst) == 1 \
                        else math.nan
                tie = all(abs(x) < 1e-12 for x in d["diffs"])
                even = abs(mean) < 1e-12  # e.g. +1 item on one seed, -1 on another
                holds = not even and (mean < 0 if lower else mean > 0)
                beyond = (not even and not math.isnan(half) and abs(mean) > half
                          and (math.isnan(items) or abs(mean) > items))
                entry[what] = {"difference": mean, "ci": half, "items_ci": items, "tie": tie, "even": even,
                               "holds": holds, "beyond_noise": beyond, "seeds_agreeing": d["better_on"]}
            out.append(entry)
    return out


def _worst_task(values: dict[str, Any], lower: bool) -> str:
    tasks = values["tasks"]
    return (max if lower else min)(tasks, key=lambda t: tasks[t])


def orderings_table(entries: Sequence[dict[str, Any]], metric: str = "nll", digits: int = 3) -> str:
    """`orderings` as markdown: one line per claim and budget, for the macro-average and the worst capability."""
    if not entries:
        return ""
    sign = "negative" if metric in LOWER_IS_BETTER else "positive"

    def verdict(value: dict[str, Any]) -> str:
        if value["tie"]:
            return "tie (identical on every seed)"
        if value["even"]:
            return "equal on the mean"
        if value["holds"]:
            return "holds, beyond noise" if value["beyond_noise"] else "holds on the mean, within noise"
        return "reversed, beyond noise" if value["beyond_noise"] else "reversed on the mean, within noise"

    def items(value: dict[str, Any]) -> str:
        return "–" if math.isnan(value["items_ci"]) else f"± {value['items_ci']:.{digits}f}"

    text = [f"**The paper's orderings, and BIDS against the peers' balancing rules ({metric}; paired by training "
            "seed, claimed-better minus claimed-worse: a "
            f"{sign} difference agrees with the paper; ± is the 95% half-width over training seeds, then the one "
            "from the held-out items; beyond noise means beyond both)**\n\n",
            "| claim | budget | pairs | macro-average difference | items | verdict | worst difference | items | "
            "verdict |\n", "|---|---|---:|---:|---:|---|---:|---:|---|\n"]
    for e in entries:
        text.append(f"| {e['claim']} | {e['budget']} | {e['pairs']} | "
                    f"{_cell((e['macro']['difference'], e['macro']['ci']), digits)} | {items(e['macro'])} | "
                    f"{verdict(e['macro'])} | {_cell((e['worst']['difference'], e['worst']['ci']), digits)} | "
                    f"{items(e['worst'])} | {verdict(e['worst'])} |\n")
    return "".join(text)
