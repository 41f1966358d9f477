"""Writes the quickstart data (pool.jsonl, validation/<task>.jsonl): small, deterministic, written by poise.

Three kinds of instruction: arithmetic word problems, string manipulation, and unit conversion (which
helps neither validation task). Run `python examples/quickstart/make_data.py` to rewrite the files; the
committed files are its output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
ITEMS = ["apples", "books", "coins", "stamps", "pencils", "marbles", "cards", "shells"]
WORDS = ["river", "planet", "garden", "window", "silver", "orange", "puzzle", "lantern", "meadow", "rocket",
         "candle", "harbor", "violet", "thunder", "pebble", "falcon"]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 30), rng.randint(1, 9)
    question = f"{name} has {a} {item}, buys {b} more and gives away {c}. How many {item} does {name} have now?"
    answer = f"{a} + {b} = {a + b}, and {a + b} - {c} = {a + b - c}. {name} has {a + b - c} {item}."
    return question, answer


def strings(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        return f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."
    if kind == 1:
        return f"Write the word '{word}' in capital letters.", f"'{word.upper()}'"
    return f"How many letters does the word '{word}' have?", f"'{word}' has {len(word)} letters."


def conversion(rng: random.Random) -> tuple[str, str]:
    km = rng.randint(2, 60)
    if rng.random() < 0.5:
        return f"Convert {km} kilometres to metres.", f"{km} km = {km * 1000} m."
    return f"How many minutes are there in {km} hours?", f"{km} hours = {km * 60} minutes."


def chat(question: str, answer: str, i: str) -> dict:
    return {"id": i, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(0)
    makers = {"arithmetic": arithmetic, "strings": strings, "conversion": conversion}
    pool, seen = [], set()
    for i in range(40):
        kind = ["arithmetic", "strings", "conversion"][i % 3]
        q, a = makers[kind](rng)
        while q in seen:
            q, a = makers[kind](rng)
        seen.add(q)
        pool.append(chat(q, a, f"pool-{i:02d}-{kind}"))
    (HERE / "pool.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pool))
    folder = HERE / "validation"
    folder.mkdir(exist_ok=True)
    for task in ("arithmetic", "strings"):
        rows = []
        while len(rows) < 3:
            q, a = makers[task](rng)
            if q not in seen:
                seen.add(q)
                rows.append(chat(q, a, f"{task}-{len(rows)}"))
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
