"""Random projections of per-example gradients (poise.features.projection, docs/design.md §2.3)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from tolerances import assert_same_sums

from poise.errors import PoiseError
from poise.features import make_projector

SHAPES = {"layers.0.lora_A": (8, 32), "layers.0.lora_B": (48, 8), "head": (100,)}
RANDOM_KINDS = ["sjlt", "rademacher"]


def random_grads(batch: int, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, math.prod(shape), generator=gen) for name, shape in shapes.items()}


def explicit_matrix(projector, shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    """The projector's map as a dense (n, d) matrix, parameters in the order of `shapes`."""
    blocks = []
    for name, shape in shapes.items():
        n_p = math.prod(shape)
        if projector.kind == "sjlt":
            h, s = projector.hash_and_sign(name)
            dense = torch.zeros(n_p, projector.dim)
            dense[torch.arange(n_p), h.long()] = s.float()
        else:
            dense = projector.matrix_rows(name, 0, n_p)
        blocks.append(dense)
    return torch.cat(blocks)


def assert_same_projection(actual: torch.Tensor, expected: torch.Tensor, grads: dict[str, torch.Tensor],
                           matrix: torch.Tensor) -> None:
    """Equal up to float32 summation order: per feature, 2 gamma_n sum_i |g_i R_ij| (tests/tolerances.py)."""
    full = torch.cat(list(grads.values()), dim=1)  # (b, n)
    assert_same_sums(actual, expected, full.abs() @ matrix.abs(), n_terms=matrix.shape[0])


def contribution(projector, name: str, grad: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(grad.shape[0], projector.dim)
    projector.add(name, grad, out)
    return out


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_projection_depends_only_on_seed_name_and_shape(kind: str) -> None:
    grads = random_grads(6, SHAPES)
    first = make_projector(kind, 64, 3, SHAPES)
    expected = first.project(grads)  # (6, 64): parameters in order, one batch

    # Disturb every global generator: the projection must not draw from them.
    torch.manual_seed(12345)
    np.random.seed(54321)
    reordered = dict(reversed(list(SHAPES.items())))
    extra = {"block_rows": 7} if kind == "rademacher" else {}
    second = make_projector(kind, 64, 3, reordered, **extra)
    halves = []
    for rows in (slice(0, 2), slice(2, 6)):  # another batch split, parameters in reverse order
        out = torch.zeros(rows.stop - rows.start, 64)
        for name in reordered:
            second.add(name, grads[name][rows], out)
        halves.append(out)
    # the same sums in another order (blocks of 7 rows, parameters reversed): equal up to float32 rounding
    assert_same_projection(torch.cat(halves), expected, grads, explicit_matrix(first, SHAPES))

    # The random map of a parameter is the same even among other parameters (a projector for it alone).
    alone = make_projector(kind, 64, 3, {"head": (100,)})
    assert_same_projection(contribution(alone, "head", grads["head"]), contribution(first, "head", grads["head"]),
                           {"head": grads["head"]}, explicit_matrix(alone, {"head": (100,)}))
    if kind == "sjlt":
        for a, b in zip(first.hash_and_sign("head"), alone.hash_and_sign("head"), strict=True):
            assert torch.equal(a, b)
    else:
        assert torch.equal(first.matrix_rows("head", 0, 100), alone.matrix_rows("head", 0, 100))

    # A different seed, name or shape (same number of elements) gives a different map.
    base = contribution(first, "layers.0.lora_A", grads["layers.0.lora_A"])
    variants = [
        (make_projector(kind, 64, 4, SHAPES), "layers.0.lora_A"),
        (make_projector(kind, 64, 3, {"layers.1.lora_A": (8, 32)}), "layers.1.lora_A"),
        (make_projector(kind, 64, 3, {"layers.0.lora_A": (32, 8)}), "layers.0.lora_A"),
    ]
    for variant, name in variants:
        other = contribution(variant, name, grads["layers.0.lora_A"])
        assert not torch.allclose(other, base, atol=1e-3)


def test_projection_randomness_is_frozen() -> None:
    """Stored features stay comparable only if the same (seed, name, shape) gives the same map forever."""
    name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    h, s = make_projector("sjlt", 8192, 0, {name: (64, 64)}).hash_and_sign(name)
    assert h.dtype == torch.int32 and s.dtype == torch.int8
    assert h[:6].tolist() == [7772, 7579, 7252, 1397, 4583, 7993]
    assert s[:6].tolist() == [-1, 1, 1, 1, 1, 1]

    rows = make_projector("rademacher", 8192, 0, {"w": (3, 5)}).matrix_rows("w", 0, 2)
    assert torch.sign(rows[0, :12]).tolist() == [1, -1, 1, -1, 1, -1, -1, 1, 1, 1, -1, 1]
    assert torch.sign(rows[1, -8:]).tolist() == [-1, 1, -1, 1, 1, 1, -1, -1]


def test_none_projection_concatenates_in_parameter_order() -> None:
    projector = make_projector("none", 7, 0, SHAPES)
    n = sum(math.prod(shape) for shape in SHAPES.values())
    assert projector.dim == n  # dim is ignored
    grads = random_grads(3, SHAPES)
    out = torch.zeros(3, n)
    for name in reversed(list(SHAPES)):  # the order of the calls does not matter, the order of `shapes` does
        shaped = grads[name].reshape(3, *SHAPES[name])  # (b, *shape) is accepted too
        projector.add(name, shaped, out)
    assert torch.equal(out, torch.cat([grads[name] for name in SHAPES], dim=1))
    assert projector.describe()["seed"] is None


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_projection_equals_its_explicit_matrix(kind: str) -> None:
    shapes = {"a": (5, 6), "b": (13,)}
    grads = random_grads(4, shapes)
    projector = make_projector(kind, 40, 1, shapes, block_rows=4) if kind == "rademacher" else \
        make_projector(kind, 40, 1, shapes)
    matrix = explicit_matrix(projector, shapes)  # (n, d)
    if kind == "rademacher":
        assert torch.equal(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(40)))
    full = torch.cat(list(grads.values()), dim=1)  # (b, n)
    assert_same_projection(projector.project(grads), full @ matrix, grads, matrix)


def test_rademacher_matrix_does_not_depend_on_block_size() -> None:
    small = make_projector("rademacher", 300, 9, {"w": (50,)}, block_rows=3)
    large = make_projector("rademacher", 300, 9, {"w": (50,)}, block_rows=1000)
    assert torch.equal(torch.cat([small.matrix_rows("w", 0, 17), small.matrix_rows("w", 17, 50)]),
                       large.matrix_rows("w", 0, 50))
    grad = torch.randn(2, 50)
    assert_same_projection(contribution(small, "w", grad), contribution(large, "w", grad), {"w": grad},
                           large.matrix_rows("w", 0, 50))


def _norm_and_inner_product_ratios(kind: str, seeds: range, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per seed: ‖Px‖²/‖x‖² and ⟨Px, Py⟩/⟨x, y⟩ for fixed x, y (split over two parameters) with cos 0.5."""
    shapes = {"p0": (30, 40), "p1": (800,)}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=gen, dtype=torch.float64)
    z = torch.randn(2000, generator=gen, dtype=torch.float64)
    z -= (z @ x) / (x @ x) * x
    y = 0.5 * x / x.norm() + math.sqrt(0.75) * z / z.norm()  # unit, cos(x, y) = 0.5
    batch = torch.stack([x, y])  # (2, n)
    grads = {"p0": batch[:, :1200], "p1": batch[:, 1200:]}
    norms, inners = [], []
    for seed in seeds:
        features = make_projector(kind, d, seed, shapes, dtype=torch.float64).project(grads)  # (2, d)
        norms.append(float(features[0] @ features[0] / (x @ x)))
        inners.append(float(features[0] @ features[1] / (x @ y)))
    return np.array(norms), np.array(inners)


def test_sjlt_preserves_norms_and_inner_products_in_expectation() -> None:
    # d = 64 makes one projection noisy (std of the norm ratio ~ sqrt(2/d) = 0.18), so the mean over
    # 400 seeds (std ~ 0.01) tests unbiasedness, i.e. the scaling, not concentration.
    norms, inners = _norm_and_inner_product_ratios("sjlt", range(400), d=64)
    assert abs(norms.mean() - 1) < 0.05 and abs(inners.mean() - 1) < 0.08
    assert 0.1 < norms.std() < 0.3  # really random per seed, with the JL variance ~ 2/d
    h, s = make_projector("sjlt", 64, 0, {"w": (100_000,)}).hash_and_sign("w")
    counts = torch.bincount(h.long(), minlength=64).double()
    assert counts.min() > 0.9 * 100_000 / 64 and counts.max() < 1.1 * 100_000 / 64  # uniform buckets
    assert abs(s.double().mean()) < 0.02  # balanced signs


def test_rademacher_preserves_norms_and_inner_products_in_expectation() -> None:
    norms, inners = _norm_and_inner_product_ratios("rademacher", range(400), d=64)
    assert abs(norms.mean() - 1) < 0.05 and abs(inners.mean() - 1) < 0.08
    assert 0.1 < norms.std() < 0.3
    rows = make_projector("rademacher", 1000, 0, {"w": (200,)}).matrix_rows("w", 0, 200)
    assert torch.equal(rows.abs(), torch.full_like(rows, 1 / math.sqrt(1000)))  # entries are exactly ±1/sqrt(d)
    rows = rows * math.sqrt(1000)
    assert abs(rows.mean()) < 0.01  # balanced signs
    off_diagonal = (rows.T @ rows / 200 - torch.eye(1000)).square().mean() * 1000 / 999
    assert abs(off_diagonal * 200 - 1) < 0.1  # independent columns: E[(mean of 200 products)^2] = 1/200


def test_projector_rejects_bad_input() -> None:
    with pytest.raises(PoiseError, match="unknown projection"):
        make_projector("gaussian", 8, 0, SHAPES)  # type: ignore[arg-type]
    with pytest.raises(PoiseError, match="dimension"):
        make_projector("sjlt", 0, 0, SHAPES)
    with pytest.raises(PoiseError, match="no parameters"):
        make_projector("sjlt", 8, 0, {})
    projector = make_projector("sjlt", 8, 0, SHAPES)
    out = torch.zeros(2, 8)
    with pytest.raises(PoiseError, match="unknown parameter 'nope'"):
        projector.add("nope", torch.zeros(2, 100), out)
    with pytest.raises(PoiseError, match="gradient of 'head' has shape"):
        projector.add("head", torch.zeros(2, 99), out)
    with pytest.raises(PoiseError, match="output has shape"):
        projector.add("head", torch.zeros(3, 100), out)
    with pytest.raises(PoiseError, match="dtype"):
        projector.add("head", torch.zeros(2, 100), out.double())


def test_describe_identifies_the_map() -> None:
    info = make_projector("sjlt", 8192, 5, SHAPES).describe()
    assert info["kind"] == "sjlt" and info["dim"] == 8192 and info["seed"] == 5
    assert info["input_dim"] == 8 * 32 + 48 * 8 + 100
    other = make_projector("sjlt", 8192, 5, {**SHAPES, "head": (101,)}).describe()
    assert other["parameters_sha256"] != info["parameters_sha256"]


# --- acceptance: real LoRA gradients of a tiny Llama ------------------------------------------------

def _tiny_llama_lora_gradients(n_examples: int) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
    """Per-example LoRA gradients (n_examples, n) of a tiny Llama, by a batch-size-1 autograd loop."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    lora = peft.LoraConfig(r=64, lora_alpha=256, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    model.eval()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    # peft initialises lora_B to zero, so lora_A would get no gradient at all: perturb every adapter
    # weight (as a warmup would) so that both A and B have real gradients.
    with torch.no_grad():
        for _, p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    # Data with structure, like an instruction pool: a shared 6-token "template" header, then a body from
    # one of 4 "tasks", each with its own Zipfian distribution over the vocabulary. (Uniformly random
    # tokens give near-orthogonal gradients, cosine std ~ 0.035, comparable to the d = 8192 sketch noise.)
    zipf = 1.0 / torch.arange(1, 257, dtype=torch.float64) ** 1.1
    task_vocab = [torch.randperm(256, generator=gen) for _ in range(4)]
    header = torch.randint(0, 256, (6,), generator=gen)
    grads = []
    for i in range(n_examples):
        body = task_vocab[i % 4][torch.multinomial(zipf, 24, replacement=True, generator=gen)]
        ids = torch.cat([header, body]).unsqueeze(0)  # (1, 30)
        loss = model(input_ids=ids, labels=ids).loss  # mean cross-entropy of this example
        per_param = torch.autograd.grad(loss, [p for _, p in params])
        grads.append(torch.cat([g.reshape(-1) for g in per_param]))
    shapes = {name: tuple(p.shape) for name, p in params}
    assert any("lora_A" in name for name in shapes) and any("lora_B" in name for name in shapes)
    return torch.stack(grads), shapes  # (n_examples, n) in named_parameters order


def _pairwise_cosines(features: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(features.double(), dim=1)  # (N, k)
    upper = torch.triu_indices(len(unit), len(unit), offset=1)
    return (unit @ unit.T)[upper[0], upper[1]]  # (N(N-1)/2,)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notices, raised inside peft
def test_projected_cosines_correlate_with_exact_cosines_at_d8192() -> None:
    started = time.perf_counter()
    grads, shapes = _tiny_llama_lora_gradients(200)
    n = grads.shape[1]
    assert n == 57_344 > 8192  # 2 layers x (q, o: 2 x 64 x 64; k, v: 64 x 64 + 32 x 64) at r = 64
    exact = _pairwise_cosines(grads)
    assert exact.std() > 0.1  # the cosines really vary, so a correlation of 0.99 is a real demand

    slices, offset = {}, 0
    for name, shape in shapes.items():
        slices[name] = grads[:, offset : offset + math.prod(shape)]
        offset += math.prod(shape)
    for kind in RANDOM_KINDS:
        projected = _pairwise_cosines(make_projector(kind, 8192, 0, shapes).project(slices))
        pearson = torch.corrcoef(torch.stack([exact, projected]))[0, 1].item()
        rms = (projected - exact).square().mean().sqrt().item()
        print(f"{kind}: n={n} d=8192 pearson={pearson:.4f} rms cosine error={rms:.4f}")
        assert pearson >= 0.99, kind
        assert rms < 2 / math.sqrt(8192), kind  # the JL noise level, ~ 1/sqrt(d)
    assert time.perf_counter() - started < 60
