"""Benchmark of gradient-feature extraction (docs/design.md §2.3): poise's batched sjlt path against the floor
and a LESS-style reference.

Claim measured: exact per-example LoRA gradients from one batched forward/backward with hooks, the LESS
Adam map and a sparse JL (sjlt) projection to d = 8192 cost little more than computing the gradients at
all, and are far faster than LESS's way on a CPU (one example at a time, the full gradient vector, a
dense Rademacher matrix regenerated in blocks on every call as TRAK's CPU `BasicProjector` does).
Acceptance targets: sjlt >= 20x the LESS-style reference in examples/s, and sjlt within 1.3x of the
floor (floor time / sjlt time >= 1/1.3).

Setup, the same for every variant: SmolLM2-135M-Instruct (`smollm2-135m`, float32, CPU) with LESS's LoRA
(r=128, alpha=512, dropout 0.1 on q/k/v/o; eval mode, so no dropout), every LoRA parameter set to small
random values under a seed (peft's lora_B starts at zero, which would make lora_A's gradients zero), random
positive Adam moments, and the same deterministic chat-template examples of mixed length (40-300 tokens),
batched by `token_budget_batches` and padded by `collate` before any timing. `--random-init` builds the
model from the config alone (same shapes, random weights): it costs the same arithmetic.

Variants (examples/s each; every variant is warmed up before it is timed):

1. `floor`: a plain batched forward + `loss.backward()` of the sum of per-example mean losses with the
   LoRA parameters requiring grad: no hooks, no Adam map, no projection. This is the cost of computing
   the gradients once.
2. `poise sjlt`: the inner loop of `poise features --kind adam` (stage.py), with the functions it calls:
   `capture_lora_gradients` + `backward_per_example`, `adam_direction` (LESS formula) in the sink,
   `SJLTProjector.add` to d, then L2 normalisation. Model loading, tokenisation, collation and writing
   the feature store are outside the timed loop. Timed over all batches, `--repeat` times, interleaved
   with the floor batch by batch (each batch runs every variant back to back, in an order that rotates);
   the median pass is reported, and the ratios of each batch's fastest run as a check on the load.
3. `poise rademacher`: the same loop with the dense Rademacher projector (Philox bits regenerated per
   call). Slow, so it is timed on `--slow-batches` batch(es) of median length and reported per example.
4. `LESS-style reference`: batch size 1, `loss.backward()` over the LoRA parameters, the gradients
   flattened and concatenated into one n-vector, LESS's Adam formula, then TRAK's `BasicProjector`
   scheme with LESS's settings (block_size=128): for each of the d/128 column blocks, a
   `torch.Generator` is seeded with seed + 1000*block, an n x 128 block of the +-1 matrix is drawn with
   `bernoulli_(0.5)`, mapped to +-1, multiplied and written; nothing is cached across examples. One
   example needs n*d = 121 billion random draws (over 20 minutes on 2 cores), so only `--less-blocks` of
   the d/128 column blocks are timed per example, over all n rows, and the projection time is scaled by
   (d/128) / less_blocks: every column block does identical work. The rows are streamed in chunks of
   8 MB, which can only be faster than TRAK's single n x 128 allocation. Forward/backward, concatenation and
   the Adam map are measured in full. A second row projects 16 examples per call, as LESS's
   `collect_grads` does (project_interval = 16), which shares one matrix generation among 16 examples.

5. `poise sjlt, full logits (before)`: the same loop with the loss computed from the full (b, t, V) logits, as
   before the LM head was restricted to the target positions (`poise.losses.model_losses`). Interleaved
   with the two above. The ratio to it is what computing logits at target positions only buys.

Peak memory per batch (`--memory`): for the floor and the two sjlt variants, a fresh process runs the batch
with the most padded tokens once, sampling its resident set size every millisecond; the table gives the
peak minus the RSS just before the batch (fresh processes and no warm-up, because an allocator keeps freed
memory; the first run's one-time allocations are in every variant's number alike).
`--data demo` takes the examples from poise's demo pool (`poise data demo`: reasoning-gym questions with
short answers, so most tokens are prompt) instead of the synthetic chats (whose answers are most tokens).
`--prompt-share 0.6` gives the synthetic chats a context paragraph before the question so that about 60%
of the tokens are prompt (masked), a realistic instruction-tuning split; the summary reports the share
measured, and the logit rows (and bytes) the full-logit and target-position paths build.

A breakdown of one instrumented sjlt pass (per-example einsum, Adam map, the three steps of the sjlt
projection, normalisation, the rest = forward + backward) follows the table; the instrumented features
are checked to equal the timed path's bit for bit.

Run from the repository root:

    .venv/bin/python benchmarks/bench_features.py --repeat 3 --markdown /tmp/features.md
    .venv/bin/python benchmarks/bench_features.py --random-init    # same shapes, no weights needed
    .venv/bin/python benchmarks/bench_features.py --quick          # seconds; tiny random Llama, a smoke test
    .venv/bin/python benchmarks/bench_features.py --data demo --skip rademacher,less --memory   # target positions
    .venv/bin/python benchmarks/bench_features.py --prompt-share 0.6 --examples 32 --skip rademacher,less --memory
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import poise
from poise.data import Example, collate, token_budget_batches, tokenize_examples
from poise.features import capture
from poise.features.capture import backward_per_example, capture_lora_gradients, lora_linear_modules
from poise.features.precondition import adam_direction
from poise.features.projection import make_projector
from poise.losses import per_example_losses

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_select import Table, command_line, fmt_s  # noqa: E402
from bench_select import machine as base_machine  # noqa: E402

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
LESS_BLOCK = 128  # LESS's collect_grads: BasicProjector(block_size=128)
LESS_GROUP = 16  # LESS's collect_grads: project_interval = 16 examples per projector call

# ------------------------------------------------------------------------------------------- examples
PROMPTS = [
    "Explain how photosynthesis works in simple terms.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main causes of inflation, and how do central banks respond?",
    "Summarize the plot of a detective story in which the butler is innocent.",
    "Solve for x: 3x + 7 = 25. Show your steps.",
    "Give me three tips for writing clear technical documentation.",
    "Translate into French: 'The library opens at nine and closes at six.'",
    "How do I reverse a linked list in place? Explain the algorithm.",
    "Compare the advantages of trains and airplanes for a 500 km trip.",
    "Write a short, polite email declining a meeting invitation.",
    "What is the difference between a list and a tuple in Python?",
    "Describe the water cycle for a ten-year-old.",
    "A shop sells pens at 3 dollars each and notebooks at 5 dollars. How much do 4 pens and 2 notebooks cost?",
    "List the steps to set up a small vegetable garden on a balcony.",
    "Why is the sky blue? Answer with a physical explanation.",
    "Write a haiku about autumn rain, then explain its imagery.",
]

SENTENCES = [
    "First, it helps to define the terms precisely, because the rest of the answer depends on them.",
    "In short, the process converts light energy into chemical energy stored in sugar molecules.",
    "Here is a straightforward implementation:\n\n```python\ndef is_palindrome(text):\n"
    "    cleaned = ''.join(ch.lower() for ch in text if ch.isalnum())\n    return cleaned == cleaned[::-1]\n```",
    "Subtract 7 from both sides to get 3x = 18, then divide both sides by 3, so x = 6.",
    "Central banks usually raise interest rates, which makes borrowing more expensive and slows spending.",
    "A tuple is immutable, so it can be used as a dictionary key, while a list can be changed in place.",
    "Keep each sentence short, put the most important information first and use consistent terminology.",
    "The total is 4 x 3 + 2 x 5 = 12 + 10 = 22 dollars.",
    "Water evaporates from oceans and lakes, condenses into clouds and falls back as rain or snow.",
    "Thank you very much for the invitation; unfortunately I have a prior commitment at that time.",
    "Walk the list with three pointers: previous, current and next, and flip each link as you go.",
    "Trains go from city centre to city centre, so the door-to-door time is often shorter.",
    "Shorter wavelengths of sunlight are scattered much more strongly by air molecules than longer ones.",
    "Choose containers with drainage holes, a light potting mix and plants that like partial shade.",
    "La bibliotheque ouvre a neuf heures et ferme a dix-huit heures.",
    "Make sure every example you give can be run as written, and state the expected output.",
    "Finally, check the result by substituting it back into the original equation.",
    "This approach runs in linear time and uses constant extra memory.",
    "As a rule of thumb, review the draft once for content and once more for tone.",
    "The image of rain on fallen leaves suggests both loss and renewal.",
    "Airplanes are faster in the air, but security checks and transfers add a lot of time.",
    "If the budget is tight, start with herbs and lettuce, which grow quickly and forgive mistakes.",
    "For example, if prices rise by 5% a year, money loses about a third of its value in eight years.",
    "I hope this helps; let me know if you would like a more detailed explanation of any step.",
]


def make_examples(tokenizer, count: int, lo: int, hi: int, seed: int,
                  prompt_share: float | None = None) -> list[Example]:
    """`count` deterministic one-turn chats whose rendered length spreads evenly over [lo, hi] tokens
    (each answer grows by a sentence until the chat template's tokens reach its target length).

    With `prompt_share`, the user turn first grows by context sentences (a "Context: ..." paragraph before
    the question) until the masked tokens (template, system prompt, user turn) are at least that share of
    the target length; the answer then fills the rest, so about that share of each example is prompt."""
    from poise.data import tokenize_example

    rng = random.Random(seed)
    targets = [round(lo + (hi - lo) * k / max(count - 1, 1)) for k in range(count)]
    rng.shuffle(targets)
    examples = []

    def chat(k: int, prompt: str, answer: list[str]) -> Example:
        return Example(id=f"ex{k}", messages=[{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": " ".join(answer)}],
                       input_ids=None, labels=None, task="bench", where=f"bench[{k}]")

    for k, target in enumerate(targets):
        prompt = PROMPTS[k % len(PROMPTS)]
        if prompt_share:
            context: list[str] = []
            while len(context) <= 200:
                item = tokenize_example(chat(k, prompt, ["."]), tokenizer, 100_000)
                if len(item) - item.n_targets >= prompt_share * target:
                    break
                context.append(rng.choice(SENTENCES))
                prompt = "Context: " + " ".join(context) + "\n\n" + PROMPTS[k % len(PROMPTS)]
        answer: list[str] = []
        while True:
            answer.append(rng.choice(SENTENCES))
            example = chat(k, prompt, answer)
            if len(tokenize_example(example, tokenizer, 100_000)) >= target or len(answer) > 200:
                break
        examples.append(example)
    return examples


# ---------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace):
    """(model with LESS's LoRA in eval mode, tokenizer, description)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from poise.lora import attach_lora
    from poise.model import load_model, load_tokenizer, model_folder

    torch.manual_seed(args.seed)
    if args.quick:
        from tiny import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        base = tiny_llama(tokenizer, seed=args.seed, hidden=64, layers=2, heads=4, kv_heads=2)
        what = "tiny random-init Llama (tests/tiny.py: hidden 64, 2 layers), float32"
    elif args.random_init:
        config = AutoConfig.from_pretrained(model_folder(args.model))
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        tokenizer = load_tokenizer(args.model)
        what = f"{args.model}: random-init from its config (same shapes, no weights), float32"
    else:
        base = load_model(args.model, dtype="float32")
        tokenizer = load_tokenizer(args.model)
        what = f"{args.model}: pretrained weights (dequantised GGUF), float32"
    model = attach_lora(base, r=128, alpha=512, dropout=0.1, seed=args.seed).eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model, tokenizer, what


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def set_lora_grad(model, flag: bool) -> None:
    for param in lora_params(model).values():
        param.requires_grad_(flag)
        param.grad = None


def random_moments(shapes: dict[str, tuple[int, ...]], seed: int) -> tuple[dict, dict]:
    """Random Adam moments by parameter, flattened: exp_avg ~ 1e-4 N(0,1), exp_avg_sq > 0 (~1e-8)."""
    generator = torch.Generator().manual_seed(seed + 2)
    exp_avg, exp_avg_sq = {}, {}
    for name, shape in shapes.items():
        n_p = math.prod(shape)
        exp_avg[name] = torch.randn(n_p, generator=generator) * 1e-4
        exp_avg_sq[name] = (torch.randn(n_p, generator=generator) * 1e-4).square() + 1e-12
    return exp_avg, exp_avg_sq


# ------------------------------------------------------------------------------------------- variants
def floor_batch(model, batch: dict) -> None:
    """Plain LoRA forward + backward (LoRA params require grad); the batch-summed gradients land in .grad."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    per_example_losses(out.logits, batch["labels"]).sum().backward()
    for param in lora_params(model).values():
        param.grad = None


def poise_batch(model, batch: dict, projector, exp_avg: dict, exp_avg_sq: dict) -> torch.Tensor:
    """The inner loop of run_features for --kind adam (stage.py), with the same functions."""
    out = torch.zeros(batch["input_ids"].shape[0], projector.dim, dtype=torch.float32)

    def sink(name: str, grad: torch.Tensor) -> None:
        flat = grad.reshape(grad.shape[0], -1).float()  # (b, n_p)
        flat = adam_direction(flat, exp_avg[name], exp_avg_sq[name], beta1=BETA1, beta2=BETA2, eps=EPS, mode="less")
        projector.add(name, flat, out)

    with capture_lora_gradients(model, sink):
        backward_per_example(model, batch)
    return torch.nn.functional.normalize(out, dim=1)


def full_logit_losses(model, batch: dict, head=None, **forward) -> tuple[torch.Tensor, object]:
    """The loss as poise computed it before `model_losses`: from the full (b, t, V) logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False, **forward)
    return per_example_losses(out.logits, batch["labels"]), out


@contextlib.contextmanager
def full_logits():
    """Within the block, the features path computes its loss from the full logits (the old way)."""
    original = capture.model_losses
    capture.model_losses = full_logit_losses
    try:
        yield
    finally:
        capture.model_losses = original


def demo_examples(count: int, seed: int) -> list[Example]:
    """The first `count` examples of poise's demo pool (reasoning-gym questions, short answers)."""
    import tempfile

    from poise.data import read_examples
    from poise.data.demo import write_demo_data

    with tempfile.TemporaryDirectory() as folder:
        write_demo_data(folder, pool_size=max(count, 30), validation_per_task=1, heldout_per_task=1, seed=seed)
        return read_examples(Path(folder) / "pool.jsonl")[:count]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(fn: Callable[[], object]) -> int:
    """Peak resident set size while `fn` runs, minus the size just before (sampled every millisecond)."""
    import threading

    before = rss_bytes()
    peak = [before]
    running = [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        running[0] = False
        thread.join()
    return max(peak[0], rss_bytes()) - before


class Clock:
    """Accumulates wall time per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, label: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start


def instrumented_sjlt_batch(model, batch: dict, projector, exp_avg: dict, exp_avg_sq: dict,
                            clock: Clock) -> torch.Tensor:
    """`poise_batch` with sjlt, timing each step. The projection repeats `SJLTProjector._add`'s three
    statements so that they can be timed apart; the caller checks the result equals the real path's."""
    original = capture.per_example_linear_grad

    def timed_einsum(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        with clock("per-example einsum (hook)"):
            return original(x, delta)

    out = torch.zeros(batch["input_ids"].shape[0], projector.dim, dtype=torch.float32)

    def sink(name: str, grad: torch.Tensor) -> None:
        with clock("reshape/cast"):
            flat = grad.reshape(grad.shape[0], -1).float()
        with clock("Adam map (adam_direction)"):
            flat = adam_direction(flat, exp_avg[name], exp_avg_sq[name], beta1=BETA1, beta2=BETA2, eps=EPS,
                                  mode="less")
        h, s = projector.hash_and_sign(name)  # cached after the warm-up
        with clock("sjlt: index int32 -> int64 (h.long())"):
            index = h.long()
        with clock("sjlt: sign multiply (grad * s)"):
            signed = flat * s
        with clock("sjlt: out.index_add_"):
            out.index_add_(1, index, signed)

    capture.per_example_linear_grad = timed_einsum
    try:
        with clock("total"):
            with capture_lora_gradients(model, sink):
                backward_per_example(model, batch)
            with clock("L2 normalise"):
                values = torch.nn.functional.normalize(out, dim=1)
    finally:
        capture.per_example_linear_grad = original
    return values


def less_project(grads: torch.Tensor, n_blocks: int, dim: int, seed: int, chunk_rows: int,
                 clock: Clock | None = None) -> torch.Tensor:
    """TRAK BasicProjector (rademacher, block_size=128) on (G, n) gradients, first `n_blocks` column blocks.

    Column block i of the n x dim matrix comes from a torch.Generator seeded with seed + 1000*i, drawn
    with bernoulli_(0.5) and mapped to +-1 (TRAK: `proj_matrix.bernoulli_(p=0.5, generator=...)`, `*= 2`,
    `-= 1`); it is streamed in chunks of rows (TRAK allocates all n x 128 at once) and never cached.
    """
    g, n = grads.shape
    sketch = torch.zeros(g, dim, dtype=torch.float32)
    chunk = torch.empty(min(chunk_rows, n), LESS_BLOCK, dtype=torch.float32)
    generator = torch.Generator()
    clock = clock or Clock()
    for block in range(n_blocks):
        start_col, stop_col = block * LESS_BLOCK, min((block + 1) * LESS_BLOCK, dim)
        generator.manual_seed(seed + 1000 * block)
        acc = sketch[:, start_col:stop_col]
        for start in range(0, n, chunk.shape[0]):
            rows = min(chunk.shape[0], n - start)
            part = chunk[:rows]
            with clock("generate"):
                part.bernoulli_(p=0.5, generator=generator)
                part.mul_(2.0).sub_(1.0)
            with clock("multiply"):
                acc.addmm_(grads[:, start:start + rows], part[:, : stop_col - start_col])
    return sketch


# ------------------------------------------------------------------------------------------------ misc
def machine_info() -> dict[str, str]:
    import peft
    import transformers

    info = base_machine()
    info.pop("load average at start", None)
    info.update({
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "torch threads": f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op",
    })
    return info


def load() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pick_evenly(count: int, k: int) -> list[int]:
    """k positions spread over range(count), centred (k=1: the middle one)."""
    k = max(1, min(k, count))
    return sorted({min(count - 1, int((j + 0.5) * count / k)) for j in range(k)})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base model (default smollm2-135m)")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights from the model's config instead of the pretrained ones")
    parser.add_argument("--examples", type=int, default=48, help="examples (default 48)")
    parser.add_argument("--min-tokens", type=int, default=40, help="shortest example, tokens (default 40)")
    parser.add_argument("--max-tokens-per-example", type=int, default=300,
                        help="longest example, tokens (default 300)")
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="token budget of a batch, as `poise features` (default 16384)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="most examples in a batch (default 8)")
    parser.add_argument("--dim", type=int, default=8192, help="projection dimension d (default 8192)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed passes of floor and sjlt over all batches, interleaved; median (default 3)")
    parser.add_argument("--slow-batches", type=int, default=1,
                        help="batches timed for poise rademacher (default 1, of median length)")
    parser.add_argument("--less-examples", type=int, default=2,
                        help="examples timed for the LESS-style reference (default 2, of median length)")
    parser.add_argument("--less-blocks", type=int, default=1,
                        help="column blocks of 128 projected per LESS example, then scaled (default 1)")
    parser.add_argument("--skip", default="", help="comma-separated variants to skip: rademacher,less")
    parser.add_argument("--seed", type=int, default=0, help="seed of model, LoRA, moments, data, projector")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama and sizes, for a smoke test")
    parser.add_argument("--data", choices=("synthetic", "demo"), default="synthetic",
                        help="synthetic chats (long answers) or poise's demo pool (short answers; needs reasoning-gym)")
    parser.add_argument("--prompt-share", type=float, default=None, metavar="P",
                        help="synthetic data: grow each prompt until about this share of the tokens is prompt "
                             "(masked), e.g. 0.6; default: short prompts, answers are most tokens")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each variant's peak memory on the largest batch, in fresh processes")
    parser.add_argument("--probe", choices=("floor", "sjlt", "sjlt-full"), help=argparse.SUPPRESS)
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as markdown to PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.min_tokens, args.max_tokens_per_example = 8, 20, 80
        args.max_batch_size, args.dim, args.repeat = 4, 512, 1
        args.threads = args.threads or 1  # tiny ops: two threads only add synchronisation on a busy machine
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip_set - {"rademacher", "less"}:
        parser.error("--skip takes rademacher and/or less")
    if min(args.examples, args.repeat, args.slow_batches, args.less_examples, args.less_blocks, args.dim) < 1:
        parser.error("counts must be positive")
    if args.prompt_share is not None and not 0 <= args.prompt_share < 1:
        parser.error("--prompt-share must be in [0, 1)")
    if args.prompt_share is not None and args.data == "demo":
        parser.error("--prompt-share shapes the synthetic data; the demo pool has its own prompts")
    if args.min_tokens > args.max_tokens_per_example:
        parser.error("--min-tokens must not exceed --max-tokens-per-example")
    return args


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore", poise.PoiseWarning)
    warnings.simplefilter("ignore", FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    cmd = command_line()
    load_start = load()
    print(f"command: {cmd}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"load average at start: {load_start}", flush=True)

    start = time.perf_counter()
    model, tokenizer, model_what = build_model(args)
    if args.data == "demo":
        examples = demo_examples(args.examples, args.seed)
    else:
        examples = make_examples(tokenizer, args.examples, args.min_tokens, args.max_tokens_per_example, args.seed,
                                 args.prompt_share)
    _, tokenized, _ = tokenize_examples(examples, tokenizer, 2048, progress=False)  # as the stage (default 2048)
    lengths = [len(t) for t in tokenized]
    targets = [t.n_targets for t in tokenized]
    batches = token_budget_batches(lengths, args.max_tokens, args.max_batch_size)
    pad_id = tokenizer.pad_token_id
    side = getattr(tokenizer, "padding_side", "right") or "right"
    collated = [collate([tokenized[i] for i in rows], pad_id, side) for rows in batches]
    padded = sum(c["input_ids"].numel() for c in collated)

    modules = lora_linear_modules(model)
    shapes = {name: tuple(m.weight.shape) for name, m in modules.items()}
    n = sum(math.prod(s) for s in shapes.values())
    exp_avg, exp_avg_sq = random_moments(shapes, args.seed)
    names = list(lora_params(model))
    assert names == list(shapes), "LoRA parameter order differs from lora_linear_modules"
    sjlt = make_projector("sjlt", args.dim, args.seed, shapes)
    rademacher = make_projector("rademacher", args.dim, args.seed, shapes)
    for name in shapes:
        sjlt.hash_and_sign(name)  # the stage builds these on its first batch; built once per run
    n_examples = len(tokenized)
    setup_s = time.perf_counter() - start

    print(f"model: {model_what}; LESS LoRA r=128 alpha=512 dropout 0.1 (eval) on q/k/v/o; "
          f"{len(shapes)} LoRA matrices, n = {n:,} LoRA parameters")
    print(f"examples: {n_examples}, tokens/example mean {statistics.mean(lengths):.1f}, median "
          f"{statistics.median(lengths):.0f}, min {min(lengths)}, max {max(lengths)}; target (assistant) "
          f"tokens/example mean {statistics.mean(targets):.1f}")
    print(f"batches: {len(batches)} (max_tokens {args.max_tokens}, max_batch_size {args.max_batch_size}, "
          f"{side} padding), sizes {[len(b) for b in batches]}, padded tokens {padded:,} "
          f"({padded / sum(lengths):.2f}x the real ones); d = {args.dim}; setup {setup_s:.1f} s", flush=True)

    if args.probe:  # one batch, one variant, in this fresh process: print the peak memory it took
        largest = max(range(len(batches)), key=lambda k: collated[k]["input_ids"].numel())
        batch = collated[largest]
        set_lora_grad(model, args.probe == "floor")
        if args.probe == "floor":
            run = lambda: floor_batch(model, batch)  # noqa: E731
        elif args.probe == "sjlt":
            run = lambda: poise_batch(model, batch, sjlt, exp_avg, exp_avg_sq)  # noqa: E731
        else:
            def run():
                with full_logits():
                    poise_batch(model, batch, sjlt, exp_avg, exp_avg_sq)
        # no warm-up: the allocator would keep the warm-up's freed memory and hide the batch's peak
        print(f"PROBE {args.probe} {peak_during(run)} {tuple(batch['input_ids'].shape)}")
        return 0

    # ------------------------------------------------------------------- floor and sjlt, interleaved
    def floor_pass(which: list[int]) -> list[float]:
        set_lora_grad(model, True)
        return [timed(lambda c=collated[k]: floor_batch(model, c)) for k in which]

    last_sjlt: dict[int, torch.Tensor] = {}  # features of the last timed sjlt pass, by batch

    def poise_pass(which: list[int], projector) -> list[float]:
        set_lora_grad(model, False)  # as the stage: load_adapter(..., trainable=False)
        record = projector is sjlt
        projector = projector or sjlt
        times = []
        for k in which:
            start = time.perf_counter()
            values = poise_batch(model, collated[k], projector, exp_avg, exp_avg_sq)
            times.append(time.perf_counter() - start)
            if record:
                last_sjlt[k] = values
        return times

    every = list(range(len(batches)))
    warm = [len(batches) - 1]  # the shortest batch
    floor_pass(warm)
    poise_pass(warm, sjlt)
    def full_pass(which: list[int]) -> list[float]:
        with full_logits():
            return poise_pass(which, None)

    with full_logits():
        poise_pass(warm, None)
    # Interleaved batch by batch: each batch runs the three variants back to back, in an order that rotates
    # with the batch and the pass, so that a change in the machine's load falls on all three alike.
    floor_runs, sjlt_runs, full_runs = [], [], []
    variants = [(floor_runs, floor_pass), (full_runs, full_pass), (sjlt_runs, lambda w: poise_pass(w, sjlt))]
    for r in range(args.repeat):
        for runs, _ in variants:
            runs.append([0.0] * len(every))
        for k in every:
            for j in range(len(variants)):
                runs, run_pass = variants[(r + k + j) % len(variants)]
                runs[-1][k] = run_pass([k])[0]
        print(f"  pass {r + 1}/{args.repeat}: floor {sum(floor_runs[-1]):.2f} s, sjlt with full logits "
              f"{sum(full_runs[-1]):.2f} s, sjlt {sum(sjlt_runs[-1]):.2f} s (load {load()})", flush=True)
    floor_s = statistics.median(sum(run) for run in floor_runs)
    sjlt_s = statistics.median(sum(run) for run in sjlt_runs)
    full_s = statistics.median(sum(run) for run in full_runs)
    paired = [sum(f) / sum(s) for f, s in zip(floor_runs, sjlt_runs, strict=True)]  # back-to-back passes
    paired_full = [sum(f) / sum(s) for f, s in zip(full_runs, sjlt_runs, strict=True)]

    def fastest(runs: list[list[float]]) -> float:  # each batch's fastest run, summed: load only adds time
        return sum(min(run[k] for run in runs) for k in every)

    # --------------------------------------------------------------------- breakdown of one sjlt pass
    set_lora_grad(model, False)
    clock = Clock()
    identical = all(torch.equal(last_sjlt[k], instrumented_sjlt_batch(model, collated[k], sjlt, exp_avg, exp_avg_sq,
                                                                      clock)) for k in every)
    print(f"  breakdown: instrumented sjlt pass {clock.seconds['total']:.2f} s", flush=True)

    # ------------------------------------------------------------------------------ poise rademacher
    rows: list[tuple[str, str, int, float, str]] = []  # variant, batch size, examples, seconds, how
    rows.append(("floor (LoRA fwd + loss.backward())", f"<= {args.max_batch_size}", n_examples, floor_s,
                 f"median of {args.repeat} passes over all {len(batches)} batches"))
    rows.append((f"poise sjlt, full logits (before) (d={args.dim})", f"<= {args.max_batch_size}", n_examples, full_s,
                 f"median of {args.repeat} passes over all {len(batches)} batches"))
    rows.append((f"poise sjlt (d={args.dim})", f"<= {args.max_batch_size}", n_examples, sjlt_s,
                 f"median of {args.repeat} passes over all {len(batches)} batches"))
    if "rademacher" not in args.skip_set:
        chosen = pick_evenly(len(batches), args.slow_batches)
        first = next(iter(shapes))
        rademacher.project({first: torch.zeros(1, math.prod(shapes[first]))})  # warm-up: one parameter
        times = poise_pass(chosen, rademacher)
        measured = sum(len(batches[k]) for k in chosen)
        rows.append((f"poise rademacher (d={args.dim})", f"<= {args.max_batch_size}", measured, sum(times),
                     f"batch(es) {', '.join(str(k) for k in chosen)} of {len(batches)} (median length), "
                     "warm-up on one parameter"))
        print(f"  rademacher: {measured} examples in {sum(times):.1f} s", flush=True)

    # --------------------------------------------------------------------------- LESS-style reference
    less_note = ""
    if "less" not in args.skip_set:
        blocks_total = math.ceil(args.dim / LESS_BLOCK)
        n_blocks = min(args.less_blocks, blocks_total)
        scale = blocks_total / n_blocks
        chunk_rows = max(1, (1 << 21) // LESS_BLOCK)  # 8 MB of float32 per chunk
        exp_avg_flat = torch.cat([exp_avg[name] for name in names])  # loaded once, as LESS does
        exp_avg_sq_flat = torch.cat([exp_avg_sq[name] for name in names])
        params = lora_params(model)
        order = sorted(range(n_examples), key=lambda i: (abs(lengths[i] - statistics.median(lengths)), i))
        set_lora_grad(model, True)

        def less_gradient(i: int, clock: Clock) -> torch.Tensor:
            item = tokenized[i]
            ids = torch.tensor([item.input_ids])
            with clock("forward + backward + concat"):
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            position_ids=torch.arange(ids.shape[1]).unsqueeze(0), use_cache=False)
                loss = per_example_losses(out.logits, torch.tensor([item.labels]))[0]
                loss.backward()
                vector = torch.cat([p.grad.view(-1) for p in params.values()])  # (n,)
                model.zero_grad()
            with clock("Adam map"):
                m = BETA1 * exp_avg_flat + (1 - BETA1) * vector
                v = BETA2 * exp_avg_sq_flat + (1 - BETA2) * vector**2
                vector = m / torch.sqrt(v + EPS)
            return vector.unsqueeze(0)  # (1, n)

        warm_clock = Clock()
        warm_grad = less_gradient(order[-1], warm_clock)
        less_project(warm_grad[:, : chunk_rows * 2], 1, args.dim, args.seed, chunk_rows)  # warm-up
        del warm_grad
        less_clock = Clock()
        chosen_examples = order[: args.less_examples]
        last = None
        for i in chosen_examples:
            last = less_gradient(i, less_clock)
            with less_clock("projection (measured blocks)"):
                sketch = less_project(last, n_blocks, args.dim, args.seed, chunk_rows, less_clock)
            with less_clock("L2 normalise"):
                torch.nn.functional.normalize(sketch, dim=1)
        fixed = less_clock.seconds["forward + backward + concat"] + less_clock.seconds["Adam map"]
        proj_measured = less_clock.seconds["projection (measured blocks)"]
        less_s = fixed + less_clock.seconds["L2 normalise"] + proj_measured * scale
        m_less = len(chosen_examples)
        rows.append(("LESS-style reference (TRAK BasicProjector)", "1", m_less, less_s,
                     f"examples {', '.join(f'{lengths[i]} tok' for i in chosen_examples)}; projection: "
                     f"{n_blocks} of {blocks_total} column blocks measured ({proj_measured:.1f} s), x{scale:g}"))
        # LESS projects 16 examples per call: one matrix generation shared by 16 rows.
        group_clock = Clock()
        stacked = last.expand(LESS_GROUP, -1).contiguous()  # values do not change the time
        with group_clock("projection (measured blocks)"):
            less_project(stacked, n_blocks, args.dim, args.seed, chunk_rows, group_clock)
        del stacked
        per_example_group = (fixed + less_clock.seconds["L2 normalise"]) / m_less + \
            group_clock.seconds["projection (measured blocks)"] * scale / LESS_GROUP
        rows.append((f"LESS-style, {LESS_GROUP} examples per projection call", "1 (grads), 16 (proj.)", m_less,
                     per_example_group * m_less,
                     f"grads as above; one {LESS_GROUP}-row projection of {n_blocks} block(s) "
                     f"({group_clock.seconds['projection (measured blocks)']:.1f} s) x{scale:g} / {LESS_GROUP}"))
        per_ex = {k: v / m_less for k, v in less_clock.seconds.items()}
        less_note = (
            "LESS-style reference per example: forward + backward + concat "
            f"{per_ex['forward + backward + concat']:.2f} s, "
            f"Adam map {per_ex['Adam map']:.3f} s, projection {per_ex['projection (measured blocks)'] * scale:.0f} s "
            f"(extrapolated from {per_ex['projection (measured blocks)']:.1f} s for {n_blocks} of {blocks_total} "
            f"column blocks: generate {per_ex['generate'] * scale:.0f} s, multiply {per_ex['multiply'] * scale:.1f} s)."
        )
        print(f"  LESS-style: {m_less} examples, {less_s:.0f} s extrapolated", flush=True)
        set_lora_grad(model, False)

    # ---------------------------------------------------------------------------------------- tables
    load_end = load()
    rate = {label: count / seconds for label, _, count, seconds, _ in rows}
    floor_rate = rows[0][2] / rows[0][3]
    less_label = next((r[0] for r in rows if r[0].startswith("LESS-style reference")), None)
    less_rate = rate.get(less_label) if less_label else None
    table = Table(f"Gradient features: examples/s on {n_examples} examples, n = {n:,} LoRA parameters, d = {args.dim}",
                  ["variant", "batch", "examples", "seconds", "examples/s", "vs floor", "vs LESS-style ref."])
    for label, bsz, count, seconds, how in rows:
        r = count / seconds
        table.add(label, bsz, count, fmt_s(seconds), f"{r:.4g}", f"{r / floor_rate:.3g}x",
                  f"{r / less_rate:,.0f}x" if less_rate else "-")
        table.notes.append(f"{label}: {how}.")
    table.notes.append("vs floor = examples/s / floor's examples/s (1/1.3 = 0.77 is the target for sjlt); "
                       "vs LESS-style ref. = examples/s / the reference's.")
    if less_note:
        table.notes.append(less_note)

    total = clock.seconds["total"]
    parts = [k for k in clock.seconds if k != "total"]
    accounted = sum(clock.seconds[k] for k in parts)
    breakdown = Table(f"Breakdown of one instrumented sjlt pass over the {len(batches)} batches "
                      f"(features identical to the timed path: {'yes' if identical else 'NO'})",
                      ["step", "where", "seconds", "share", "ms/example"])
    where = {"per-example einsum (hook)": "capture.per_example_linear_grad",
             "reshape/cast": "stage sink", "Adam map (adam_direction)": "precondition.adam_direction",
             "sjlt: index int32 -> int64 (h.long())": "SJLTProjector._add",
             "sjlt: sign multiply (grad * s)": "SJLTProjector._add",
             "sjlt: out.index_add_": "SJLTProjector._add", "L2 normalise": "stage"}
    breakdown.add("forward + backward (rest)", "model + autograd + hooks", fmt_s(total - accounted),
                  f"{(total - accounted) / total:.0%}", f"{(total - accounted) / n_examples * 1e3:.1f}")
    for k in parts:
        breakdown.add(k, where.get(k, ""), fmt_s(clock.seconds[k]), f"{clock.seconds[k] / total:.0%}",
                      f"{clock.seconds[k] / n_examples * 1e3:.1f}")
    breakdown.add("total (instrumented)", "", fmt_s(total), "100%", f"{total / n_examples * 1e3:.1f}")
    breakdown.add("floor pass (median, for comparison)", "", fmt_s(floor_s), f"{floor_s / total:.0%}",
                  f"{floor_s / n_examples * 1e3:.1f}")

    sjlt_rate = n_examples / sjlt_s
    extra_tables: list[Table] = []
    checks = [
        f"floor time / sjlt time = {floor_s / sjlt_s:.3f} (target >= {1 / 1.3:.3f}, i.e. sjlt within 1.3x of the "
        f"floor): {'met' if floor_s / sjlt_s >= 1 / 1.3 else 'MISSED'}; per back-to-back pass "
        f"{', '.join(f'{p:.3f}' for p in paired)} (median {statistics.median(paired):.3f})",
    ]
    checks.append(f"sjlt / floor in examples/s = {floor_s / sjlt_s:.3f} (target >= 1.1 with logits at target "
                  f"positions only): {'met' if floor_s / sjlt_s >= 1.1 else 'MISSED'}; sjlt / sjlt with full logits = "
                  f"{full_s / sjlt_s:.3f} (per back-to-back pass {', '.join(f'{p:.3f}' for p in paired_full)})")
    checks.append(f"with each batch's fastest of the {args.repeat} runs: sjlt / floor in examples/s = "
                  f"{fastest(floor_runs) / fastest(sjlt_runs):.3f}, sjlt / sjlt with full logits = "
                  f"{fastest(full_runs) / fastest(sjlt_runs):.3f}")
    if args.memory:
        memory = Table("Peak memory of one batch (the one with the most padded tokens): its first run in a fresh "
                       "process per variant (first-call allocations, the same for all, are included: compare the "
                       "differences)", ["variant", "batch shape", "peak RSS above the RSS before the batch"])
        for probe in ("floor", "sjlt-full", "sjlt"):
            given = list(argv if argv is not None else sys.argv[1:])
            kept, skip = [], False
            for word in given:  # this run's arguments, less --memory and --markdown PATH
                if skip:
                    skip = False
                elif word == "--markdown":
                    skip = True
                elif word != "--memory" and not word.startswith("--markdown="):
                    kept.append(word)
            command = [sys.executable, __file__, *kept, "--probe", probe]
            import subprocess

            result = subprocess.run(command, capture_output=True, text=True, check=False)
            line = next((ln for ln in result.stdout.splitlines() if ln.startswith("PROBE ")), None)
            if line is None:
                memory.add(probe, "-", f"failed: {result.stderr.strip().splitlines()[-1:]}")
                continue
            _, name, peak, shape = line.split(" ", 3)
            memory.add({"floor": "floor", "sjlt-full": "poise sjlt, full logits (before)", "sjlt": "poise sjlt"}[name],
                       shape, f"{int(peak) / 2**20:,.0f} MiB")
        extra_tables.append(memory)
    if less_rate:
        checks.append(f"sjlt / LESS-style reference = {sjlt_rate / less_rate:,.0f}x in examples/s (target >= 20x): "
                      f"{'met' if sjlt_rate / less_rate >= 20 else 'MISSED'}")
    vocab = model.get_output_embeddings().weight.shape[0]
    rows_full = [c["input_ids"].numel() for c in collated]  # logit rows of the full path: every position
    rows_gathered = [int((c["labels"][:, 1:] != -100).sum()) for c in collated]  # the target positions
    big = max(range(len(collated)), key=lambda k: rows_full[k])
    logits_note = (f"float32 logits (V = {vocab:,}) of the largest batch {tuple(collated[big]['input_ids'].shape)}: "
                   f"{rows_full[big] * vocab * 4 / 2**20:,.0f} MiB full, {rows_gathered[big] * vocab * 4 / 2**20:,.0f} "
                   f"MiB at its {rows_gathered[big]} target positions; over all batches {sum(rows_gathered):,} of "
                   f"{sum(rows_full):,} logit rows ({sum(rows_gathered) / sum(rows_full):.1%}); the softmax and the "
                   "logits' gradient are as large again each")
    summary = [f"model: {model_what}", f"n = {n:,} LoRA parameters ({len(shapes)} matrices), d = {args.dim}",
               f"examples ({args.data}): {n_examples}, target tokens/example mean {statistics.mean(targets):.1f}, "
               f"tokens/example mean {statistics.mean(lengths):.1f} (median "
               f"{statistics.median(lengths):.0f}, {min(lengths)}-{max(lengths)}), {len(batches)} batches of <= "
               f"{args.max_batch_size} (max_tokens {args.max_tokens}), padded tokens {padded:,}; prompt (masked) "
               f"tokens {1 - sum(targets) / sum(lengths):.1%} of the real tokens"
               + (f" (--prompt-share {args.prompt_share:g})" if args.prompt_share is not None else ""),
               logits_note,
               f"load average: {load_start} at start, {load_end} at end; peak RSS of the process "
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"]

    print()
    for line in summary:
        print(line)
    table.print()
    breakdown.print()
    for extra in extra_tables:
        extra.print()
    for line in checks:
        print(line)
    if args.markdown:
        lines = [f"Command: `{cmd}`", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
        lines += [f"- {line}" for line in summary] + [""]
        lines += [table.markdown(), breakdown.markdown(), *(extra.markdown() for extra in extra_tables)]
        lines += [f"- {line}" for line in checks] + [""]
        Path(args.markdown).write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
