"""Random projections of per-example gradients from n to d dimensions, one parameter at a time.

LESS compares examples by the cosine of their (Adam-mapped) LoRA gradients. n is large (134M for
LESS's 7B LoRA), so every gradient is projected to d dimensions (default 8192) by a random linear map
that approximately preserves inner products; the caller L2-normalises the rows afterwards
(docs/design.md §2.3). The map is applied parameter by parameter: `Projector.add(name, grad, out)` adds
one parameter's contribution to the (b, d) output, so the gradients of a large model are never
concatenated into one (b, n) tensor.

Kinds (`make_projector`):

- ``"none"``: the identity; d = n and each parameter is written into its own offset range, in the
  order of `shapes`. For tiny models and tests.
- ``"sjlt"``: sparse Johnson–Lindenstrauss / CountSketch. Coordinate k of parameter p goes to one
  output coordinate h_p[k] ∈ [0, d) with one sign s_p[k] ∈ {±1}: out[b, h_p[k]] += s_p[k]·g[b, k].
  No scaling: with one ±1 per column, E⟨Sx, Sy⟩ = Σ_k x_k y_k + Σ_{k≠l} E[s_k s_l 1{h_k = h_l}] x_k y_l
  = ⟨x, y⟩, so E‖Sg‖² = ‖g‖² already (Var ‖Sg‖² = 2(‖g‖⁴ − ‖g‖₄⁴)/d, no worse than a dense sketch).
  O(n) per example; h and s are generated once per parameter and cached on the projector (int32
  indices while d < 2³¹, int8 signs: 5 bytes per gradient coordinate).
- ``"rademacher"``: the dense reference (TRAK/LESS semantics, features = g @ R) with R_p (n_p × d)
  of i.i.d. ±1/√d entries, so again E‖gR‖² = ‖g‖². R is never stored (14.7M LoRA parameters at
  d = 8192 would be 480 GB): it is regenerated in row blocks on every call, out += g[:, rows] @ R_rows.
  2·n·d FLOPs per example plus generating n·d signs per call; about 3 s per million parameters for a
  batch of 8 at d = 8192 on two CPU cores.

Randomness depends only on (seed, parameter name, shape) — never on device, rank, batch, the order in
which parameters are added, or the row-block size — so every rank of a distributed run, and the train
and validation passes, use the same map. A 128-bit key is taken from the SHA-256 of
(scheme, kind, seed, name, shape) and drives numpy's counter-based Philox4x64-10 bit generator on the
host; the raw 64-bit words are then moved to the projection's device. Why this generator:

- it is bit-exact on every platform, and numpy keeps the raw output of its bit generators stable across
  releases (we use only `random_raw` and our own integer arithmetic, not `Generator` methods, whose
  algorithms numpy may change); torch's generators differ between CPU (mt19937) and CUDA (Philox);
- it is counter-based: the words of row r of R_p start at counter r·W/4 (W = 64-bit words per row), so
  any block of rows is generated directly, and the matrix does not depend on the block size;
- it is cheap next to the projection itself. sjlt draws one word per coordinate once per parameter
  (cached, so a GPU run pays it once). rademacher draws one word per 64 matrix entries per call
  (~0.45 s per million rows at d = 8192 on two CPU cores; 1/32 of the bytes of the float32 matrix) and only
  these packed bits cross to the device, where a 256-entry byte → 8-sign lookup table expands them;
  on a GPU the dense expansion and matmul (n·d floats written and read) stay the bottleneck.

Word → value conventions (part of the scheme; changing them changes every stored feature):
sjlt: s = +1 if bit 0 of the word is 0 else −1, h = (word >> 1) mod d (bias ≤ d/2⁶³). rademacher:
entry (r, c) is −1/√d if bit (c mod 64) of word (c div 64) of row r is set, else +1/√d.

Floating-point sums are another matter than randomness: on CPU, sjlt gives a row the same bits whatever
else is in its batch (`index_add_` adds in index order), while rademacher's `addmm_` may round
differently for another batch size or block size; on CUDA `index_add_` uses atomics, so sjlt sums may
differ in the last bits between runs. The map itself never differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poise.errors import PoiseError
from poise.options import PROJECTIONS, Projection

__all__ = [
    "SCHEME",
    "NoProjector",
    "Projector",
    "RademacherProjector",
    "SJLTProjector",
    "make_projector",
]

#: Version tag of the randomness scheme; part of every key and of `describe()`.
SCHEME = "poise-philox4x64-v1"

#: Matrix entries per rademacher row block when `block_rows` is not given (8 MB of float32 on CPU,
#: which stays cache-friendly; larger on accelerators to amortise kernel launches).
_BLOCK_ENTRIES_CPU = 1 << 21
_BLOCK_ENTRIES_DEVICE = 1 << 25


def _philox_key(kind: str, seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """128-bit Philox key (2 uint64) from SHA-256 of (scheme, kind, seed, name, shape)."""
    text = json.dumps([SCHEME, kind, int(seed), name, [int(x) for x in shape]], separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return np.frombuffer(digest[:16], dtype="<u8").astype(np.uint64)


def _raw_words(key: np.ndarray, counter: int, count: int) -> np.ndarray:
    """`count` raw uint64 words of Philox4x64 under `key`, starting at block counter `counter`.

    Each counter value yields 4 words, so word i of a stream started at counter 0 is word i − 4c of the
    stream started at counter c.
    """
    return np.asarray(np.random.Philox(key=key, counter=counter).random_raw(count), dtype=np.uint64)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


class Projector(ABC):
    """A linear map from the concatenated gradient (n) to `dim` features, applied per parameter.

    Use: ``out = torch.zeros(b, projector.dim, dtype=projector.dtype, device=...)``, then
    ``projector.add(name, grad, out)`` for every parameter (any order, any batch split), then
    L2-normalise the rows of `out`. `project` does this for a mapping of gradients at once.
    """

    kind: str = ""

    def __init__(
        self,
        dim: int,
        seed: int,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.dim = int(dim)
        self.seed = int(seed)
        self.shapes: dict[str, tuple[int, ...]] = {name: tuple(int(x) for x in s) for name, s in shapes.items()}
        self.device = torch.device(device)
        self.dtype = dtype
        self.input_dim = sum(_numel(s) for s in self.shapes.values())

    def add(self, name: str, grad: Tensor, out: Tensor) -> None:
        """Add parameter `name`'s contribution to `out` (b, dim), in place.

        `grad` is (b, n_p) — the flattened per-example gradients of that parameter — or (b, *shape).
        It is cast to the projector's dtype and moved to `out`'s device.
        """
        g = self._check(name, grad, out)  # (b, n_p)
        with torch.no_grad():
            self._add(name, g, out)

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Features (b, dim) of a mapping name → gradient (b, n_p); not normalised."""
        if not grads:
            raise PoiseError("projector: no gradients to project")
        first = next(iter(grads.values()))
        out = torch.zeros(first.shape[0], self.dim, dtype=self.dtype, device=self.device)  # (b, dim)
        for name, grad in grads.items():
            self.add(name, grad, out)
        return out

    def describe(self) -> dict[str, Any]:
        """What identifies the map, for info.json: features from different descriptions must not be mixed."""
        layout = json.dumps([[name, list(shape)] for name, shape in self.shapes.items()], separators=(",", ":"))
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "input_dim": self.input_dim,
            "parameters": len(self.shapes),
            "parameters_sha256": hashlib.sha256(layout.encode("utf-8")).hexdigest(),
            "scheme": SCHEME,
        }

    @abstractmethod
    def _add(self, name: str, grad: Tensor, out: Tensor) -> None:
        """Add the contribution of `grad` (b, n_p), already checked and cast, to `out` (b, dim)."""

    def _check(self, name: str, grad: Tensor, out: Tensor) -> Tensor:
        if name not in self.shapes:
            raise PoiseError(
                f"projector: unknown parameter {name!r} (the projector was built for {len(self.shapes)} "
                "other parameters)"
            )
        shape = self.shapes[name]
        n_p = _numel(shape)
        if grad.dim() < 1:
            raise PoiseError(f"projector: gradient of {name!r} is a scalar; expected (batch, {n_p})")
        b = grad.shape[0]
        if tuple(grad.shape[1:]) == shape or (grad.dim() == 2 and grad.shape[1] == n_p):
            g = grad.reshape(b, n_p)
        else:
            raise PoiseError(
                f"projector: gradient of {name!r} has shape {tuple(grad.shape)}; expected (batch, {n_p}) "
                f"or (batch, {', '.join(map(str, shape))})"
            )
        if tuple(out.shape) != (b, self.dim):
            raise PoiseError(
                f"projector: output has shape {tuple(out.shape)}; expected ({b}, {self.dim}) for a batch of {b}"
            )
        if out.dtype != self.dtype:
            raise PoiseError(f"projector: output dtype is {out.dtype}; the projector computes in {self.dtype}")
        if out.device.type != self.device.type:
            raise PoiseError(f"projector: output is on {out.device}; the projector was built for {self.device}")
        return g.to(device=out.device, dtype=self.dtype)


class NoProjector(Projector):
    """The identity: parameter p fills columns [offset_p, offset_p + n_p) of the (b, n) output."""

    kind = "none"

    def __init__(self, seed: int, shapes: Mapping[str, tuple[int, ...]], device: torch.device | str,
                 dtype: torch.dtype) -> None:
        super().__init__(0, seed, shapes, device, dtype)
        self.dim = self.input_dim
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += _numel(shape)

    def _add(self, name: str, grad: Tensor, out: Tensor) -> None:
        start = self.offsets[name]
        out[:, start : start + grad.shape[1]] += grad  # a copy when `out` starts at zero

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["seed"] = None  # the identity has no randomness: any seed gives the same features
        return info


class SJLTProjector(Projector):
    """CountSketch: out[b, h_p[k]] += s_p[k] · g[b, k], with (h_p, s_p) cached per parameter."""

    kind = "sjlt"

    def __init__(self, dim: int, seed: int, shapes: Mapping[str, tuple[int, ...]], device: torch.device | str,
                 dtype: torch.dtype) -> None:
        super().__init__(dim, seed, shapes, device, dtype)
        self._index_dtype = torch.int32 if self.dim < 2**31 else torch.int64
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def hash_and_sign(self, name: str) -> tuple[Tensor, Tensor]:
        """(h (n_p,) int32/int64 in [0, dim), s (n_p,) int8 in {±1}) of parameter `name`, on the device."""
        cached = self._cache.get(name)
        if cached is None:
            shape = self.shapes[name]
            words = _raw_words(_philox_key(self.kind, self.seed, name, shape), 0, _numel(shape))  # (n_p,) u64
            sign = (1 - 2 * (words & np.uint64(1)).astype(np.int8)).astype(np.int8)  # (n_p,)
            index = ((words >> np.uint64(1)) % np.uint64(self.dim)).astype(np.int64)  # (n_p,)
            h = torch.from_numpy(index).to(self._index_dtype).to(self.device)
            s = torch.from_numpy(sign).to(self.device)
            cached = self._cache[name] = (h, s)
        return cached

    def _add(self, name: str, grad: Tensor, out: Tensor) -> None:
        h, s = self.hash_and_sign(name)  # (n_p,), (n_p,)
        # int64 for the call: torch 2.13's CPU index_add_ is ~5x slower with int32 indices.
        out.index_add_(1, h.long(), grad * s)  # grad * s: (b, n_p) in the projector's dtype


class RademacherProjector(Projector):
    """Dense ±1/√d: out += g @ R_p, with R_p regenerated in row blocks on every call (never stored)."""

    kind = "rademacher"

    def __init__(self, dim: int, seed: int, shapes: Mapping[str, tuple[int, ...]], device: torch.device | str,
                 dtype: torch.dtype, block_rows: int | None = None) -> None:
        super().__init__(dim, seed, shapes, device, dtype)
        # 64-bit words per row, a multiple of 4 so that every row starts on a Philox counter boundary.
        self.words_per_row = 4 * math.ceil(self.dim / 256)
        if block_rows is None:
            entries = _BLOCK_ENTRIES_CPU if self.device.type == "cpu" else _BLOCK_ENTRIES_DEVICE
            block_rows = max(1, entries // (64 * self.words_per_row))
        if int(block_rows) < 1:
            raise PoiseError(f"projector: block_rows must be >= 1, got {block_rows}")
        self.block_rows = int(block_rows)
        self._keys = {name: _philox_key(self.kind, self.seed, name, shape) for name, shape in self.shapes.items()}
        byte = torch.arange(256).unsqueeze(1)  # (256, 1)
        bits = (byte >> torch.arange(8)) & 1  # (256, 8): bit j of byte value v, least significant first
        table = (1.0 - 2.0 * bits.double()) / math.sqrt(self.dim)  # (256, 8) of ±1/√d
        self._table = table.to(dtype).to(self.device)

    def matrix_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of R_p for parameter `name`: (stop − start, dim) of ±1/√dim, on the device."""
        n_p = _numel(self.shapes[name])
        if not 0 <= start <= stop <= n_p:
            raise PoiseError(f"projector: rows [{start}, {stop}) are outside parameter {name!r} with {n_p} rows")
        return self._rows(name, start, stop, *self._buffers(stop - start))

    def _buffers(self, rows: int) -> tuple[Tensor, Tensor]:
        """Scratch for `rows` matrix rows: byte indices (rows·W·8,) int64 and values (rows·W·8, 8)."""
        packed_bytes = rows * self.words_per_row * 8
        index = torch.empty(packed_bytes, dtype=torch.int64, device=self.device)
        values = torch.empty(packed_bytes, 8, dtype=self.dtype, device=self.device)
        return index, values

    def _rows(self, name: str, start: int, stop: int, index: Tensor, values: Tensor) -> Tensor:
        rows = stop - start
        words = _raw_words(self._keys[name], start * (self.words_per_row // 4), rows * self.words_per_row)
        packed = torch.from_numpy(words.astype("<u8", copy=False).view(np.uint8))  # (rows·W·8,) bytes
        m = packed.shape[0]
        index[:m].copy_(packed)  # to the device, as int64 table indices
        torch.index_select(self._table, 0, index[:m], out=values[:m])  # (rows·W·8, 8): byte → 8 signs
        return values[:m].view(rows, self.words_per_row * 64)[:, : self.dim]  # (rows, dim)

    def _add(self, name: str, grad: Tensor, out: Tensor) -> None:
        n_p = grad.shape[1]
        if n_p == 0:
            return
        # Scratch reused across blocks: fresh multi-MB tensors per block cost page faults on CPU.
        index, values = self._buffers(min(n_p, self.block_rows))
        for start in range(0, n_p, self.block_rows):
            stop = min(n_p, start + self.block_rows)
            block = self._rows(name, start, stop, index, values)  # (rows, dim)
            out.addmm_(grad[:, start:stop], block)  # (b, rows) @ (rows, dim)


def make_projector(
    kind: Projection,
    dim: int,
    seed: int,
    shapes: Mapping[str, tuple[int, ...]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    block_rows: int | None = None,
) -> Projector:
    """A projector of `kind` to `dim` features for the parameters `shapes` (ordered name → shape).

    For ``"none"`` `dim` is ignored (it becomes n, the total number of elements) and so is `seed`.
    `block_rows` (rademacher only) trades memory for speed; it never changes the matrix.
    """
    if kind not in PROJECTIONS:
        raise PoiseError(f"unknown projection {kind!r}; choose one of {', '.join(PROJECTIONS)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise PoiseError(f"projection seed must be an integer, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PoiseError(f"projection dtype must be a floating-point torch dtype, got {dtype!r}")
    if not shapes:
        raise PoiseError("projection: no parameters (shapes is empty)")
    for name, shape in shapes.items():
        if not isinstance(name, str):
            raise PoiseError(f"projection: parameter names must be strings, got {name!r}")
        if any(isinstance(x, bool) or not isinstance(x, int | np.integer) or x < 0 for x in shape):
            raise PoiseError(f"projection: parameter {name!r} has an invalid shape {shape!r}")
    if kind == "none":
        return NoProjector(seed, shapes, device, dtype)
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise PoiseError(f"projection dimension must be a positive integer, got {dim!r}")
    if kind == "sjlt":
        return SJLTProjector(dim, seed, shapes, device, dtype)
    return RademacherProjector(dim, seed, shapes, device, dtype, block_rows=block_rows)
