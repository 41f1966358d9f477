"""Memory and time of the data layer: how many bytes per token a process holds, old path vs the tokenised set.

Writes a pool of N synthetic conversations (JSONL), then, each in a fresh process so that nothing is shared:
- `lists`: the path before the tokenised set: `read_examples` + `tokenize_examples` (Python lists of ids and
  labels, plus the parsed messages), held as the stages held them;
- `build`: `tokenized_set` building the cache (parse into Arrow, `datasets.map` with P processes);
- `mapped`: a stage's view: open the cached set and read every example's tokens batch by batch, as
  `poise features` does (collate included).
Each reports its private memory growth (RssAnon in /proc/self/status, which excludes the memory-mapped
Arrow pages: those are the page cache's, shared by every process on the node and evictable) and its peak RSS
(VmHWM, which includes the pages touched), divided by the pool's tokens.

    .venv/bin/python benchmarks/bench_data.py --n 100000 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("apple river seven blue code sum proof list tree fast print moon answer question number letter word "
         "which first second third add subtract multiply divide").split()


def write_pool(path: Path, n: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 120)))
            handle.write(json.dumps({"id": f"ex{i}", "messages": [{"role": "user", "content": user},
                                                                  {"role": "assistant", "content": answer}]}) + "\n")


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(mode: str, pool: str, max_seq_length: int) -> None:
    """One measurement, printed as a JSON line."""
    import datasets  # noqa: F401  (imported before the baseline: libraries are not the data's memory)
    import torch  # noqa: F401
    from tiny import tiny_tokenizer

    from poise.data import batch_plan, collate, read_examples, tokenize_examples, tokenized_set

    tokenizer = tiny_tokenizer()
    after_first = None
    before = status()
    started = time.perf_counter()
    if mode == "lists":
        examples = read_examples(pool)
        _, tokenized, _ = tokenize_examples(examples, tokenizer, max_seq_length, progress=False)
        tokens = sum(len(t.input_ids) for t in tokenized)
    elif mode == "build":
        data = tokenized_set([pool], tokenizer, max_seq_length, progress=False, report=False)
        tokens = data.tokens
    else:
        data = tokenized_set([pool], tokenizer, max_seq_length, progress=False, report=False)
        tokens = data.tokens
        batches = batch_plan(data.lengths, 4096)
        seen, after_first = 0, None
        for k in range(len(batches)):
            batch = collate(data.items(batches[k]), tokenizer.pad_token_id)
            seen += int(batch["attention_mask"].sum())
            if k == 0:
                after_first = status()["RssAnon"]  # torch's first tensors: a one-time cost, not the data's
        assert seen == tokens
    seconds = time.perf_counter() - started
    after = status()
    growth = after["RssAnon"] - before["RssAnon"]
    print(json.dumps({"mode": mode, "tokens": tokens, "seconds": seconds, "anon_growth": growth,
                      "while_reading": after["RssAnon"] - after_first if mode == "mapped" else None,
                      "peak_rss": after["VmHWM"], "file_rss": after["RssFile"]}))


def run(mode: str, pool: Path, length: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--pool", str(pool), "--max-seq-length",
                          str(length)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--child")
    parser.add_argument("--pool")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.pool, args.max_seq_length)
        return
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.jsonl"
        write_pool(pool, args.n)
        env = {**os.environ, "POISE_CACHE": str(Path(tmp) / "cache"), "POISE_TOKENIZE_PROCESSES": str(args.processes)}
        rows = [run(mode, pool, args.max_seq_length, env) for mode in ("lists", "build", "mapped")]
        print(f"pool: {args.n:,} conversations, {rows[0]['tokens']:,} tokens (max_seq_length {args.max_seq_length}); "
              f"{args.processes} tokenising processes; {os.cpu_count()} CPUs\n")
        print("| path | seconds | private memory growth | per token | peak RSS | per token |")
        print("|---|---|---|---|---|---|")
        mapped = rows[-1]
        for row in rows:
            tokens = row["tokens"]
            print(f"| {row['mode']} | {row['seconds']:.1f} | {row['anon_growth'] / 2**20:,.0f} MiB | "
                  f"{row['anon_growth'] / tokens:.1f} B | {row['peak_rss'] / 2**20:,.0f} MiB | "
                  f"{row['peak_rss'] / tokens:.1f} B |")
        print(f"\nmapped, from the first batch read to the last: {mapped['while_reading'] / 2**20:+,.1f} MiB "
              f"({mapped['while_reading'] / mapped['tokens']:+.2f} B per token)")


if __name__ == "__main__":
    main()
