"""poise's embedded demo data: a pool, validation and held-out sets for six capabilities, built offline.

No PyPI package carries a real instruction pool, but `reasoning-gym` (Apache-2.0) ships procedural
generators of checkable tasks with exact answers. From its families this module builds

- `pool.jsonl`: tulu `messages` rows (user: the generator's question, assistant: its answer), an equal
  share per capability, plus 30% from families that serve none of the six (kinship puzzles, cube
  rotations): material a good selection leaves out;
- `validation/<capability>.jsonl`: the same format, the same number of rows per capability;
- `heldout/<capability>.jsonl`: `{"id", "prompt", "answer"}` items for `poise evaluate`;
- `sources.json`: where every family comes from, its licence, and the counts.

Held-out, validation and pool items are disjoint (no prompt appears twice, whitespace-normalised), and
everything is deterministic from `seed`. Answers are short (a number, a word, a date), so the evaluation's
exact match of a 16-32-token greedy generation is meaningful, and the examples are short enough for a CPU.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.io import atomic_write_json, atomic_write_lines

#: capability -> the reasoning-gym families that make it (validation and held-out items draw on all of them).
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "arithmetic": ("basic_arithmetic", "chain_sum"),
    "algebra": ("simple_equations",),
    "logic": ("syllogism",),
    "strings": ("spell_backward", "letter_counting"),
    "sequences": ("number_sequence",),
    "calendar": ("calendar_arithmetic",),
}
#: Families in the pool that serve none of the capabilities.
UNRELATED: tuple[str, ...] = ("family_relationships", "color_cube_rotation")
UNRELATED_SHARE = 0.3
PACKAGE = "reasoning-gym"
#: What each family embeds besides reasoning-gym's own code (checked for the licence notes in docs/data.md).
FAMILY_DATA = {
    "spell_backward": "reasoning-gym's English word list (words3to10.txt)",
    "letter_counting": "sentences of Jules Verne's 'In the Year 2889' (public domain, via Project Gutenberg)",
}


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise PoiseError("the demo data needs reasoning-gym: pip install 'poise[demo]'") from None
    return reasoning_gym


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def _draw(rg: Any, family: str, count: int, seed: int, taken: set[str]) -> list[tuple[str, str]]:
    """`count` (question, answer) pairs of `family` whose questions are not in `taken` (which grows)."""
    items: list[tuple[str, str]] = []
    attempt = 0
    while len(items) < count:
        if attempt == 8:
            raise PoiseError(f"reasoning-gym family {family!r} gave only {len(items)} distinct items of the "
                             f"{count} asked; use a smaller size")
        family_seed = (seed * 1_000_003 + zlib.crc32(family.encode()) + attempt * 7_919) % (2**31)
        dataset = rg.create_dataset(family, size=max(16, 2 * (count - len(items))), seed=family_seed)
        for entry in dataset:
            question, answer = str(entry["question"]).strip(), str(entry["answer"]).strip()
            key = _normal(question)
            if not question or not answer or key in taken:
                continue
            taken.add(key)
            items.append((question, answer))
            if len(items) == count:
                break
        attempt += 1
    return items


def _split(total: int, parts: Sequence[str]) -> dict[str, int]:
    """`total` spread over `parts` as evenly as possible (the first ones get the remainder)."""
    base, extra = divmod(total, len(parts))
    return {part: base + (1 if k < extra else 0) for k, part in enumerate(parts)}


def _chat(item_id: str, question: str, answer: str, dataset: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"id": item_id}
    if dataset:
        row["dataset"] = dataset
    row["messages"] = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return row


def write_demo_data(out: str | Path, pool_size: int = 300, validation_per_task: int = 8, heldout_per_task: int = 20,
                    seed: int = 0) -> dict[str, Any]:
    """Write `pool.jsonl`, `validation/`, `heldout/` and `sources.json` into `out`; returns the summary."""
    n_capabilities = len(CAPABILITIES)
    if pool_size < 5 * n_capabilities:
        raise PoiseError(f"pool_size {pool_size}: at least {5 * n_capabilities} (5 per capability)")
    if validation_per_task < 1 or heldout_per_task < 1:
        raise PoiseError("validation_per_task and heldout_per_task must be at least 1")
    rg = _reasoning_gym()
    out = Path(out)
    unrelated_total = round(pool_size * UNRELATED_SHARE)
    per_capability = _split(pool_size - unrelated_total, list(CAPABILITIES))

    pool: list[dict[str, Any]] = []
    validation: dict[str, list[dict[str, Any]]] = {}
    heldout: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for capability, families in CAPABILITIES.items():
        held = _split(heldout_per_task, families)
        val = _split(validation_per_task, families)
        train = _split(per_capability[capability], families)
        validation[capability], heldout[capability] = [], []
        for family in families:
            taken: set[str] = set()
            items = _draw(rg, family, held[family] + val[family] + train[family], seed, taken)
            for k, (question, answer) in enumerate(items[:held[family]]):
                heldout[capability].append({"id": f"{family}-h{k}", "prompt": question, "answer": answer})
            start = held[family]
            for k, (question, answer) in enumerate(items[start:start + val[family]]):
                validation[capability].append(_chat(f"{family}-v{k}", question, answer))
            start += val[family]
            for k, (question, answer) in enumerate(items[start:]):
                pool.append(_chat(f"{family}-{k}", question, answer, dataset=f"reasoning_gym/{family}"))
            counts[family] = {"capability": capability, "pool": train[family], "validation": val[family],  # type: ignore[dict-item]
                              "heldout": held[family]}
    for family, n in _split(unrelated_total, list(UNRELATED)).items():
        items = _draw(rg, family, n, seed, set())
        pool += [_chat(f"{family}-{k}", q, a, dataset=f"reasoning_gym/{family}") for k, (q, a) in enumerate(items)]
        counts[family] = {"capability": None, "pool": n, "validation": 0, "heldout": 0}  # type: ignore[dict-item]
    random.Random(seed).shuffle(pool)

    import importlib.metadata

    version = importlib.metadata.version(PACKAGE)
    summary: dict[str, Any] = {
        "generator": "poise.data.demo", "seed": seed, "pool_size": pool_size,
        "validation_per_task": validation_per_task, "heldout_per_task": heldout_per_task,
        "capabilities": {c: list(f) for c, f in CAPABILITIES.items()}, "unrelated": list(UNRELATED),
        "sources": {"package": f"{PACKAGE}=={version}", "licence": "Apache-2.0",
                    "url": "https://github.com/open-thought/reasoning-gym", "embedded_data": FAMILY_DATA},
        "counts": counts,
    }
    atomic_write_lines(out / "pool.jsonl", (json.dumps(row) for row in pool))
    for capability in CAPABILITIES:
        atomic_write_lines(out / "validation" / f"{capability}.jsonl",
                           (json.dumps(row) for row in validation[capability]))
        atomic_write_lines(out / "heldout" / f"{capability}.jsonl", (json.dumps(row) for row in heldout[capability]))
    atomic_write_json(out / "sources.json", summary)
    return summary
