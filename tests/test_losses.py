"""`model_losses` (logits at target positions only) equals the full-logit loss within a float32 bound:
padding on either side, multi-turn masks, through a peft LoRA model (losses and gradients), with the
post-head maps of Gemma 2 (soft-capping), Granite and Cohere (scaling); and it falls back to the full
logits when the head is not called, is fed other positions, or its gathered logits come back reshaped."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from tolerances import UNIT_ROUNDOFF_FLOAT32, gamma

from poise.data import collate, read_examples, tokenize_examples
from poise.errors import PoiseError
from poise.losses import model_losses, per_example_losses, target_positions

MULTI_TURN = [
    [{"role": "user", "content": "add two and three"}, {"role": "assistant", "content": "five"}],
    [{"role": "system", "content": "be short"}, {"role": "user", "content": "def add(a, b):"},
     {"role": "assistant", "content": "return a + b"}, {"role": "user", "content": "and sub?"},
     {"role": "assistant", "content": "return a - b then the end of the long answer"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]
LONG_ANSWERS = [[{"role": "user", "content": "x"}, {"role": "assistant", "content": f"the answer is {k} " * 3}]
                for k in range(4)]  # more target tokens in the batch than positions in a row


def batch_of(tokenizer, padding_side: str, rows: list = MULTI_TURN) -> dict[str, torch.Tensor]:
    from poise.data import Example

    examples = [Example(id=str(k), messages=m, input_ids=None, labels=None, task=None, where="test")
                for k, m in enumerate(rows)]
    _, tokenized, _ = tokenize_examples(examples, tokenizer, 128, progress=False)
    return collate(tokenized, tokenizer.pad_token_id, padding_side)


U = UNIT_ROUNDOFF_FLOAT32


def model_inputs(batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def head_input_and_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's (b, t, h) input (the final hidden states) and the forward's full (b, t, V) logits."""
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
    finally:
        handle.remove()
    return seen[0], logits


def loss_bound(model, batch, lipschitz: float = 1.0, post_rounding=None) -> torch.Tensor:
    """(b,) float64: how far two float32 computations of an example's loss from the same hidden states can
    be apart when only the blocking of their sums differs (Higham's gamma_n, tests/tolerances.py).

    Per logit z = h.w (+ bias), h terms: each computation within gamma_{h+1} * sum|h_k w_k| (+|bias|), so
    the two within twice that. The forward's per-position map after the head (`lipschitz`: its Lipschitz
    constant) carries that over, and adds its own rounding, `post_rounding(|z|, |y|)` per computation (y:
    the final logit). A token's cross-entropy logsumexp(y) - y_target moves by at most 2 * max|dy|, and is
    itself rounded: exp within 1 ulp per term, the sum of V terms, log, two subtractions, at most
    gamma_{V+4} * (1 + log V + |logsumexp| + |loss|) per computation. The mean over an example's c tokens
    adds gamma_{c+1} * |mean| per computation (token losses are >= 0)."""
    hidden, full_logits = head_input_and_logits(model, batch)
    head = model.get_output_embeddings()
    weight = head.weight.detach().double()
    bias = head.bias.detach().double() if getattr(head, "bias", None) is not None else torch.zeros(len(weight))
    rows, positions, targets, counts = target_positions(batch["labels"])
    h = hidden[rows, positions].double()  # (n, h)
    z = h @ weight.T + bias  # the head's output, (n, V)
    y = full_logits[rows, positions].double()  # the forward's logits, (n, V)
    logit_error = 2 * lipschitz * gamma(h.shape[-1] + 1) * (h.abs() @ weight.abs().T + bias.abs())
    if post_rounding is not None:
        logit_error = logit_error + 2 * post_rounding(z.abs(), y.abs())
    lse = torch.logsumexp(y, dim=1)
    token_loss = lse - y[torch.arange(len(targets)), targets]
    vocab = y.shape[-1]
    ce_rounding = gamma(vocab + 4) * (1 + math.log(vocab) + lse.abs() + token_loss.abs())
    per_token = 2 * logit_error.amax(dim=1) + 2 * ce_rounding
    bound = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, rows, per_token) / counts
    full = per_example_losses(full_logits, batch["labels"]).double()
    return bound + 2 * gamma(int(counts.max()) + 1) * full.abs()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_target_position_losses_equal_the_full_logit_losses(padding_side) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer).eval()
    batch = batch_of(tokenizer, padding_side)
    with torch.no_grad():
        full = per_example_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        position_ids=batch["position_ids"]).logits, batch["labels"])
        gathered, output = model_losses(model, batch)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert output.logits.shape[:2] == (1, n_targets)  # only the target positions got logits
    assert torch.all((gathered.double() - full.double()).abs() <= loss_bound(model, batch))


def lora_model(tokenizer):
    from poise.lora import attach_lora

    model = attach_lora(tiny_llama(tokenizer), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def exact_losses(model, batch) -> torch.Tensor:
    """The full-logit loss with the cross-entropy in the model's dtype (per_example_losses casts to float32)."""
    logits = model(**model_inputs(batch)).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="none").view(labels.shape)
    return token_loss.sum(dim=1) / (labels != -100).sum(dim=1)


def lora_gradients(model, losses_of) -> dict[str, torch.Tensor]:
    model.zero_grad()
    losses_of(model).sum().backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_through_a_peft_lora_model_losses_and_gradients_equal_the_full_logit_ones() -> None:
    """Losses within the float32 bound. Gradients: the two float32 paths differ only in how the head's sums
    are blocked, so each is as far from the exact gradient (a float64 copy of the model, float64 loss) as
    float32 arithmetic puts the other; the gathered path may be at most twice as far as the full-logit one
    (a wrong position or a missing token would be as far as the gradient is large)."""
    tokenizer = tiny_tokenizer()
    model = lora_model(tokenizer)
    batch = batch_of(tokenizer, "right")
    losses, output = model_losses(model, batch)
    assert output.logits.shape[0] == 1
    full = per_example_losses(model(**model_inputs(batch)).logits, batch["labels"])
    assert torch.all((losses.detach().double() - full.detach().double()).abs() <= loss_bound(model, batch))

    fast = lora_gradients(model, lambda m: model_losses(m, batch)[0])
    slow = lora_gradients(model, lambda m: per_example_losses(m(**model_inputs(batch)).logits, batch["labels"]))
    exact = lora_gradients(copy.deepcopy(model).double(), lambda m: exact_losses(m, batch))
    for name, reference in exact.items():
        assert float(reference.norm()) > 0, name
        error_fast, error_full = float((fast[name] - reference).norm()), float((slow[name] - reference).norm())
        assert error_fast <= 2 * error_full, (name, error_fast, error_full)


def tiny_config(cls, tokenizer, **extra):
    return cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, **extra)


def softcapped_gemma2(tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = tiny_config(Gemma2Config, tokenizer, head_dim=8, final_logit_softcapping=2.0, tie_word_embeddings=False)
    return Gemma2ForCausalLM(config), 1.0, lambda z, y: U * (z + 5 * y)  # /c, tanh (2 ulp), *c


def scaled_granite(tokenizer):
    from transformers import GraniteConfig, GraniteForCausalLM

    config = tiny_config(GraniteConfig, tokenizer, logits_scaling=0.25)
    return GraniteForCausalLM(config), 4.0, lambda z, y: U * y  # y = z / 0.25


def scaled_cohere(tokenizer):
    from transformers import CohereConfig, CohereForCausalLM

    config = tiny_config(CohereConfig, tokenizer, logit_scale=3.0, tie_word_embeddings=False)
    return CohereForCausalLM(config), 3.0, lambda z, y: U * y  # y = z * 3


@pytest.mark.parametrize("build", [softcapped_gemma2, scaled_granite, scaled_cohere])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_what_the_forward_does_after_the_head_applies_to_the_gathered_rows(build, padding_side) -> None:
    """Gemma 2's final_logit_softcapping, Granite's logits_scaling and Cohere's logit_scale: the gathered
    loss equals the full-logit one within the float32 bound, and dropping the map would be far outside it."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model, lipschitz, post_rounding = build(tokenizer)
    model = model.float().eval()
    with torch.no_grad():  # logits of a few units, so that the softcap (c = 2) is far from linear
        model.get_output_embeddings().weight.normal_(std=1.0, generator=torch.Generator().manual_seed(1))
    batch = batch_of(tokenizer, padding_side)
    with torch.no_grad():
        gathered, output = model_losses(model, batch)
        full = per_example_losses(model(**model_inputs(batch)).logits, batch["labels"])
        hidden, _ = head_input_and_logits(model, batch)
        without_map = per_example_losses(model.get_output_embeddings()(hidden), batch["labels"])
    assert output.logits.shape[:2] == (1, int((batch["labels"][:, 1:] != -100).sum()))
    bound = loss_bound(model, batch, lipschitz, post_rounding)
    assert torch.all((gathered.double() - full.double()).abs() <= bound)
    assert torch.all((without_map.double() - full.double()).abs() > 1000 * bound)


class Prepends(torch.nn.Module):
    """A model that puts one token before every input (as virtual-token adapters do) and returns the logits
    of the input positions: its head sees (b, t + 1, h), so gathering at the batch's positions would be
    off by one."""

    def __init__(self, inner, token: int):
        super().__init__()
        self.inner, self.token = inner, token

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        b = input_ids.shape[0]
        out = self.inner(input_ids=torch.cat([torch.full((b, 1), self.token), input_ids], dim=1),
                         attention_mask=torch.cat([torch.ones(b, 1, dtype=attention_mask.dtype), attention_mask], 1),
                         position_ids=torch.cat([torch.zeros(b, 1, dtype=position_ids.dtype), position_ids + 1], 1),
                         **kwargs)
        out.logits = out.logits[:, 1:]
        return out


class Truncates(Prepends):
    """A model whose forward keeps at most the first t positions of what its head returns: harmless on the
    full (b, t, V) logits, but it cuts the gathered (1, n, V) ones when n > t."""

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        out.logits = out.logits[:, : input_ids.shape[1]]
        return out


def test_a_head_fed_other_positions_gets_the_full_logits() -> None:
    tokenizer = tiny_tokenizer()
    model = Prepends(tiny_llama(tokenizer), tokenizer.bos_token_id).eval()
    batch = batch_of(tokenizer, "right")
    with torch.no_grad():
        losses, output = model_losses(model, batch)
        full = per_example_losses(model(**model_inputs(batch)).logits, batch["labels"])
    assert output.logits.shape[:2] == batch["input_ids"].shape
    assert torch.equal(losses, full)


def test_a_forward_that_reshapes_the_gathered_logits_is_run_again_for_the_full_ones(monkeypatch) -> None:
    from poise.features import capture
    from poise.features.capture import backward_per_example, capture_lora_gradients

    tokenizer = tiny_tokenizer()
    inner = lora_model(tokenizer)
    model = Truncates(inner, 0)
    batch = batch_of(tokenizer, "right", LONG_ANSWERS)
    assert int((batch["labels"][:, 1:] != -100).sum()) > batch["input_ids"].shape[1]  # n > t: it cuts
    with torch.no_grad():
        losses, output = model_losses(model, batch)
        full = per_example_losses(model(**model_inputs(batch)).logits, batch["labels"])
    assert output.logits.shape[:2] == batch["input_ids"].shape
    assert torch.equal(losses, full)

    def per_example(m) -> dict[str, torch.Tensor]:  # the features path: a rerun forward must not break it
        grads = {}
        with capture_lora_gradients(inner, lambda name, g: grads.__setitem__(name, g)):
            backward_per_example(m, batch)
        return grads

    def full_logit_losses(m, b, **forward):
        out = m(**model_inputs(b), use_cache=False, **forward)
        return per_example_losses(out.logits, b["labels"]), out

    wrapped = per_example(model)
    monkeypatch.setattr(capture, "model_losses", full_logit_losses)
    plain = per_example(inner)  # the features path as it was, with the full logits
    assert wrapped.keys() == plain.keys() and wrapped
    for name in plain:  # the rerun is that computation, operation for operation
        assert torch.equal(wrapped[name], plain[name]), name


def test_an_example_without_targets_is_an_error() -> None:
    labels = torch.tensor([[1, 2, 3], [-100, -100, -100]])
    with pytest.raises(PoiseError, match="no target token"):
        target_positions(labels)
    tokenizer = tiny_tokenizer()
    batch = batch_of(tokenizer, "right")
    batch["labels"][1] = -100
    with pytest.raises(PoiseError, match="no target token"):  # the same error as per_example_losses
        model_losses(tiny_llama(tokenizer), batch)
    with pytest.raises(PoiseError, match="no target token"):
        per_example_losses(torch.zeros(*batch["labels"].shape, len(tokenizer)), batch["labels"])


def test_the_pool_reader_and_losses_agree_on_counts(tmp_path) -> None:
    from tiny import write_jsonl

    tokenizer = tiny_tokenizer()
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y z"}]}])
    _, tokenized, _ = tokenize_examples(read_examples(tmp_path / "p.jsonl"), tokenizer, 64, progress=False)
    batch = collate(tokenized, tokenizer.pad_token_id)
    _, _, targets, counts = target_positions(batch["labels"])
    assert int(counts[0]) == sum(1 for t in tokenized[0].labels[1:] if t != -100) == len(targets)
