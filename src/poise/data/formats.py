"""Read instruction data in every format users hand to poise and normalise it to `Example`s.

The pool and the validation sets arrive as JSONL, a JSON list, parquet, a `datasets` folder written by
`save_to_disk`, a folder of per-task .jsonl/.json files, or a Hugging Face Hub dataset id
(`org/name[@config][:split]`, loaded with `datasets.load_dataset`); each row is in one of the common chat formats
(tulu/open-instruct `messages`, alpaca, sharegpt, prompt/completion) or already tokenized. Everything
downstream (templates, features, selection) sees one shape: an `Example` with a unique id, its messages
as `{"role": "system"|"user"|"assistant", "content": str}` (or given token ids), an optional task and
the place it came from. Bad input stops here with one line naming the file, the line (or row) and the field,
so that no later stage has to second-guess the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.io import read_jsonl

IGNORE_INDEX = -100
"""The label of a token that is not trained on (PyTorch's cross-entropy `ignore_index`)."""

ROLES = ("system", "user", "assistant")
"""The normalised message roles."""

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
"""sharegpt `from` values and the role each one becomes."""

ROW_FORMATS = (
    "messages (tulu/open-instruct)",
    "conversations (sharegpt)",
    "instruction/input/output (alpaca)",
    "prompt/completion",
    "input_ids/labels (pre-tokenized)",
)
"""The accepted row formats, as named in error messages."""

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files that `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write into their folder."""

HUB_DATASET = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<config>[\w.-]+))?(?::(?P<split>[\w.-]+))?")
"""A Hugging Face Hub dataset: `org/name`, optionally `@config` and `:split` (split defaults to train)."""

NOT_HUB_SUFFIXES = (*FILE_SUFFIXES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar",
                    ".yaml", ".yml")
"""A name ending in one of these is a (missing) file, never a hub id (hub names may hold dots: `OpenHermes-2.5`)."""


@dataclass
class Example:
    """One normalised training or validation example.

    Exactly one of `messages` (a conversation to render with a template) and `input_ids` (given tokens,
    with `labels` = -100 where not trained on) is set. `where` is "path:line" for JSONL rows and
    "path[row]" (0-based) for JSON lists, parquet and `datasets` rows; every message names it.
    """

    id: str
    messages: list[dict] | None
    input_ids: list[int] | None
    labels: list[int] | None
    task: str | None
    where: str
    dataset: str | None = None  # the tulu/open-instruct `dataset` field, kept for reports


def read_examples(path: str | os.PathLike, task: str | None = None) -> list[Example]:
    """Read every example of a file or folder, normalised; ids are unique across the result.

    `path` is a .jsonl, .json (a list of objects) or .parquet file, a folder written by `datasets`'
    `save_to_disk`, or a folder of .jsonl/.json/.parquet files, one per task (each file's examples get the file
    stem as task, and `<stem>/<index>` as id when the row has none). A row's own `task` field wins
    over the file stem, which wins over the `task` argument.

    A string that is no existing path but a Hugging Face Hub dataset id, `org/name[@config][:split]` (exactly
    one "/", no leading "." "/" "~", no file suffix; split defaults to train), e.g.
    `allenai/tulu-v2-sft-mixture` or `HuggingFaceH4/ultrachat_200k:train_sft`, is loaded with
    `datasets.load_dataset` (downloaded once into the datasets cache, HF_HOME / HF_DATASETS_CACHE; with
    HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 from that cache only); its rows are read like a `datasets`
    folder's and named "<the argument>[row]".
    """
    examples = list(iter_examples(path, task))
    _check_unique_ids(examples)
    return examples


def iter_examples(path: str | os.PathLike, task: str | None = None) -> Iterator[Example]:
    """The examples of `read_examples`, one at a time (rows are parsed as they are read, so a pool of millions
    is never held as Python objects); ids are not checked for uniqueness here. An empty file or data set is an
    error, as in `read_examples`."""
    hub = _hub_dataset(path)
    if hub is not None:
        yield from _nonempty(_parse_rows(_hub_rows(str(path), *hub), task), f"{path}: empty dataset (no examples)")
        return
    path = Path(path)
    if path.is_dir():
        if any((path / marker).exists() for marker in DATASETS_MARKERS):
            yield from _parse_rows(_datasets_rows(path), task)
        else:
            yield from _iter_folder(path, task)
    elif path.exists():
        yield from _nonempty(_parse_rows(_file_rows(path), task), f"{path}: empty file (no examples)")
    else:
        raise PoiseError(f"{path}: no such file or folder")


def _nonempty(examples: Iterator[Example], message: str) -> Iterator[Example]:
    empty = True
    for example in examples:
        empty = False
        yield example
    if empty:
        raise PoiseError(message)


def source_digest(path: str | os.PathLike) -> str:
    """A digest of what `iter_examples(path)` reads: the bytes of every file it would read (a folder's files with
    their names), or, for a Hub data set, its id and `datasets`' own fingerprint of the loaded data. Files are
    hashed once per (path, size, modification time) in this process."""
    hub = _hub_dataset(path)
    if hub is not None:
        return hashlib.sha256(f"hub|{path}|{_load_hub(str(path), *hub)._fingerprint}".encode()).hexdigest()
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256(b"folder")
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{file.relative_to(path)}|{_file_digest(file)}".encode())
        return digest.hexdigest()
    if path.exists():
        return _file_digest(path)
    raise PoiseError(f"{path}: no such file or folder")


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


# ------------------------------------------------------------------------------------ sources
Row = tuple[str, int, Any]
"""(where, 0-based index of the example in its file, the row object)."""


def _iter_folder(folder: Path, task: str | None) -> Iterator[Example]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in FILE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise PoiseError(f"{folder}: no .jsonl, .json or .parquet files in this folder (and it is not a datasets "
                         "folder written by save_to_disk)")
    for file in files:
        yield from _nonempty(_parse_rows(_file_rows(file), file.stem, id_prefix=f"{file.stem}/"),
                             f"{file}: empty file (no examples)")


def _file_rows(path: Path) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for index, (number, obj) in enumerate(read_jsonl(path)):
            yield f"{path}:{number}", index, obj
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise PoiseError(f"{path}: unsupported file type '{path.suffix}' (expected .jsonl, .json, .parquet, "
                         "or a datasets folder written by save_to_disk)")


def _json_rows(path: Path) -> Iterator[Row]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PoiseError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise PoiseError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a .json file holding JSON lines
            for index, (number, obj) in enumerate(read_jsonl(path)):
                yield f"{path}:{number}", index, obj
            return
        raise PoiseError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        data = [data] if _looks_like_row(data) else data
    if not isinstance(data, list):
        raise PoiseError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, obj in enumerate(data):
        yield f"{path}[{index}]", index, obj


def _looks_like_row(obj: dict) -> bool:
    return any(key in obj for key in ("messages", "conversations", "instruction", "prompt", "input_ids"))


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) on non-parquet bytes
        raise PoiseError(f"{path}: cannot read as parquet ({_one_line(exc)})") from None
    index = 0
    for batch in handle.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            yield f"{path}[{index}]", index, obj
            index += 1


def _hub_dataset(path: str | os.PathLike) -> tuple[str, str | None, str | None] | None:
    """(repo, config, split) when `path` is a string naming no existing path but a hub dataset, else None."""
    if not isinstance(path, str) or os.path.lexists(path):
        return None
    match = HUB_DATASET.fullmatch(path)
    if match is None or Path(match["repo"]).suffix.lower() in NOT_HUB_SUFFIXES:
        return None
    return match["repo"], match["config"], match["split"]


def _hub_offline() -> bool:
    import datasets

    now = [os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return bool(datasets.config.HF_HUB_OFFLINE) or any(v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in now)


def _hub_rows(spec: str, repo: str, config: str | None, split: str | None) -> Iterator[Row]:
    yield from _dataset_rows(_load_hub(spec, repo, config, split), spec)


def _load_hub(spec: str, repo: str, config: str | None, split: str | None) -> Any:
    """The Hub data set `spec` as a memory-mapped `datasets.Dataset` (downloaded once into the datasets cache)."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    org, name = repo.split("/")
    offline = _hub_offline()
    if not offline and not (cache / f"{org}___{camelcase_to_snakecase(name)}").exists():
        print(f"poise: downloading dataset {repo} from the Hugging Face Hub into {cache} (once: later runs use the "
              "cache; HF_HOME or HF_DATASETS_CACHE moves it)", file=sys.stderr, flush=True)
    try:
        data = datasets.load_dataset(repo, config, split=split or "train")
    except datasets.exceptions.DatasetNotFoundError as exc:  # also gated or private datasets
        raise PoiseError(f"{spec}: no such file or folder, nor a dataset on the Hugging Face Hub "
                         f"({_one_line(exc)})") from None
    except ConnectionError as exc:  # OfflineModeIsEnabled is one, so is a network that is down
        if offline:
            raise PoiseError(
                f"{spec}: no such file or folder, and the Hugging Face Hub dataset {repo} is not in the local "
                f"datasets cache ({cache}) while offline mode is on (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1); "
                "load it once on a machine with internet (the same --data) and copy the cache, or pass a local "
                "file or folder"
            ) from None
        root = exc
        while root.__cause__ is not None:  # datasets wraps huggingface_hub's error, which wraps the network's
            root = root.__cause__
        raise PoiseError(f"{spec}: no such file or folder, and the Hugging Face Hub cannot be reached to load it as "
                         f"a dataset ({type(root).__name__}: {_one_line(root)}); check the connection, or pass a "
                         "local file") from None
    except ValueError as exc:  # an unknown split or config, a config missing for a multi-config dataset
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        hint = f" (choose with {repo}@CONFIG:SPLIT)" if re.search("split|config", reason, re.IGNORECASE) else ""
        raise PoiseError(f"{spec}: {reason}{hint}") from None
    except Exception as exc:
        raise PoiseError(f"{spec}: cannot load the Hugging Face Hub dataset ({type(exc).__name__}: "
                         f"{_one_line(exc)})") from None
    return data


def _dataset_rows(data: Any, name: str) -> Iterator[Row]:
    """The rows of a `datasets.Dataset` as dicts, named "<name>[row]"."""
    index = 0
    for batch in data.iter(batch_size=4096):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield f"{name}[{index}]", index, dict(zip(columns, values, strict=True))
            index += 1


def _datasets_rows(folder: Path) -> Iterator[Row]:
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises FileNotFoundError / ValueError with multi-line text
        raise PoiseError(f"{folder}: cannot load the datasets folder ({_one_line(exc)})") from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if splits != ["train"]:
            raise PoiseError(f"{folder}: a DatasetDict with splits {', '.join(splits)}; point to one split's folder, "
                             f"e.g. {folder / splits[0]}")
        data = data["train"]
    yield from _dataset_rows(data, str(folder))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------ rows
def _parse_rows(rows: Iterable[Row], task: str | None, id_prefix: str = "") -> Iterator[Example]:
    for where, index, obj in rows:
        yield _parse_row(obj, where, index, task, id_prefix)


def _parse_row(obj: Any, where: str, index: int, default_task: str | None, id_prefix: str) -> Example:
    if not isinstance(obj, dict):
        raise PoiseError(f"{where}: expected an object, got {type(obj).__name__}")
    row = {key: value for key, value in obj.items() if value is not None}  # parquet/datasets fill absent columns
    example_id = _id(row, where, index, id_prefix)
    task = _optional_str(row, "task", where)
    task = task if task is not None else default_task
    dataset = row.get("dataset") if isinstance(row.get("dataset"), str) else None

    if "messages" in row:
        messages = _messages(row["messages"], where, "messages")
    elif "conversations" in row:
        messages = _sharegpt(row, where)
    elif "instruction" in row and "output" in row:
        messages = _alpaca(row, where)
    elif "prompt" in row and "completion" in row:
        messages = _prompt_completion(row, where)
    elif "input_ids" in row:
        input_ids, labels = _pretokenized(row, where)
        return Example(example_id, None, input_ids, labels, task, where, dataset)
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise PoiseError(f"{where}: unknown row format (fields: {keys}); expected one of: {'; '.join(ROW_FORMATS)}")
    return Example(example_id, messages, None, None, task, where, dataset)


def _id(row: dict, where: str, index: int, prefix: str) -> str:
    if "id" not in row:
        return f"{prefix}{index}"
    value = row["id"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PoiseError(f"{where}: field 'id' must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _optional_str(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise PoiseError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _required_str(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise PoiseError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _messages(value: Any, where: str, field: str) -> list[dict]:
    """tulu/open-instruct messages: a non-empty list of {"role", "content"} with known roles."""
    if not isinstance(value, list):
        raise PoiseError(f"{where}: field '{field}' must be a list of messages, got {type(value).__name__}")
    if not value:
        raise PoiseError(f"{where}: field '{field}' is empty")
    messages = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise PoiseError(f"{where}: message {number} must be an object with role and content, "
                             f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            shown = "missing" if role is None else repr(role)
            raise PoiseError(f"{where}: message {number} has {'no role' if role is None else 'unknown role ' + shown} "
                             f"(expected {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            raise PoiseError(f"{where}: message {number} content must be a string, got {type(content).__name__}")
        messages.append(_message(role, content))
    return messages


def _sharegpt(row: dict, where: str) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise PoiseError(f"{where}: field 'conversations' must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise PoiseError(f"{where}: field 'conversations' is empty")
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append(_message("system", system))
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise PoiseError(f"{where}: turn {number} of 'conversations' must be an object with from and value, "
                             f"got {type(turn).__name__}")
        speaker = turn.get("from", turn.get("role"))
        if speaker not in SHAREGPT_ROLES:
            shown = "no 'from'" if speaker is None else f"unknown 'from' {speaker!r}"
            raise PoiseError(f"{where}: message {number} has {shown} (expected {', '.join(SHAREGPT_ROLES)})")
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise PoiseError(f"{where}: message {number} value must be a string, got {type(content).__name__}")
        messages.append(_message(SHAREGPT_ROLES[speaker], content))
    return messages


def _alpaca(row: dict, where: str) -> list[dict]:
    instruction = _required_str(row, "instruction", where)
    extra = _optional_str(row, "input", where) or ""
    output = _required_str(row, "output", where)
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    return [_message("user", user), _message("assistant", output)]


def _prompt_completion(row: dict, where: str) -> list[dict]:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt/completion
        return _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
    return [_message("user", _required_str(row, "prompt", where)),
            _message("assistant", _required_str(row, "completion", where))]


def _pretokenized(row: dict, where: str) -> tuple[list[int], list[int]]:
    input_ids = _int_list(row["input_ids"], where, "input_ids")
    if not input_ids:
        raise PoiseError(f"{where}: field 'input_ids' is empty")
    if any(i < 0 for i in input_ids):
        raise PoiseError(f"{where}: field 'input_ids' holds a negative token id")
    if "labels" not in row:
        return input_ids, list(input_ids)
    labels = _int_list(row["labels"], where, "labels")
    if len(labels) != len(input_ids):
        raise PoiseError(f"{where}: field 'labels' has {len(labels)} items but 'input_ids' has {len(input_ids)}")
    if any(label < 0 and label != IGNORE_INDEX for label in labels):
        raise PoiseError(f"{where}: field 'labels' holds a negative label other than {IGNORE_INDEX} (not trained on)")
    return input_ids, labels


def _int_list(value: Any, where: str, field: str) -> list[int]:
    if not isinstance(value, list | tuple):
        raise PoiseError(f"{where}: field '{field}' must be a list of integers, got {type(value).__name__}")
    for position, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise PoiseError(f"{where}: field '{field}' must be a list of integers (item {position} is {item!r})")
    return list(value)


def _check_unique_ids(examples: list[Example]) -> None:
    seen: dict[str, str] = {}
    for example in examples:
        if example.id in seen:
            raise PoiseError(f"{example.where}: duplicate id '{example.id}' (first at {seen[example.id]})")
        seen[example.id] = example.where
