"""The text shown beside the picks: each selection's first picks with a preview of the pool example, and the
validation example each pick served (read from the validation files as `poise features` reads them), so the
page shows why a row was picked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.files import SELECTED_FILE, SELECTION_FILE
from poise.selection import Selection

#: The first-picks table of each selection shows this many picks.
PICKS_SHOWN = 10
#: Example text in the first-picks table is cut to this many characters.
PREVIEW_CHARS = 120


def _text_of(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) else p for p in content]
        text = " ".join(p for p in parts if isinstance(p, str))
        return text or None
    return None


def preview_text(example: Any, limit: int = PREVIEW_CHARS) -> str | None:
    """The first user message of a pool example (tulu `messages`, sharegpt `conversations`, alpaca
    `instruction`/`input`, `prompt`, `text`), on one line and cut to `limit` characters; None when
    the example has no text to show (e.g. it is pre-tokenized)."""
    if not isinstance(example, dict):
        return None
    text = None
    turns = example.get("messages") or example.get("conversations")
    if isinstance(turns, list):
        dicts = [t for t in turns if isinstance(t, dict)]
        users = [t for t in dicts if (t.get("role") or t.get("from")) in ("user", "human")]
        for turn in users or dicts[:1]:
            text = _text_of(turn.get("content", turn.get("value")))
            if text:
                break
    if not text and isinstance(example.get("instruction"), str):
        extra = example.get("input")
        text = example["instruction"] + (f" {extra}" if isinstance(extra, str) and extra else "")
    for key in ("prompt", "text"):
        if not text and isinstance(example.get(key), str):
            text = example[key]
    if not text:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _first_lines(path: Path, count: int) -> list[str]:
    lines: list[str] = []
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
                if len(lines) == count:
                    break
    return lines


def _previews(folder: str | os.PathLike | None, trace: Sequence[dict[str, Any]]) -> list[str | None]:
    """The example text of the given picks from `selected.jsonl` in the selection folder.

    The file holds the pool lines in pick order. Nothing is shown (all None) when there is no such
    file, it cannot be read, or a line's id disagrees with the pick's id (a file of another selection).
    """
    nothing: list[str | None] = [None] * len(trace)
    if not folder or not trace:
        return nothing
    path = Path(folder)
    if path.name == SELECTION_FILE:
        path = path.parent
    path = path / SELECTED_FILE
    try:
        if not path.is_file():
            return nothing
        lines = _first_lines(path, len(trace))
    except (OSError, UnicodeDecodeError):
        return nothing
    texts: list[str | None] = []
    for entry, line in zip(trace, lines, strict=False):
        try:
            example = json.loads(line)
        except json.JSONDecodeError:
            texts.append(None)
            continue
        if isinstance(example, dict) and "id" in example and entry.get("id") is not None \
                and str(example["id"]) != str(entry["id"]):
            return nothing
        texts.append(preview_text(example))
    return texts + [None] * (len(trace) - len(texts))


def _recorded_folder(selection: Selection) -> str | None:
    """The folder `poise select` wrote the selection to, as recorded in its settings."""
    settings = selection.arguments.get("settings") or {}
    out = settings.get("out")
    return str(out) if out else None


def first_picks(
    selection: Selection, limit: int = PICKS_SHOWN, folder: str | os.PathLike | None = None,
    validation: ValidationTexts | None = None,
) -> list[dict[str, Any]]:
    """The first `limit` picks of a selection from its trace: `rank` (0-based), `row`, `id`, `task`,
    `column_id` (the validation example the pick served; None for random), `score` (the BIDS gain or
    the rule's score; None when there is none) and `text` (a preview of the example from the folder's
    selected.jsonl, else None). `folder` defaults to the folder the selection records. With
    `validation`, each pick also gets `served_text`: the served validation example's first user
    message (None when the pick serves none or its id is not in the validation files)."""
    trace = list(selection.trace[:limit])
    if not trace:  # a selection without a trace: its indices alone
        trace = [{"rank": k, "row": int(row)} for k, row in enumerate(selection.indices[:limit].tolist())]
    texts = _previews(folder if folder is not None else _recorded_folder(selection), trace)
    rows = [
        {
            "rank": entry.get("rank", k),
            "row": entry.get("row"),
            "id": entry.get("id"),
            "task": entry.get("task"),
            "column_id": entry.get("column_id"),
            "score": entry.get("score"),
            "text": text,
        }
        for k, (entry, text) in enumerate(zip(trace, texts, strict=True))
    ]
    if validation is not None:
        for row in rows:
            row["served_text"] = validation.get(row["column_id"], row["task"])
    return rows


@dataclass
class ValidationTexts:
    """The first user message of every validation example, by id (and by task and id, for ids that
    repeat across files). Only shown on the page: an id that is not here shows as a dash."""

    by_task: dict[tuple[str, str], str | None] = field(default_factory=dict)
    by_id: dict[str, str | None] = field(default_factory=dict)

    def get(self, column_id: Any, task: Any = None) -> str | None:
        if column_id is None:
            return None
        key = str(column_id)
        if task is not None and (str(task), key) in self.by_task:
            return self.by_task[(str(task), key)]
        return self.by_id.get(key)

    def __len__(self) -> int:
        return len(self.by_id)


def read_validation(paths: Sequence[str | os.PathLike]) -> ValidationTexts:
    """The validation examples' texts from files or folders of validation data (one JSONL per task),
    read as `poise features` reads them (`poise.data.formats.read_examples`), so their ids are the
    attribution matrix's column ids: the row's "id", else "<file stem>/<index>" in a folder. A missing or
    unreadable path is one PoiseError line naming it."""
    from poise.data.formats import read_examples

    texts = ValidationTexts()
    for path in paths:
        p = Path(path)
        try:
            if not p.exists():  # checked here: read_examples would take "a/b" for a hub data set
                raise PoiseError(f"{path}: no such file or folder")
            examples = read_examples(p, task=p.stem if p.is_file() else None)
        except PoiseError as exc:
            raise PoiseError(f"validation: {exc}") from None
        except OSError as exc:
            raise PoiseError(f"validation: {path}: cannot read ({exc.strerror or exc})") from None
        for example in examples:
            text = preview_text({"messages": example.messages}) if example.messages else None
            texts.by_task.setdefault((str(example.task), example.id), text)
            texts.by_id.setdefault(example.id, text)
    return texts
