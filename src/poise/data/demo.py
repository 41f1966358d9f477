"""poise's embedded demo data: a pool, validation and held-out sets for six capabilities, built offline.

Why: poise needs a real multi-capability data set that tests, CI and a laptop can build without the
Hugging Face hub. No PyPI package carries a real instruction pool, but `reasoning-gym` (Apache-2.0) ships
procedural generators of checkable tasks with exact, short answers. From its families this module builds

- `pool.jsonl`: tulu/open-instruct `messages` rows (user: the generator's question, assistant: its answer),
  `dataset` naming the family (`reasoning_gym/<family>`); 70% split evenly over the capabilities, 30% from
  families that serve none of them (kinship puzzles, cube rotations): material a good selection leaves out;
- `validation/<capability>.jsonl`: the same format, the same number of rows per capability;
- `heldout/<capability>.jsonl`: `{"id", "prompt", "answer"}` items for `poise evaluate`;
- `sources.json`: where every family comes from, its licence, the generator settings and the counts.

Held-out, validation and pool items are disjoint (no question appears twice anywhere, compared
whitespace-normalised and lower-cased), and the same arguments write the same bytes. Held-out and
validation items are drawn before the pool, so they do not change with `pool_size`. Answers are a number,
a word or a date, so exact match of a short greedy generation is meaningful, and every example is a few
dozen tokens, short enough for a CPU. reasoning-gym is imported only when the data is built.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from poise.errors import PoiseError, warn
from poise.io import atomic_write_json, atomic_write_lines

#: capability -> the reasoning-gym families that make it (every split draws on all of them).
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
#: Generator settings that differ from reasoning-gym's defaults (the rest are the package's defaults).
FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    # the default (up to 6 terms of up to 4 digits) gives answers like -205276174100999: 2-4 terms of 1-2 digits
    "basic_arithmetic": {"min_terms": 2, "max_terms": 4, "max_digits": 2},
    "chain_sum": {"max_terms": 5, "max_digits": 3},
    # complexity 2-3 may square a term 8-16 times per step: one item took two minutes; 1 keeps every item < 10 ms
    "number_sequence": {"max_complexity": 1},
}
PACKAGE = "reasoning-gym"
#: What each family embeds besides reasoning-gym's own code (the licence notes are in docs/data.md).
FAMILY_DATA = {
    "spell_backward": "reasoning-gym's English word list (data/words3to10.txt, in the Apache-2.0 package)",
    "letter_counting": "spans of Jules Verne's 'In the Year 2889' (public domain; data/in_the_year_2889.txt, the "
                       "Project Gutenberg edition; spans from its licence header and footer are left out)",
}
#: A family is exhausted after this many draws in a row that give no new item.
PATIENCE = 2000
MISSING = "the demo data needs reasoning-gym: pip install 'poise[demo]'"

Item = tuple[str, str]


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise PoiseError(MISSING) from None
    return reasoning_gym


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def _gutenberg_body() -> str:
    """The words of the novel in letter_counting's text, without Project Gutenberg's header and licence."""
    import re

    from reasoning_gym.data import read_data_file

    text = read_data_file("in_the_year_2889.txt")
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start < 0 or end < start:
        raise PoiseError("reasoning-gym's in_the_year_2889.txt has no Project Gutenberg markers; "
                         f"install the pinned version: pip install 'poise[demo]' ({PACKAGE})")
    body = text[text.index("\n", start) + 1:end]
    return " " + " ".join(w for w in re.findall(r"\b\w+\b", body) if w.isalnum()) + " "


def _keep(family: str) -> Callable[[dict[str, Any]], bool]:
    """Which generated entries a family may contribute (letter_counting: spans of the novel only)."""
    if family == "letter_counting":
        body = _gutenberg_body()
        return lambda entry: " " + " ".join(entry["metadata"]["span"]) + " " in body
    return lambda entry: True


class _Stream:
    """A family's distinct items in a fixed order: reasoning-gym's item k is a pure function of (seed + k)."""

    def __init__(self, rg: Any, family: str, seed: int, taken: set[str]) -> None:
        self.family = family
        family_seed = (seed * 1_000_003 + zlib.crc32(family.encode())) % (2**31)
        try:
            self.dataset = rg.create_dataset(family, size=1, seed=family_seed, **FAMILY_CONFIG.get(family, {}))
        except (AttributeError, TypeError, ValueError, AssertionError) as exc:
            raise PoiseError(f"reasoning-gym cannot make family {family!r} ({exc}); install the pinned version: "
                             "pip install 'poise[demo]'") from None
        self.keep = _keep(family)
        self.taken = taken  # shared by every stream: no question twice anywhere
        self.index = 0
        self.exhausted = False

    def take(self, count: int) -> list[Item]:
        """Up to `count` new items; fewer (and `exhausted`) when PATIENCE draws in a row give nothing new."""
        items: list[Item] = []
        misses = 0
        while len(items) < count and not self.exhausted:
            entry = self.dataset[self.index]
            self.index += 1
            question, answer = str(entry["question"]).strip(), str(entry["answer"]).strip()
            key = _normal(question)
            if question and answer and key not in self.taken and self.keep(entry):
                self.taken.add(key)
                items.append((question, answer))
                misses = 0
            else:
                misses += 1
                self.exhausted = misses >= PATIENCE
        return items


def _split(total: int, parts: Sequence[str]) -> dict[str, int]:
    """`total` spread over `parts` as evenly as possible (the first ones get the remainder)."""
    base, extra = divmod(total, len(parts))
    return {part: base + (1 if k < extra else 0) for k, part in enumerate(parts)}


def _fill(streams: dict[str, _Stream], quota: dict[str, int], shortfalls: list[str], what: str
          ) -> tuple[dict[str, list[Item]], int]:
    """Each family's quota of items; a family that runs short passes the rest to the others that still give.

    Returns the items per family and how many could not be drawn at all; each family that ran short is a line
    of `shortfalls`."""
    got: dict[str, list[Item]] = {}
    owed = 0
    for family, count in quota.items():  # first each family its own share, then the deficits round the others
        got[family] = streams[family].take(count)
        if len(got[family]) < count:
            shortfalls.append(f"{what}: {family} ran out of distinct items {count - len(got[family])} short of "
                              f"its {count}")
            owed += count - len(got[family])
    while owed:
        open_ = [f for f in quota if not streams[f].exhausted]
        if not open_:
            break
        for family, share in _split(owed, open_).items():
            more = streams[family].take(share)
            got[family] += more
            owed -= len(more)
    return got, owed


def _chat(item_id: str, question: str, answer: str, dataset: str) -> dict[str, Any]:
    return {"id": item_id, "dataset": dataset,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_demo_data(out: str | Path, pool_size: int = 300, validation_per_task: int = 8, heldout_per_task: int = 20,
                    seed: int = 0) -> dict[str, Any]:
    """Write `pool.jsonl`, `validation/`, `heldout/` and `sources.json` into `out`; returns the summary.

    The summary (also `sources.json`) holds the arguments, `capabilities` (capability -> families),
    `unrelated` (the families that serve none), `sources`, `counts` (family -> {capability, pool,
    validation, heldout}; capability None for the unrelated families) and `shortfalls` (families that ran
    out of distinct items and what was drawn instead; empty as a rule)."""
    n_capabilities = len(CAPABILITIES)
    for name, value in (("pool_size", pool_size), ("validation_per_task", validation_per_task),
                        ("heldout_per_task", heldout_per_task), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise PoiseError(f"{name}: expected a whole number, got {value!r}")
    if pool_size < 5 * n_capabilities:
        raise PoiseError(f"pool_size {pool_size}: at least {5 * n_capabilities} (5 per capability)")
    if validation_per_task < 1 or heldout_per_task < 1:
        raise PoiseError("validation_per_task and heldout_per_task must be at least 1")
    out = Path(out)
    for split in ("validation", "heldout"):  # poise reads every file there: another one would be a capability
        stale = sorted(p.name for p in (out / split).glob("*.jsonl") if p.stem not in CAPABILITIES)
        if stale:
            raise PoiseError(f"{out / split} already holds {', '.join(stale)}, which the demo data would not "
                             "replace; choose an empty folder")
    rg = _reasoning_gym()
    taken: set[str] = set()
    streams = {family: _Stream(rg, family, seed, taken)
               for family in [f for fs in CAPABILITIES.values() for f in fs] + list(UNRELATED)}
    shortfalls: list[str] = []

    # held-out, then validation, then the pool: the evaluation items do not depend on pool_size
    heldout: dict[str, list[dict[str, Any]]] = {}
    validation: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, Any]] = {}
    for capability, families in CAPABILITIES.items():
        for family in families:
            counts[family] = {"capability": capability, "pool": 0, "validation": 0, "heldout": 0}
        cap_streams = {f: streams[f] for f in families}
        for split, size, rows in (("heldout", heldout_per_task, heldout),
                                  ("validation", validation_per_task, validation)):
            got, owed = _fill(cap_streams, _split(size, families), shortfalls, f"{split} {capability}")
            if owed:
                raise PoiseError(f"{split}_per_task {size}: the {capability} families ({', '.join(families)}) give "
                                 f"only {size - owed} more distinct items; use a smaller size")
            rows[capability] = []
            for family, items in got.items():
                counts[family][split] = len(items)
                for k, (q, a) in enumerate(items):
                    rows[capability].append(
                        {"id": f"{family}-h{k}", "prompt": q, "answer": a} if split == "heldout"
                        else _chat(f"{family}-v{k}", q, a, f"reasoning_gym/{family}"))

    unrelated_total = round(pool_size * UNRELATED_SHARE)
    per_capability = _split(pool_size - unrelated_total, list(CAPABILITIES))
    drawn: dict[str, list[Item]] = {}
    deficit = 0
    for capability, families in CAPABILITIES.items():
        got, owed = _fill({f: streams[f] for f in families}, _split(per_capability[capability], families),
                          shortfalls, f"pool {capability}")
        drawn.update(got)
        if owed:
            shortfalls.append(f"pool {capability}: {owed} of its {per_capability[capability]} items drawn from the "
                              "other capabilities instead")
            deficit += owed
    if deficit:  # the capabilities that still have items make up for the ones that ran out
        open_ = [f for fs in CAPABILITIES.values() for f in fs if not streams[f].exhausted]
        got, owed = _fill({f: streams[f] for f in open_}, _split(deficit, open_) if open_ else {}, shortfalls,
                          "pool (making up)")
        for family, items in got.items():
            drawn[family] += items
        if owed or not open_:
            available = pool_size - unrelated_total - (owed if open_ else deficit)
            raise PoiseError(f"pool_size {pool_size}: the capability families give only {available} distinct "
                             "items; use a smaller pool_size")
    got, owed = _fill({f: streams[f] for f in UNRELATED}, _split(unrelated_total, list(UNRELATED)), shortfalls,
                      "pool (unrelated)")
    if owed:
        raise PoiseError(f"pool_size {pool_size}: the unrelated families give only {unrelated_total - owed} "
                         "distinct items; use a smaller pool_size")
    drawn.update(got)
    for family in UNRELATED:
        counts[family] = {"capability": None, "pool": 0, "validation": 0, "heldout": 0}
    for family, items in drawn.items():
        counts[family]["pool"] = len(items)
    for line in shortfalls:
        warn(f"demo data: {line}")

    pool = [_chat(f"{family}-{k}", q, a, f"reasoning_gym/{family}")
            for family, items in drawn.items() for k, (q, a) in enumerate(items)]
    random.Random(seed).shuffle(pool)

    import importlib.metadata

    version = importlib.metadata.version(PACKAGE)
    summary: dict[str, Any] = {
        "generator": "poise.data.demo", "seed": seed, "pool_size": pool_size,
        "validation_per_task": validation_per_task, "heldout_per_task": heldout_per_task,
        "unrelated_share": UNRELATED_SHARE,
        "capabilities": {c: list(f) for c, f in CAPABILITIES.items()}, "unrelated": list(UNRELATED),
        "sources": {"package": f"{PACKAGE}=={version}", "licence": "Apache-2.0",
                    "url": "https://github.com/open-thought/reasoning-gym", "settings": FAMILY_CONFIG,
                    "embedded_data": FAMILY_DATA},
        "counts": counts,
        "shortfalls": shortfalls,
    }
    atomic_write_lines(out / "pool.jsonl", (json.dumps(row, ensure_ascii=False) for row in pool))
    for capability in CAPABILITIES:
        atomic_write_lines(out / "validation" / f"{capability}.jsonl",
                           (json.dumps(row, ensure_ascii=False) for row in validation[capability]))
        atomic_write_lines(out / "heldout" / f"{capability}.jsonl",
                           (json.dumps(row, ensure_ascii=False) for row in heldout[capability]))
    atomic_write_json(out / "sources.json", summary)
    return summary
