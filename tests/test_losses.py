"""`model_losses` (logits at target positions only) equals the full-logit loss: padding on either side,
multi-turn masks, through a peft LoRA model, and falls back to full logits when the head is not called."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from tolerances import gamma

from poise.data import collate, read_examples, tokenize_examples
from poise.errors import PoiseError
from poise.losses import model_losses, per_example_losses, target_positions


def batch_of(tokenizer, padding_side: str) -> dict[str, torch.Tensor]:
    rows = [
        [{"role": "user", "content": "add two and three"}, {"role": "assistant", "content": "five"}],
        [{"role": "system", "content": "be short"}, {"role": "user", "content": "def add(a, b):"},
         {"role": "assistant", "content": "return a + b"}, {"role": "user", "content": "and sub?"},
         {"role": "assistant", "content": "return a - b then the end of the long answer"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    ]
    from poise.data import Example

    examples = [Example(id=str(k), messages=m, input_ids=None, labels=None, task=None, where="test")
                for k, m in enumerate(rows)]
    _, tokenized, _ = tokenize_examples(examples, tokenizer, 128, progress=False)
    return collate(tokenized, tokenizer.pad_token_id, padding_side)


def loss_bound(model, batch) -> torch.Tensor:
    """Per example: two float32 computations of the same logits (dot products of length h, in another
    blocking) differ by at most 2*gamma_h*sum|h_k w_k| per logit; a token's cross-entropy moves by at most
    twice its logits' error; the mean over the example's tokens adds its own summation error."""
    with torch.no_grad():
        hidden = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")},
                       output_hidden_states=True).hidden_states[-1]
        head = model.get_output_embeddings().weight
        rows, positions, _, counts = target_positions(batch["labels"])
        worst = (hidden[rows, positions].abs() @ head.abs().T).amax(dim=1)  # (n,)
        per_token = 2 * 2 * gamma(hidden.shape[-1]) * worst
        bound = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, rows, per_token.double()) / counts
        full = per_example_losses(model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")})
                                  .logits, batch["labels"])
    return bound + 2 * gamma(int(counts.max())) * full.double().abs()


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


def test_through_a_peft_lora_model_losses_and_gradients_equal_the_full_logit_ones() -> None:
    from poise.model import attach_lora

    tokenizer = tiny_tokenizer()
    model = attach_lora(tiny_llama(tokenizer), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    batch = batch_of(tokenizer, "right")
    losses, output = model_losses(model, batch)
    assert output.logits.shape[0] == 1
    losses.sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full = per_example_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    position_ids=batch["position_ids"]).logits, batch["labels"])
    full.sum().backward()
    assert torch.allclose(losses, full, rtol=0, atol=float(loss_bound(model, batch).max()))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            scale = float(parameter.grad.abs().max())
            assert torch.allclose(fast[name], parameter.grad, rtol=0, atol=1e-5 * scale), name


def test_a_model_whose_head_is_not_called_gets_the_full_logits() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer).eval()
    batch = batch_of(tokenizer, "right")

    class NoHead(torch.nn.Module):  # a wrapper without get_output_embeddings: no hook, full logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    with torch.no_grad():
        losses, output = model_losses(NoHead(model), batch)
        full = per_example_losses(output.logits, batch["labels"])
    assert output.logits.shape[:2] == batch["input_ids"].shape
    assert torch.equal(losses, full)


def test_an_example_without_targets_is_an_error() -> None:
    labels = torch.tensor([[1, 2, 3], [-100, -100, -100]])
    with pytest.raises(PoiseError, match="no target token"):
        target_positions(labels)


def test_the_pool_reader_and_losses_agree_on_counts(tmp_path) -> None:
    from tiny import write_jsonl

    tokenizer = tiny_tokenizer()
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y z"}]}])
    _, tokenized, _ = tokenize_examples(read_examples(tmp_path / "p.jsonl"), tokenizer, 64, progress=False)
    batch = collate(tokenized, tokenizer.pad_token_id)
    _, _, targets, counts = target_positions(batch["labels"])
    assert int(counts[0]) == sum(1 for t in tokenized[0].labels[1:] if t != -100) == len(targets)
