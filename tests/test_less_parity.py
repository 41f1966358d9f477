"""poise's attribution matrix in LESS mode equals what LESS's own functions give, on LESS-layout checkpoints.

A tiny Llama whose tokenizer adds BOS, two LESS-layout checkpoints (a peft adapter and an FSDP `optimizer.bin`
keyed by parameter name, with `trainer_state.json`) imported with `poise import-checkpoint`, tulu-format
training chats (single-turn, multi-turn, one with a system message) and LESS-style validation rows (prompt +
completion), at LESS's default length and at one that truncates chats inside user and assistant turns.
The labels come from the oracles restated from princeton-nlp/LESS at commit
8abf9628b9a814ac3045445eebc8ba3c908fdc78 (tests/oracles.py: `encode_with_messages_format` and `concat_messages` of
less/data_selection/get_training_dataset.py, `tokenize` of less/data_selection/get_validation_dataset.py).
The rest restates LESS's formulas: batch size 1, the full LoRA gradient of HF's mean token loss, LESS's Adam
map m'/sqrt(v' + eps) with the checkpoint's moments, unit rows, and the sum over checkpoints of cosines weighted
by each epoch's mean learning rate (normalised to sum 1).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracles import less_plain_encoding, less_tulu_encoding
from tiny import tiny_llama, tiny_tokenizer, write_jsonl

from poise import load_attribution, select
from poise.attribution import compute_attribution
from poise.config import AttributeConfig, FeaturesConfig, ImportConfig
from poise.features.stage import run_features
from poise.hf_import import import_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
POOL = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "List three colors:"},
     {"role": "assistant", "content": "red, green and blue."}, {"role": "user", "content": "And one more?"},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Write a function that returns the sum of a list of numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
    [{"role": "user", "content": "Translate to French: good morning."}, {"role": "assistant", "content": "Bonjour."},
     {"role": "user", "content": "Thank you!"}, {"role": "assistant", "content": "Hello, how are you today?"}],
    [{"role": "user", "content": "Solve for x: 3x + 5 = 20."}, {"role": "assistant", "content": "x = 5"}],
    [{"role": "user", "content": "Explain why the sky is blue in one sentence."},
     {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Which number is larger, 7 or 9?"}, {"role": "assistant", "content": "9 is larger."}],
    [{"role": "user", "content": "Summarize the following text in one line."},
     {"role": "assistant", "content": " The answer is 42. "}],
    [{"role": "user", "content": "Count the words in this sentence, please."},
     {"role": "assistant", "content": "There are seven words."}],
    [{"role": "user", "content": "for i in range(10):"}, {"role": "assistant", "content": "    print(i * i)"}],
    [{"role": "user", "content": "Hello, how are you today?"}, {"role": "assistant", "content": "Thank you!"}],
]
LENGTHS = [2048, 45]
"""LESS's default max_seq_length, and one that cuts four chats inside a user or an assistant turn."""
VALIDATION = {
    "math": [("Question: What is two plus two?\nAnswer:", " four"), ("Solve: 3x + 5 = 20. x =", " 5")],
    "code": [("Write a function that adds two numbers:\n", "def add(a, b):\n    return a + b"),
             ("for i in range(10):\n", "    print(i * i)")],
}
LOG_LRS = {1: [2e-5, 1.8e-5, 1.6e-5], 2: [1.2e-5, 0.8e-5, 0.4e-5]}


def fsdp_name(name: str) -> str:
    """How an FSDP-wrapped peft model names a LoRA parameter in LESS's optimizer.bin."""
    return name.replace(".default", "").replace("base_model.model.model.layers.",
                                                "_fsdp_wrapped_module.base_model.model.model.layers.")


@pytest.fixture(scope="module")
def less_run(tmp_path_factory) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("less")
    tokenizer = tiny_tokenizer(chat_template=False, add_bos=True)
    tiny_llama(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    moments = {}
    for k in (1, 2):
        base = AutoModelForCausalLM.from_pretrained(root / "model")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(k)
        state = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
                state[name] = {"step": torch.tensor(3.0 * k),
                               "exp_avg": torch.randn(p.shape, generator=generator) * 1e-3,
                               "exp_avg_sq": torch.rand(p.shape, generator=generator) * 1e-5}
        folder = root / "less" / f"checkpoint-{3 * k}"
        model.save_pretrained(folder)
        torch.save({"state": {fsdp_name(n): s for n, s in state.items()},
                    "param_groups": [{"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                      "params": [fsdp_name(n) for n in state]}]}, folder / "optimizer.bin")
        log = [{"epoch": k - 1 + (s + 1) / 3, "learning_rate": lr, "loss": 1.0} for s, lr in enumerate(LOG_LRS[k])]
        (folder / "trainer_state.json").write_text(json.dumps({"epoch": float(k), "global_step": 3 * k,
                                                               "log_history": log}))
        moments[k] = state
        import_checkpoint(ImportConfig(checkpoint=str(folder), out=str(root / "poise" / f"checkpoint-{k}"),
                                       model=str(root / "model")))
    write_jsonl(root / "pool.jsonl", [{"id": f"p{i}", "messages": m} for i, m in enumerate(POOL)])
    for task, rows in VALIDATION.items():
        write_jsonl(root / "val" / f"{task}.jsonl",
                    [{"id": f"{task}{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(rows)])
    return {"root": root, "tokenizer": tokenizer, "moments": moments}


def oracle_rows(run: dict, k: int, encodings: list[tuple[list[int], list[int]]], adam: bool) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run["root"] / "model")
    model = PeftModel.from_pretrained(base, str(run["root"] / "less" / f"checkpoint-{3 * k}"), is_trainable=True)
    model.eval()  # no dropout
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    rows = []
    for ids, labels in encodings:  # batch size 1
        model.zero_grad()
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss  # HF's mean token loss
        loss.backward()
        parts = []
        for name in names:
            g = params[name].grad.double().flatten()
            if adam:
                state = run["moments"][k][name]
                m = 0.9 * state["exp_avg"].double().flatten() + 0.1 * g
                v = 0.999 * state["exp_avg_sq"].double().flatten() + 0.001 * g * g
                g = m / torch.sqrt(v + 1e-8)
            parts.append(g)
        row = torch.cat(parts)
        rows.append((row / row.norm()).numpy())
    return np.stack(rows)


def poise_matrix(run: dict, train_template: str, max_seq_length: int = 2048) -> tuple[np.ndarray, list[str]]:
    root = run["root"]
    out = root / f"features-{train_template}-{max_seq_length}"
    for k in (1, 2):
        checkpoint = str(root / "poise" / f"checkpoint-{k}")
        run_features(FeaturesConfig(data=[str(root / "pool.jsonl")], out=str(out / f"{k}" / "train"),
                                    checkpoint=checkpoint, kind="adam", projection="none", template=train_template,
                                    max_seq_length=max_seq_length, output_dtype="float32"))
        run_features(FeaturesConfig(data=[str(root / "val")], out=str(out / f"{k}" / "val"), checkpoint=checkpoint,
                                    kind="sgd", projection="none", template="plain", max_seq_length=max_seq_length,
                                    output_dtype="float32"))
    attribution = compute_attribution(AttributeConfig(train=[str(out / "1" / "train"), str(out / "2" / "train")],
                                                      val=[str(out / "1" / "val"), str(out / "2" / "val")],
                                                      out=str(out / "attribution")))
    matrix = load_attribution(attribution)
    return matrix.scores, matrix.tasks


def oracle_matrix(run: dict, val_order: list[tuple[str, str]], max_seq_length: int = 2048) -> np.ndarray:
    tokenizer = run["tokenizer"]
    train = [less_tulu_encoding(m, tokenizer, max_seq_length) for m in POOL]
    val = [less_plain_encoding(p, c, tokenizer, max_seq_length) for p, c in val_order]
    weights = {k: np.mean(LOG_LRS[k]) for k in (1, 2)}
    total = sum(weights.values())
    return sum(weights[k] / total * oracle_rows(run, k, train, adam=True) @ oracle_rows(run, k, val, adam=False).T
               for k in (1, 2))


@pytest.mark.parametrize("max_seq_length", LENGTHS)
def test_poise_equals_less_with_the_less_label_modes(less_run, max_seq_length) -> None:
    tokenizer = less_run["tokenizer"]
    cut = sum(len(less_tulu_encoding(m, tokenizer)[0]) > max_seq_length for m in POOL)
    assert cut == (0 if max_seq_length == 2048 else 4)  # the truncating length does cut chats
    scores, tasks = poise_matrix(less_run, "tulu-less", max_seq_length)
    order = [row for task in dict.fromkeys(tasks) for row in VALIDATION[task]]
    expected = oracle_matrix(less_run, order, max_seq_length)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    # task-max picks (LESS's rule: the max over tasks of the mean over the task's columns) are identical
    columns = {t: [j for j, task in enumerate(tasks) if task == t] for t in dict.fromkeys(tasks)}
    task_scores = np.max([expected[:, c].mean(axis=1) for c in columns.values()], axis=0)
    from poise import AttributionMatrix

    matrix = AttributionMatrix(scores.astype(np.float32), list(range(len(tasks))), tasks)
    order = np.argsort(-task_scores, kind="stable")
    assert np.diff(task_scores[order][:5]).max() < -1e-5  # no near-tie decides the first four picks
    assert select(matrix, "task-max", 4).indices.tolist() == order[:4].tolist()


def test_the_parity_fails_when_the_newline_after_eos_is_masked(less_run) -> None:
    """With poise's own tulu labels (the newline after every EOS masked) the matrix moves: the test can fail."""
    scores, tasks = poise_matrix(less_run, "tulu")
    order = [row for task in dict.fromkeys(tasks) for row in VALIDATION[task]]
    expected = oracle_matrix(less_run, order)
    assert np.abs(scores - expected).max() > 1e-4
