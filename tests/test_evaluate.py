"""`poise evaluate`: lm-eval's numbers on local tasks against a plain forward pass, presets, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer, write_jsonl

from poise.cli import main
from poise.data.templates import render_prompt
from poise.errors import PoiseError

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    return tiny_model_dir


def greedy(model, tokenizer, context: str, max_new_tokens: int = 8) -> str:
    ids = torch.tensor([tokenizer.encode(context)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    # decoded without special tokens and cut at the first stop sequence, as lm-eval reports a generation
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]


def answer_scores(model, tokenizer, context: str, answer: str) -> tuple[float, bool]:
    """The gold answer's mean negative log-likelihood per token, and whether every answer token is the argmax
    (the answer is the greedy continuation), from one plain forward pass (no lm-eval)."""
    whole, prefix = tokenizer.encode(context + answer), tokenizer.encode(context)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits[len(prefix) - 1:len(whole) - 1], dim=-1)
    answer_ids = torch.tensor(whole[len(prefix):])
    nll = float(-logprobs[torch.arange(len(answer_ids)), answer_ids].mean())
    return nll, bool((logprobs.argmax(dim=-1) == answer_ids).all())


def test_local_task_scores_equal_a_plain_forward_pass_and_known_generations(model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = ["What is two plus two?", "List three colors:"]
    contexts = [render_prompt([{"role": "user", "content": p}], tokenizer) for p in prompts]
    known = greedy(hf, tokenizer, contexts[0], max_new_tokens=8)
    assert known.strip()
    answers = [known, "red, green and blue."]  # the first is the model's own greedy answer: exact match 1
    rows = [{"id": f"m{k}", "prompt": p, "answer": a} for k, (p, a) in enumerate(zip(prompts, answers, strict=True))]
    write_jsonl(tmp_path / "held" / "math.jsonl", rows)
    code = main(["evaluate", "--model", str(model), "--data", str(tmp_path / "held"), "--out", str(tmp_path / "ev"),
                 "--max-gen-toks", "8", "--batch-size", "1"])
    assert code == 0
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())["scores"]["math"]
    expected = [answer_scores(hf, tokenizer, c, a) for c, a in zip(contexts, answers, strict=True)]
    assert scores["nll"]["value"] == pytest.approx(sum(nll for nll, _ in expected) / 2, abs=1e-4)
    assert scores["acc"]["value"] == pytest.approx(sum(greedy for _, greedy in expected) / 2)
    assert scores["exact_match"]["value"] == pytest.approx(0.5)  # its own greedy answer matches, the other not
    assert (tmp_path / "ev" / "results.json").is_file()
    out = capsys.readouterr().out
    assert "macro-average" in out and "worst" in out


def test_bids_suite_names_resolve_in_the_installed_lm_eval() -> None:
    from lm_eval.tasks import TaskManager

    from poise.evaluate import BIDS_SUITE, resolve_tasks

    manager = TaskManager()
    assert resolve_tasks(["bids-suite"], manager, allow_code_execution=True) == list(BIDS_SUITE)
    with pytest.raises(PoiseError, match="allow_code_execution"):
        resolve_tasks(["bids-suite"], manager, allow_code_execution=False)
    with pytest.raises(PoiseError, match="unknown lm-eval task 'gsm8kk'; did you mean gsm8k"):
        resolve_tasks(["gsm8kk"], manager, allow_code_execution=False)


def test_bad_local_tasks_and_adapters_are_one_line_errors(model, tmp_path, capsys):
    write_jsonl(tmp_path / "a" / "math.jsonl", [{"id": "x", "prompt": "What is 2+2?"}])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "math.jsonl").write_text("")
    (tmp_path / "adapter").mkdir()
    cases = [
        (["--data", str(tmp_path / "a")], "math.jsonl:1: missing field 'answer'"),
        (["--data", str(tmp_path / "b")], "math.jsonl: no items"),
        (["--data", str(tmp_path / "a"), "--adapter", str(tmp_path / "adapter")], "not a peft adapter folder"),
        ([], "nothing to evaluate"),
    ]
    for extra, needle in cases:
        assert main(["evaluate", "--model", str(model), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_an_adapter_made_on_another_base_model_is_refused(model, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=1, hidden=48).save_pretrained(other)
    tokenizer.save_pretrained(other)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(other),
                                LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    capsys.readouterr()  # transformers' own save bars
    write_jsonl(tmp_path / "held" / "math.jsonl", [{"id": "x", "prompt": "What is 2+2?", "answer": "4"}])
    code = main(["evaluate", "--model", str(model), "--adapter", str(tmp_path / "adapter"),
                 "--data", str(tmp_path / "held"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "trained on" in err[0] and "not on the model" in err[0], err


def test_samples_hold_each_items_generation_and_nll(model, tmp_path) -> None:
    rows = [{"id": "m0", "prompt": "What is two plus two?", "answer": "four"},
            {"id": "m1", "prompt": "List three colors:", "answer": "red"}]
    write_jsonl(tmp_path / "held" / "math.jsonl", rows)
    assert main(["evaluate", "--model", str(model), "--data", str(tmp_path / "held"), "--out", str(tmp_path / "ev"),
                 "--max-gen-toks", "4", "--batch-size", "2"]) == 0
    samples = [json.loads(line) for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())["scores"]["math"]
    assert [s["id"] for s in samples] == ["m0", "m1"] and all(s["capability"] == "math" for s in samples)
    assert all(isinstance(s["generation"], str) and s["answer"] in ("four", "red") for s in samples)
    assert sum(s["nll"] for s in samples) / 2 == pytest.approx(scores["nll"]["value"], abs=1e-6)
    assert sum(s["exact_match"] for s in samples) / 2 == pytest.approx(scores["exact_match"]["value"])
    assert "samples" not in json.loads((tmp_path / "ev" / "results.json").read_text())
