"""Render conversations to tokens and mark which tokens are trained on (assistant-only labels).

A conversation is rendered with the tokenizer's own chat template when it has one, else with the tulu
template that LESS and open-instruct use (`<|user|>\\n…\\n<|assistant|>\\n…</s>\\n`). Only the tokens of
assistant contents, plus the end-of-turn / EOS token that closes each assistant turn, are targets; every
system and user token, every role header and the newline after an end-of-turn token get label -100.

The boundaries come from the template itself, not from guessing at its markup: for the k-th message, an
assistant one, the conversation up to message k is rendered with the generation prompt (so it ends with
the assistant header) and up to message k + 1 (so it ends after the turn). Their token counts are the
span of the turn, provided each prefix tokenises to a prefix of the whole conversation's tokens; when a
token straddles a boundary, character offsets of a fast tokenizer locate it instead. Rendered chat text is
tokenised with `add_special_tokens=False`: chat templates write their own BOS, so it is never added twice
(the tulu template writes none, so the tokenizer's BOS is prepended when it normally adds one).

Two modes label exactly as LESS does instead (`_Encoder._encode_less`): `tulu-less` is LESS's
`encode_with_messages_format` (the tulu text as it is, so the newline after every EOS, the last one included,
is a target; the tokenizer's own call adds its special tokens and truncates; every non-system/user token is a
target), and `plain` is LESS's validation rows (prompt + completion, no template, no EOS, the prompt's tokens
masked). Both mask by prefix token counts, as LESS does, even where a token straddles a boundary.

Examples with no target token left after truncation to `max_seq_length` are excluded and reported: LESS
silently keeps them and gives them identical nonzero Adam features (docs/design.md §2.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from poise.data.formats import IGNORE_INDEX, Example
from poise.errors import PoiseError, warn
from poise.options import TEMPLATES, Template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ChatTemplate = Template  # the alias lives in poise.options
"""How conversations are rendered: the tokenizer's chat template when it has one ("auto"), always it ("chat"),
the LESS/open-instruct tulu template ("tulu"), or LESS's own labelling ("tulu-less", "plain")."""

TULU_TEMPLATE: dict[str, str] = {
    "system": "<|system|>\n{content}\n",
    "user": "<|user|>\n{content}\n",
    "assistant": "<|assistant|>\n{content}{eos}\n",
}
"""The tulu format of open-instruct's `encode_with_messages_format`, used by LESS; content is stripped."""

TULU_GENERATION_PROMPT = "<|assistant|>\n"
"""The assistant header alone: what the tulu template writes before an assistant's content."""

CHUNK = 256
"""Examples rendered and tokenised per batched tokenizer call."""

MAX_WARNINGS = 20
"""Exclusions reported one line each; the rest are summarised in one line (all are returned)."""

PROGRESS_FROM = 2000
"""Show progress (a bar on a terminal, log lines otherwise) from this many examples on."""


@dataclass
class Tokenized:
    """Token ids of one example and its labels (the token id where trained on, -100 elsewhere)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render_tulu(messages: Sequence[dict], eos_token: str, add_generation_prompt: bool = False) -> str:
    """The conversation in the tulu format (each content stripped), optionally ending with the assistant header."""
    text = "".join(TULU_TEMPLATE[m["role"]].format(content=m["content"].strip(), eos=eos_token) for m in messages)
    return text + (TULU_GENERATION_PROMPT if add_generation_prompt else "")


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                     template: ChatTemplate = "auto") -> Tokenized:
    """Render and tokenise one example with assistant-only labels, truncated to `max_seq_length` tokens.

    The result may have no target token (see `tokenize_examples`, which excludes and reports those).
    """
    return _Encoder(tokenizer, template, max_seq_length).encode([example])[0][0]


def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                      template: ChatTemplate = "auto", progress: bool = True,
                      ) -> tuple[list[int], list[Tokenized], list[tuple[Example, str]]]:
    """Tokenise every example; drop those without a target token within `max_seq_length`.

    Returns (indices of the kept examples, their `Tokenized`, the excluded examples with the reason).
    Each exclusion is reported by a `PoiseWarning` naming where the example is and its id; if every
    example is excluded, a `PoiseError` is raised instead.
    """
    if not examples:
        raise PoiseError("no examples to tokenize")
    return _tokenize(examples, tokenizer, max_seq_length, template, progress)


def _tokenize(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
              template: ChatTemplate, progress: bool) -> tuple[list[int], list[Tokenized], list[tuple[Example, str]]]:
    encoder = _Encoder(tokenizer, template, max_seq_length)
    kept: list[int] = []
    tokenized: list[Tokenized] = []
    excluded: list[tuple[Example, str]] = []
    from poise.progress import track

    with track("tokenize", len(examples), enabled=progress and len(examples) >= PROGRESS_FROM) as bar:
        for start in range(0, len(examples), CHUNK):
            chunk = examples[start:start + CHUNK]
            for offset, (item, reason) in enumerate(encoder.encode(chunk)):
                if reason is None:
                    kept.append(start + offset)
                    tokenized.append(item)
                else:
                    excluded.append((chunk[offset], reason))
            bar.advance(len(chunk), tokens=sum(len(t.input_ids) for t in tokenized[-len(chunk):]))
    for example, reason in excluded[:MAX_WARNINGS]:
        warn(f"{example.where} (id '{example.id}'): {reason}; excluded")
    if len(excluded) > MAX_WARNINGS:
        warn(f"... and {len(excluded) - MAX_WARNINGS} more examples excluded for having no target token")
    if not kept:
        example, reason = excluded[0]
        raise PoiseError(f"all {len(examples)} examples were excluded; the first, {example.where} "
                         f"(id '{example.id}'): {reason}")
    return kept, tokenized, excluded


# ------------------------------------------------------------------------------------ internals
@dataclass
class _Plan:
    """What to tokenise for one conversation: its full text and, per assistant turn, the text before its
    content (header included) and the text up to the end of the turn; both prefixes of `full`."""

    full: str
    turns: list[tuple[str, str]]


class _Encoder:
    """Renders conversations for one tokenizer and template and turns them into labelled tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, max_seq_length: int) -> None:
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
            raise PoiseError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
        if template not in TEMPLATES:
            raise PoiseError(f"unknown template {template!r} (expected {', '.join(TEMPLATES)})")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise PoiseError("template 'chat' was asked for but the tokenizer has no chat template; "
                             "use 'tulu' or 'auto'")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.kind = "chat" if template == "chat" or (template == "auto" and has_chat) else \
            template if template in ("tulu-less", "plain") else "tulu"
        # LESS's own labelling (tulu-less: encode_with_messages_format; plain: its validation rows), restated
        # in `_encode_less`: the tokenizer's own call, special tokens and truncation included, and masks by
        # prefix token counts. Its rules differ from poise's own (see the module docstring there).
        self.less = self.kind in ("tulu-less", "plain")
        special = tokenizer.num_special_tokens_to_add() if self.less else 0
        if max_seq_length < special:  # the tokenizer's own truncation cannot honour it (it returns everything)
            raise PoiseError(f"max_seq_length={max_seq_length} is less than the {special} special tokens the tokenizer "
                             f"adds to every sequence, which template {template!r} keeps as LESS does")
        self.eos = tokenizer.eos_token or ""
        self.prefix: list[int] = []
        if self.kind == "tulu" and tokenizer.bos_token_id is not None:
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            if probe[:1] == [tokenizer.bos_token_id]:  # the tokenizer adds BOS itself (Llama); LESS keeps it
                self.prefix = [tokenizer.bos_token_id]
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = set(tokenizer.all_special_ids) | {i for i, t in decoder.items() if t.special}
        self._blank: dict[int, bool] = {}
        self.generation_prompt = True
        if self.kind == "chat":  # does the template write an assistant header for add_generation_prompt?
            probe = [{"role": "user", "content": "x"}]
            try:
                self.generation_prompt = self.render(probe, True, "") != self.render(probe, False, "")
            except PoiseError:  # a template with its own rules (a system message first, ...): assume it has one
                pass

    # -------------------------------------------------------------------------------- rendering
    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        if self.kind in ("tulu", "tulu-less"):
            return render_tulu(messages, self.eos, add_generation_prompt)
        if self.kind == "plain":  # LESS's validation rows: prompt + completion, no template, no EOS
            return "".join(m["content"] for m in messages)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja2 TemplateError, or the template's own raise_exception()
            raise PoiseError(f"{where}: the tokenizer's chat template refused this conversation "
                             f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
                             ) from None
        if not isinstance(text, str):
            raise PoiseError(f"{where}: the tokenizer's chat template did not return text")
        return text

    def plan(self, example: Example) -> _Plan:
        messages = example.messages or []
        full = self.render(messages, False, example.where)
        turns = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            end = full if k == len(messages) - 1 else self.render(messages[:k + 1], False, example.where)
            head = self._head(messages, k, end, example.where)
            if not (full.startswith(head) and full.startswith(end) and len(head) <= len(end)):
                raise PoiseError(f"{example.where}: the chat template renders the first {k + 1} messages differently "
                                 "from the start of the whole conversation, so the assistant turns cannot be located "
                                 "(templates that rewrite earlier turns do this); use template='tulu'")
            turns.append((head, end))
        return _Plan(full, turns)

    def _head(self, messages: list[dict], k: int, end: str, where: str) -> str:
        """The text before the content of assistant message k: messages[:k] and the assistant header."""
        if self.kind != "chat" or (k > 0 and self.generation_prompt):
            return self.render(messages[:k], True, where)
        # a chat template cannot render an empty conversation (k = 0), and one without a generation prompt
        # cannot render the header alone: cut the rendered turn just before its content instead
        content = messages[k]["content"]
        at = end.rfind(content.strip()) if content.strip() else -1
        lead = content[:len(content) - len(content.lstrip())]  # kept by templates that do not strip
        if at > 0 and lead and end[:at].endswith(lead):
            at -= len(lead)
        if at < 0:
            why = "it opens the conversation" if k == 0 else "the template has no generation prompt"
            raise PoiseError(f"{where}: cannot find where the content of message {k + 1} (assistant) starts in the "
                             f"chat template's rendering ({why}); use template='tulu'")
        return end[:at]

    # -------------------------------------------------------------------------------- tokenising
    def encode(self, examples: Sequence[Example]) -> list[tuple[Tokenized, str | None]]:
        """(tokenized, None) or (tokenized without a target, the reason) for each example."""
        if self.less:
            return self._encode_less(examples)
        plans: list[_Plan | None] = [None if e.messages is None else self.plan(e) for e in examples]
        texts: list[str] = []
        index: dict[str, int] = {}
        for plan in plans:
            if plan is None:
                continue
            for text in [plan.full, *(t for turn in plan.turns for t in turn)]:
                if text not in index:
                    index[text] = len(texts)
                    texts.append(text)
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        results = []
        for example, plan in zip(examples, plans, strict=True):
            if plan is None:
                results.append(self._given(example))
                continue
            full_ids = list(ids[index[plan.full]])
            spans = self._token_spans(plan, [(ids[index[h]], ids[index[e]]) for h, e in plan.turns], full_ids,
                                      example)
            labels = [IGNORE_INDEX] * len(full_ids)
            for start, end in spans:
                end = self._trim_blank_tail(full_ids, start, end)
                labels[start:end] = full_ids[start:end]
            if not plan.turns:
                results.append(self._finish(self.prefix + full_ids, [IGNORE_INDEX] * len(self.prefix) + labels,
                                            "no assistant turn to train on"))
            else:
                results.append(self._finish(self.prefix + full_ids, [IGNORE_INDEX] * len(self.prefix) + labels))
        return results

    def _encode_less(self, examples: Sequence[Example]) -> list[tuple[Tokenized, str | None]]:
        """LESS's labelling, as its `encode_with_messages_format` (tulu-less) and validation `tokenize` (plain) do.

        - The rendered text as it is (tulu-less: every assistant turn, the last included, ends with EOS and a
          newline; plain: the contents concatenated) is tokenised by one call of the tokenizer with its special
          tokens (BOS, or whatever its post-processor adds), truncated to `max_seq_length` by that call.
        - Labels start as the ids. Each non-assistant message is masked from the token count of the text
          before it (0 for the first message) to the token count of the text up to it, plus the assistant
          header when an assistant message follows; every count comes from the same kind of call. The loop
          stops after a mask that reaches `max_seq_length`.
        - Everything else is a target: assistant contents, their EOS and the newline after it, and the header of
          an assistant message that follows another.
        """
        header = TULU_GENERATION_PROMPT if self.kind == "tulu-less" else ""
        texts: list[str] = []
        index: dict[str, int] = {}

        def slot(text: str) -> int:
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
            return index[text]

        plans: list[tuple[int, list[tuple[int | None, int]], bool] | None] = []
        for example in examples:
            messages = example.messages
            if messages is None:
                plans.append(None)
                continue
            full = slot(self.render(messages, False, example.where))
            masks = []
            for k, message in enumerate(messages):
                if message["role"] == "assistant":
                    continue
                start = None if k == 0 else slot(self.render(messages[:k], False, example.where))
                upto = self.render(messages[:k + 1], False, example.where)
                if k + 1 < len(messages) and messages[k + 1]["role"] == "assistant":
                    upto += header
                masks.append((start, slot(upto)))
            plans.append((full, masks, any(m["role"] == "assistant" for m in messages)))
        ids = self.tokenizer(texts, max_length=self.max_seq_length, truncation=True,
                             verbose=False)["input_ids"] if texts else []
        results = []
        for example, plan in zip(examples, plans, strict=True):
            if plan is None:
                results.append(self._given(example))
                continue
            full, masks, has_assistant = plan
            input_ids = list(ids[full])
            labels = list(input_ids)
            for start, upto in masks:
                lo, hi = 0 if start is None else len(ids[start]), len(ids[upto])
                labels[lo:hi] = [IGNORE_INDEX] * len(labels[lo:hi])
                if hi >= self.max_seq_length:
                    break
            reason = None
            if not has_assistant:
                reason = "no assistant turn to train on"
            elif all(label == IGNORE_INDEX for label in labels):
                reason = f"no target tokens within max_seq_length={self.max_seq_length}"
            results.append(self._finish(input_ids, labels, reason))
        return results

    def _token_spans(self, plan: _Plan, prefix_ids: list[tuple[list[int], list[int]]], full_ids: list[int],
                     example: Example) -> list[tuple[int, int]]:
        spans = []
        for head, end in prefix_ids:
            if full_ids[:len(head)] != list(head) or full_ids[:len(end)] != list(end):
                return self._offset_spans(plan, example)
            spans.append((len(head), len(end)))
        return spans

    def _offset_spans(self, plan: _Plan, example: Example) -> list[tuple[int, int]]:
        """Token spans from character offsets, for when a token straddles a turn boundary."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise PoiseError(f"{example.where}: a token spans an assistant-turn boundary (a prefix of the conversation "
                             "does not tokenise to a prefix of its tokens) and this slow tokenizer has no character "
                             "offsets to locate it; use a fast tokenizer or template='tulu'")
        offsets = self.tokenizer(plan.full, add_special_tokens=False, return_offsets_mapping=True,
                                 verbose=False)["offset_mapping"]
        spans = []
        for head, end in plan.turns:
            lo, hi = len(head), len(end)
            inside = [t for t, (a, b) in enumerate(offsets) if b > lo and a < hi]  # tokens overlapping the turn
            spans.append((inside[0], inside[-1] + 1) if inside else (0, 0))
        return spans

    def _trim_blank_tail(self, ids: list[int], start: int, end: int) -> int:
        """Drop the whitespace a template writes after an end-of-turn token (e.g. ChatML's '<|im_end|>\\n')."""
        while end > start and self._is_blank(ids[end - 1]):
            end -= 1
        return end

    def _is_blank(self, token: int) -> bool:
        if token not in self._blank:
            self._blank[token] = token not in self.special_ids and not self.tokenizer.decode([token]).strip()
        return self._blank[token]

    def _given(self, example: Example) -> tuple[Tokenized, str | None]:
        input_ids = list(example.input_ids or [])
        labels = list(example.labels) if example.labels is not None else list(input_ids)
        reason = None if any(label != IGNORE_INDEX for label in labels) else "no target tokens (every label is -100)"
        return self._finish(input_ids, labels, reason)

    def _finish(self, input_ids: list[int], labels: list[int], reason: str | None = None,
                ) -> tuple[Tokenized, str | None]:
        cut = self.max_seq_length
        item = Tokenized(input_ids[:cut], labels[:cut])
        if reason is None and not any(label != IGNORE_INDEX for label in item.labels):
            prompt = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), None)
            if prompt is None:
                reason = "no target tokens (the assistant turns are empty)"
            else:
                reason = f"no target tokens within max_seq_length={cut} (prompt is {prompt} tokens)"
        return item, reason


def render_prompt(messages: Sequence[dict], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate = "auto",
                  where: str = "") -> str:
    """The text a model continues for `messages` (ending with a user turn): rendered exactly as training data
    is (the same template and rules), followed by the assistant header."""
    return _Encoder(tokenizer, template, 1).render(list(messages), True, where)
