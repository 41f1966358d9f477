"""Cost growth with the pool: `poise run --until select` on a tiny model at N = 1K, 10K, 100K examples.

The model is a tiny Llama (hidden 64, 2 layers) with a realistic LoRA shape for its size (r=128 on q/k/v/o,
LESS's) and LESS's projection (sjlt, d = 8192), so the model's compute is cheap and everything that grows
with the pool shows: tokenising, batching, the feature store, attribution, selection, and the memory a
process holds. Each N runs in a fresh `poise run` process (its own poise cache, so the tokenisation is part of
it); the run's seconds per stage come from its pipeline.json, its peak RSS from the kernel (ru_maxrss of the
child), its disk per stage from the folders. Results are appended to a JSON-lines file as each N finishes, so
an interrupted benchmark reruns only what is missing, and `poise run` itself resumes a killed N.

    .venv/bin/python benchmarks/bench_pipeline.py --sizes 1000 10000 100000 --out /tmp/poise-bench-pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("apple river seven blue code sum proof list tree fast print moon answer question number letter word "
         "which first second third add subtract multiply divide").split()
TASKS = ("math", "code", "chat")


def conversation(rng: random.Random, i: int, task: str | None = None) -> dict:
    user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
    answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))
    row = {"id": f"ex{i}", "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    if task:
        row["task"] = task
    return row


def write_inputs(folder: Path, n: int) -> Path:
    """pool.jsonl (n examples), validation/ (3 tasks x 8), the model; returns the run config."""
    from tiny import tiny_llama, tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(n)
    with open(folder / "pool.jsonl", "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps(conversation(rng, i)) + "\n")
    for task in TASKS:
        (folder / "validation").mkdir(exist_ok=True)
        (folder / "validation" / f"{task}.jsonl").write_text(
            "".join(json.dumps({**conversation(rng, k, task), "id": f"{task}{k}"}) + "\n" for k in range(8)))
    model = folder / "model"
    if not (model / "config.json").exists():
        tokenizer = tiny_tokenizer()
        tiny_llama(tokenizer, hidden=64, layers=2, heads=4, kv_heads=4).save_pretrained(model)
        tokenizer.save_pretrained(model)
    config = {"model": str(model), "pool": str(folder / "pool.jsonl"), "validation": str(folder / "validation"),
              "out": str(folder / "run"), "max_seq_length": 128,
              "warmup": {"fraction": 0.05, "epochs": 2, "batch_size": 32, "lora_r": 128, "lora_alpha": 512},
              "features": {"dim": 8192, "projection": "sjlt", "max_tokens": 4096},
              "select": {"methods": ["bids", "task-max", "sum", "random"], "budgets": ["0.05", "0.15"]},
              "train": {"methods": ["bids"], "lora_r": 128, "lora_alpha": 512}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "run.yaml"


def measure(n: int, root: Path) -> dict:
    folder = root / f"n{n}"
    config = write_inputs(folder, n)
    env = {**os.environ, "POISE_CACHE": str(folder / "cache")}
    started = time.perf_counter()
    # a wrapper process per N: its children's peak RSS (ru_maxrss, KiB) is this N's alone
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "poise", "run", str(config), "--until",
                          "select"], check=True, env=env, stdout=subprocess.PIPE, text=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - started
    state = json.loads((folder / "run" / "pipeline.json").read_text())
    stages: dict[str, float] = {}
    for name, unit in state["units"].items():
        stage = name.split("/")[0]
        stages[stage] = stages.get(stage, 0.0) + float(unit.get("seconds") or 0.0)
    from poise.io import disk_size

    disk = {stage: disk_size(folder / "run" / stage) for stage in stages}
    disk["tokenized cache"] = disk_size(folder / "cache")
    return {"n": n, "seconds": seconds, "stages": stages, "peak_rss": peak * 1024,
            "disk": disk, "cpus": os.cpu_count()}


def table(results: list[dict]) -> str:
    stages = list(dict.fromkeys(s for r in results for s in r["stages"]))
    lines = ["| N | " + " | ".join(f"{s} s (ms/example)" for s in stages) + " | peak RSS | disk |",
             "|---|" + "---|" * (len(stages) + 2)]
    for r in results:
        cells = [f"{r['stages'].get(s, 0):.1f} ({1000 * r['stages'].get(s, 0) / r['n']:.2f})" for s in stages]
        lines.append(f"| {r['n']:,} | " + " | ".join(cells) + f" | {r['peak_rss'] / 2**20:,.0f} MiB | "
                     f"{sum(r['disk'].values()) / 2**20:,.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--out", default="/tmp/poise-bench-pipeline")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results_file = root / "results.jsonl"
    done = {json.loads(line)["n"]: json.loads(line) for line in results_file.read_text().splitlines()
            if line.strip()} if results_file.exists() else {}
    for n in args.sizes:
        if n in done:
            continue
        done[n] = measure(n, root)
        with open(results_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(done[n]) + "\n")
        print(f"N={n:,}: {done[n]['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(table([done[n] for n in sorted(done) if n in args.sizes]))


if __name__ == "__main__":
    main()
