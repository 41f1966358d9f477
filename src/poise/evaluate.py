"""`poise evaluate`: lm-evaluation-harness on every capability, for a base model or a trained adapter.

Nothing of lm-eval's job is rewritten here: `lm_eval.simple_evaluate` runs its `hf` model (with `peft=` for
an adapter), its task registry and its aggregation. poise adds two things:

- `--tasks bids-suite`: the BIDS paper's benchmarks as lm-eval's own tasks (HumanEval, MBPP, GSM-Plus,
  MATH, BBH with chain-of-thought few-shot, MMLU, IFEval). They download their data from the Hugging Face
  hub, so they need a machine that reaches it. HumanEval and MBPP execute model-written code: poise runs
  them only with `--allow-code-execution`.
- local tasks from held-out JSONL files (one per capability, `{"id", "prompt" or "messages", "answer"}`):
  poise renders each prompt the way training data is rendered (the same chat template) and writes lm-eval
  task YAMLs into `<out>/tasks/`, read through lm-eval's `include_path`. Each capability is scored by the
  gold answer's log-likelihood (`loglikelihood` requests: `nll` = mean negative log-likelihood per answer
  token, `acc` = the answer is the greedy continuation) and by exact match of a short greedy generation
  (`generate_until`, `--max-gen-toks`). Both are deterministic and run offline.

Outputs: lm-eval's `results.json` and poise's `scores.json` (per task, per metric, value and lm-eval's
stderr), plus a terminal table with the macro-average and the worst task.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from poise.config import validate
from poise.errors import PoiseError
from poise.files import EVAL_SCORES_FILE as SCORES_FILE
from poise.files import RESULTS_FILE, SAMPLES_FILE
from poise.io import atomic_write_json, atomic_write_lines, atomic_write_text, read_jsonl
from poise.provenance import mark_complete, open_folder
from poise.version import __version__

#: The BIDS paper's seven benchmarks as lm-eval task names (MATH: minerva_math, the 4-shot Minerva format).
BIDS_SUITE = ("humaneval", "mbpp", "gsm_plus", "minerva_math", "bbh_cot_fewshot", "mmlu", "ifeval")
#: Tasks that execute model-written code.
CODE_TASKS = ("humaneval", "mbpp")
TASK_PREFIX = "poise_"
#: Metrics where lower is better, when lm-eval's results do not say.
LOWER_IS_BETTER = ("nll", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")

_PROCESS_RESULTS = '''"""lm-eval process_results for poise's local tasks (written by poise evaluate)."""


def loglikelihood(doc, results):
    loglikelihood, is_greedy = results[0]
    return {"nll": -loglikelihood / doc["n_answer_tokens"], "acc": float(is_greedy)}


def generation(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}
'''


def read_items(path: Path) -> list[dict[str, Any]]:
    """Held-out items of one capability: `{"id", "prompt" or "messages", "answer"}` per JSONL line (or a
    conversation whose last assistant turn is the gold answer, as in validation files)."""
    items = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        chat = row.get("messages") if isinstance(row.get("messages"), list) and row["messages"] else None
        answer = row.get("answer")
        if answer is None and chat and isinstance(chat[-1], dict) and chat[-1].get("role") == "assistant":
            answer, chat = chat[-1].get("content"), chat[:-1]  # a conversation ending in the gold reply
        if not isinstance(answer, str) or not answer.strip():
            raise PoiseError(f"{where}: missing field 'answer' (the gold answer, as text)")
        if chat:
            messages = chat
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise PoiseError(f"{where}: needs 'prompt' (text) or 'messages' (a conversation ending with the user)")
        items.append({"id": str(row.get("id", f"{path.stem}/{number}")), "messages": messages, "answer": answer})
    if not items:
        raise PoiseError(f"{path}: no items")
    return items


def local_task_files(data: list[str]) -> dict[str, Path]:
    """capability -> JSONL file, from files and folders of files (each file's stem is its capability)."""
    files: dict[str, Path] = {}
    for entry in data:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise PoiseError(f"{path}: no .jsonl files (one per capability)")
        elif path.is_file():
            found = [path]
        else:
            raise PoiseError(f"{path}: no such file or folder")
        for file in found:
            if file.stem in files:
                raise PoiseError(f"{file}: a second file for capability {file.stem!r} ({files[file.stem]})")
            files[file.stem] = file
    return files


def write_local_tasks(items: dict[str, tuple[Path, list[dict]]], tokenizer: Any, folder: Path, template: str = "auto",
                      max_gen_toks: int = 32) -> list[str]:
    """Write lm-eval task YAMLs (+ their documents) for local capabilities; returns the lm-eval task names.

    `items` maps each capability to its file and the items `read_items` read from it."""
    from poise.data.templates import render_prompt

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "poise_tasks.py", _PROCESS_RESULTS)
    stop = [s for s in {tokenizer.eos_token, "\n\n"} if s]
    names = []
    for capability, (path, held_out) in items.items():
        docs = []
        for item in held_out:
            context = render_prompt(item["messages"], tokenizer, template, where=f"{path} (id {item['id']})")
            # answer tokens exactly as lm-eval's HFLM splits them: encode(context + answer) minus encode(context)
            n_answer = len(tokenizer.encode(context + item["answer"])) - len(tokenizer.encode(context))
            docs.append({"id": item["id"], "context": context, "answer": item["answer"],
                         "n_answer_tokens": max(1, n_answer)})
        documents = folder / f"{capability}.jsonl"
        atomic_write_lines(documents, (json.dumps(doc) for doc in docs))
        common = {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(documents.resolve())}},
            "test_split": "test",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            "metadata": {"version": 1, "poise": __version__},
        }
        likelihood = {**common, "task": f"{TASK_PREFIX}{capability}_ll", "output_type": "loglikelihood",
                      "process_results": "!function poise_tasks.loglikelihood",
                      "metric_list": [{"metric": "nll", "aggregation": "mean", "higher_is_better": False},
                                      {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
        generation = {**common, "task": f"{TASK_PREFIX}{capability}_gen", "output_type": "generate_until",
                      "generation_kwargs": {"until": stop, "max_gen_toks": max_gen_toks, "do_sample": False},
                      "process_results": "!function poise_tasks.generation",
                      "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
        for config in (likelihood, generation):
            atomic_write_text(folder / f"{config['task']}.yaml", _yaml(config))
            names.append(config["task"])
    return names


def local_samples(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per held-out item of the local tasks: capability, id, answer, the greedy generation and the answer's
    NLL per token (from lm-eval's logged samples), so that answers can be read side by side across runs."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for task, entries in samples.items():
        if not task.startswith(TASK_PREFIX):
            continue
        capability, kind = task[len(TASK_PREFIX):].rsplit("_", 1)
        for entry in entries:
            doc = entry.get("doc") or {}
            key = (capability, str(doc.get("id")))
            row = rows.setdefault(key, {"capability": capability, "id": doc.get("id"), "answer": doc.get("answer")})
            if kind == "gen":
                response = entry.get("filtered_resps") or entry.get("resps") or [""]
                while isinstance(response, list) and response:
                    response = response[0]
                row["generation"] = response if isinstance(response, str) else str(response)
                row["exact_match"] = entry.get("exact_match")
            elif kind == "ll":
                row["nll"] = entry.get("nll")
    return sorted(rows.values(), key=lambda r: (r["capability"], str(r["id"])))


def _yaml(config: dict) -> str:
    """YAML for a task config; `process_results` is written as lm-eval's `!function` tag."""
    import yaml

    plain = {k: v for k, v in config.items() if k != "process_results"}
    text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=1000)
    return text + f"process_results: {config['process_results']}\n"


def resolve_tasks(names: list[str], task_manager: Any, allow_code_execution: bool) -> list[str]:
    """lm-eval task names for `--tasks` (bids-suite expanded); unknown names are one line with the closest."""
    wanted: list[str] = []
    for name in names:
        wanted.extend(BIDS_SUITE if name == "bids-suite" else [name])
    known = set(task_manager.all_tasks)
    for name in wanted:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise PoiseError(f"EvaluateConfig.tasks: unknown lm-eval task {name!r}" +
                             (f"; did you mean {', '.join(close)}?" if close else ""))
    code = [n for n in wanted if n in CODE_TASKS]
    if code and not allow_code_execution:
        raise PoiseError(f"EvaluateConfig.tasks: {', '.join(code)} execute code the model writes; set "
                         "allow_code_execution (--allow-code-execution) to run it (on a machine or container where "
                         "that is safe)")
    return wanted


def scores_from_results(results: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """{task: {metric: {"value", "stderr"}}} from lm-eval's results; local tasks merged per capability."""
    scores: dict[str, dict[str, dict[str, float | None]]] = {}
    directions = results.get("higher_is_better") or {}
    for task, values in (results.get("results") or {}).items():
        name = task
        if task.startswith(TASK_PREFIX):
            name = task[len(TASK_PREFIX):].rsplit("_", 1)[0]
        for key, value in values.items():
            if "," not in key or key.startswith("alias") or "_stderr" in key:
                continue
            metric, _filter = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{_filter}")
            number = float(value) if isinstance(value, (int, float)) else None
            higher = (directions.get(task) or {}).get(metric)
            scores.setdefault(name, {})[metric] = {
                "value": number,
                "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                "higher_is_better": bool(higher) if higher is not None else metric not in LOWER_IS_BETTER,
            }
    return scores


def run_evaluate(config: Any) -> Path:
    """Evaluate `config.model` (+ `config.adapter`) on the asked tasks into `config.out`; returns the folder."""
    from poise.lora import load_adapter
    from poise.model import load_model, load_tokenizer

    validate(config)
    if not config.tasks and not config.data:
        raise PoiseError("nothing to evaluate: give --data (local held-out files, one per capability) and/or "
                         "--tasks (lm-eval task names, or bids-suite)")
    out = Path(config.out)
    adapter = Path(config.adapter) if config.adapter else None
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise PoiseError(f"EvaluateConfig.adapter {adapter}: not a peft adapter folder (no adapter_config.json)")
        _check_adapter_base(adapter, config.model)
    # every item read and checked before any model is loaded
    items = {task: (path, read_items(path)) for task, path in local_task_files(list(config.data or [])).items()}
    opened = open_folder(out, "evaluate", config)
    if opened.complete:
        from poise.progress import note

        note(f"evaluate: {out} is already complete (the same model, adapter, tasks and settings); nothing to do")
        return out

    if not sys.stderr.isatty():  # datasets' bars would fill a log line by line
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    tokenizer = load_tokenizer(config.model)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_dir = out / "tasks"
    local = write_local_tasks(items, tokenizer, task_dir, config.template, config.max_gen_toks) if items else []
    # lm-eval's own index (14K task files, ~15 s to read) only when lm-eval tasks are asked for
    manager = TaskManager(include_path=str(task_dir.resolve()) if local else None,
                          include_defaults=bool(config.tasks))
    names = local + resolve_tasks(list(config.tasks or []), manager, config.allow_code_execution)
    if config.allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # what lm-eval's code tasks check
    # the model is built here (not by lm-eval from the folder), so that `poise run` shares one load
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=False)
    model.eval()
    with _quiet_lm_eval():
        lm = _chat_prompt_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        results = simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                  limit=config.limit, log_samples=bool(local), random_seed=config.seed,
                                  numpy_random_seed=config.seed, torch_random_seed=config.seed,
                                  fewshot_random_seed=config.seed,
                                  confirm_run_unsafe_code=bool(config.allow_code_execution))
    if results is None:  # pragma: no cover - non-zero ranks
        return out
    out.mkdir(parents=True, exist_ok=True)
    samples = local_samples(results.pop("samples", None) or {})
    if samples:
        atomic_write_lines(out / SAMPLES_FILE, (json.dumps(row) for row in samples))
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, default=str))
    scores = scores_from_results(results)
    atomic_write_json(out / SCORES_FILE, {
        "poise_version": __version__, "model": config.model, "adapter": str(adapter) if adapter else None,
        "label": config.label or (adapter.name if adapter else "base"), "scores": scores,
    })
    mark_complete(out)
    return out


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval warns that a model passed as an object ignores its loading arguments: poise loads it itself.
    (Its tqdm bars are switched off without a terminal by the `poise` command, see `cli.main`.)"""
    import logging

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return "is not of type `str`" not in message and "Passed an already-initialized model" not in message

    loggers = [logging.getLogger(name) for name in ("lm_eval.models.huggingface", "lm_eval.evaluator")]
    drop = Drop()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _chat_prompt_hflm() -> type:
    """lm-eval's `hf` model, except that a context's trailing whitespace stays in the context.

    Without a terminal its per-request progress bars are off. HFLM moves trailing spaces and newlines
    from the context to the continuation (right for plain-text
    prompts like "Question: ... Answer:" + " 42", where the space belongs to the answer's first token). After a
    chat template's assistant header ("<|im_start|>assistant\n") the newline belongs to the prompt: moved, it
    would be scored as part of every answer. Everything else is HFLM's own.
    """
    from lm_eval.models.huggingface import HFLM

    quiet = not sys.stderr.isatty()  # lm-eval's request bars would fill a log line by line

    class ChatPromptHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if self.backend != "causal":
                return super()._encode_pair(context, continuation)
            whole = self.tok_encode(context + continuation)
            prefix = self.tok_encode(context)
            return prefix, whole[len(prefix):]

    return ChatPromptHFLM


def _check_adapter_base(adapter: Path, model: str) -> None:
    """An adapter trained on another base model is refused (when its config names a base we can compare)."""
    named = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not named:
        return
    from poise.model import model_folder

    def same(a: str, b: str) -> bool:
        try:
            return os.path.realpath(model_folder(a)) == os.path.realpath(model_folder(b))
        except PoiseError:
            return a == b

    if named != model and not same(named, model):
        raise PoiseError(f"EvaluateConfig.adapter {adapter}: trained on {named!r}, not on the model {model!r}")
