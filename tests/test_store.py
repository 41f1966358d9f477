"""The feature store's kinds (float32, float16, int8, 1bit): their sizes, what each reads back (within the bound
its format allows), exact resume after a kill, and attribution over every kind (and mixes of kinds) equal to
numpy on rows dequantised here, independently of poise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pipeline_fixtures import write_checkpoint, write_model, write_pool
from tolerances import assert_same_sums

from poise.attribution import compute_attribution
from poise.config import AttributeConfig, FeaturesConfig
from poise.errors import PoiseError
from poise.features.stage import run_features
from poise.features.store import FeatureStore, StoredFeatures, dequantize, quantize, read_features
from poise.provenance import open_folder

KINDS = ["float32", "float16", "int8", "1bit"]
UNIT_ROUNDOFF_FLOAT16 = 2.0**-11
FLOAT16_SUBNORMAL_HALF_SPACING = 2.0**-25  # below 2^-14, float16 spaces its values 2^-24 apart
UNIT_ROUNDOFF_FLOAT32 = 2.0**-24
SETTINGS = {"kind": "adam", "model": "m", "checkpoint": None, "projection": {"kind": "sjlt", "dim": 0, "seed": 0},
            "seed": 0, "parameters": [["w", [4, 4]]]}


def rows_of_every_size(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows scaled from 1e-6 to 1e3, a unit row, a zero row, and a row with exact zeros and -0.0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) * np.logspace(-6, 3, n, dtype=np.float32)[:, None]
    x[1] /= np.linalg.norm(x[1])
    x[2] = 0.0
    x[3, ::3] = 0.0
    x[3, 1::3] = -0.0
    return x


def make_store(folder: Path, kind: str, values: np.ndarray, settings: dict | None = None, batch: int = 5) -> Path:
    """A finished features folder of `values`, written through FeatureStore as the features stage writes it."""
    config = FeaturesConfig(data=["synthetic"], out=str(folder), kind="adam", output_dtype=kind)
    opened = open_folder(folder, "features", config, extra={"values": float(np.abs(values).sum())})
    ids = [{"id": f"r{i}", "task": ["code", "math", "logic"][i % 3]} for i in range(len(values))]
    store = FeatureStore.open(opened.folder, settings or SETTINGS, ids, values.shape[1], dtype=kind)
    starts = range(0, len(values), batch)
    for k, start in enumerate(starts):
        rows = np.arange(start, min(len(values), start + batch))
        store.write_batch(k, rows, values[rows])
    assert store.finish(len(starts))
    return folder


# ----------------------------------------------------------------------------------------------- sizes
def test_bytes_per_example_of_each_kind_at_d_8192(tmp_path) -> None:
    d, n = 8192, 4
    values = rows_of_every_size(n, d)
    expected = {"float32": 4 * d, "float16": 2 * d, "int8": d + 4, "1bit": d // 8}
    for kind in KINDS:
        folder = make_store(tmp_path / kind, kind, values)
        info = json.loads((folder / "info.json").read_text())
        assert info["store"] == kind and info["bytes_per_example"] == expected[kind] and info["dim"] == d
        reader, _, _ = read_features(folder)
        assert isinstance(reader, StoredFeatures) and reader.shape == (n, d) and reader.kind == kind
        payload = np.load(folder / "features.npy").nbytes
        if kind == "int8":
            payload += np.load(folder / "scales.npy").nbytes
        else:
            assert not (folder / "scales.npy").exists()
        assert payload == n * expected[kind]
    assert expected["float16"] == 16 * 1024  # LESS's 16 KB per example per checkpoint


# ------------------------------------------------------------------------------- what each kind reads back
def test_float32_reads_back_exactly_and_float16_within_its_unit_roundoff(tmp_path) -> None:
    values = rows_of_every_size(40, 37)
    for kind in ("float32", "float16"):
        got = read_features(make_store(tmp_path / kind, kind, values))[0].rows(0, 40)
        assert got.dtype == np.float32 and got.shape == values.shape
        if kind == "float32":
            np.testing.assert_array_equal(got, values)
            continue
        # round to nearest: relative 2^-11 in float16's normal range, half the subnormal spacing below it
        bound = np.maximum(UNIT_ROUNDOFF_FLOAT16 * np.abs(values.astype(np.float64)), FLOAT16_SUBNORMAL_HALF_SPACING)
        assert np.all(np.abs(got.astype(np.float64) - values) <= bound)
        assert not np.array_equal(got, values)  # it did round


def test_int8_reads_back_within_half_a_scale_per_element(tmp_path) -> None:
    values = rows_of_every_size(40, 37)
    folder = make_store(tmp_path / "int8", "int8", values)
    q, scales = np.load(folder / "features.npy"), np.load(folder / "scales.npy")
    wide = values.astype(np.float64)
    np.testing.assert_array_equal(scales, (np.abs(wide).max(axis=1) / 127).astype(np.float32))
    assert q.dtype == np.int8 and np.abs(q.astype(np.int64)).max() == 127 and (q[2] == 0).all() and scales[2] == 0
    got = read_features(folder)[0].rows(0, 40).astype(np.float64)
    # rounding to the nearest level: scale/2; then the float32 product q * scale: its own unit roundoff
    bound = scales.astype(np.float64)[:, None] / 2 * (1 + 1e-12) + UNIT_ROUNDOFF_FLOAT32 * np.abs(got)
    assert np.all(np.abs(got - wide) <= bound)
    np.testing.assert_array_equal(q, np.rint(wide / np.where(scales == 0, 1, scales)[:, None]).astype(np.int8))


@pytest.mark.parametrize("d", [8, 37, 203])
def test_1bit_reads_back_exactly_the_unit_vector_of_the_signs(tmp_path, d) -> None:
    values = rows_of_every_size(12, d)
    folder = make_store(tmp_path / "1bit", "1bit", values)
    assert np.load(folder / "features.npy").shape == (12, math.ceil(d / 8))
    got = read_features(folder)[0].rows(0, 12)
    signs = np.where(values >= 0, 1.0, -1.0)  # zero (and -0.0) count as positive
    np.testing.assert_array_equal(got, (signs / np.sqrt(d)).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, rtol=1e-6)


def test_blocks_read_back_the_same_as_the_whole() -> None:
    values = rows_of_every_size(20, 29)
    for kind in KINDS:
        stored, scales = quantize(kind, values)
        reader = StoredFeatures(kind, stored, scales, 29)
        whole = dequantize(kind, stored, scales, 29)
        np.testing.assert_array_equal(np.concatenate([reader.rows(s, min(20, s + 6)) for s in range(0, 20, 6)]), whole)


def test_quantised_stores_refuse_values_they_cannot_keep(tmp_path) -> None:
    bad = rows_of_every_size(4, 16)
    bad[2, 5] = np.nan
    for kind in ("float16", "int8", "1bit"):
        with pytest.raises(PoiseError, match=rf"non-finite feature values in row 2 of a batch; a {kind} store"):
            quantize(kind, bad)
    quantize("float32", bad)  # kept as it is; attribute refuses the matrix later, as before
    with pytest.raises(PoiseError, match=r"exceed float16's range \(65504\); store them as float32 or int8"):
        make_store(tmp_path / "big", "float16", np.full((2, 4), 7e4, dtype=np.float32))


def test_a_folder_from_before_the_store_kinds_is_still_read(tmp_path) -> None:
    values = rows_of_every_size(6, 10)
    folder = make_store(tmp_path / "old", "float16", values)
    info = json.loads((folder / "info.json").read_text())
    old = {k: v for k, v in info.items() if k not in ("store", "bytes_per_example")}
    assert old["dtype"] == "float16"
    (folder / "info.json").write_text(json.dumps(old))
    reader = read_features(folder)[0]
    assert reader.kind == "float16"
    np.testing.assert_array_equal(reader.rows(0, 6), values.astype(np.float16).astype(np.float32))


def test_the_features_stage_stores_exactly_its_float32_rows_quantised(tmp_path) -> None:
    model = write_model(tmp_path / "model")
    checkpoint, pool = write_checkpoint(tmp_path / "checkpoint", model), write_pool(tmp_path / "pool.jsonl", n=10)
    folders = {}
    for kind in KINDS:
        folders[kind] = tmp_path / kind
        run_features(FeaturesConfig(data=[str(pool)], out=str(folders[kind]), checkpoint=str(checkpoint), kind="adam",
                                    projection="sjlt", dim=77, max_seq_length=64, output_dtype=kind))
    exact = np.load(folders["float32"] / "features.npy")
    for kind in KINDS[1:]:
        stored, scales = quantize(kind, exact)
        np.testing.assert_array_equal(np.load(folders[kind] / "features.npy"), stored)
        if kind == "int8":
            np.testing.assert_array_equal(np.load(folders[kind] / "scales.npy"), scales)
        assert json.loads((folders[kind] / "info.json").read_text())["store"] == kind


# -------------------------------------------------------------------------------------------- resume
RESUMABLE_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from poise.config import FeaturesConfig
    from poise.features.store import FeatureStore
    from poise.provenance import open_folder

    folder, resume = sys.argv[1], sys.argv[2] == "resume"
    values = np.random.default_rng(0).standard_normal((23, 50)).astype(np.float32)
    values *= np.logspace(-3, 2, 23, dtype=np.float32)[:, None]
    opened = open_folder(folder, "features", FeaturesConfig(data=["x"], out=folder, output_dtype="int8"))
    ids = [{"id": i, "task": "t"} for i in range(23)]
    store = FeatureStore.open(opened.folder, {"kind": "adam"}, ids, 50, dtype="int8", resume=opened.resumed)
    batches = [np.arange(s, min(23, s + 4)) for s in range(0, 23, 4)]
    done = store.done_batches()
    for k in range(len(batches)):
        if k not in done:
            store.write_batch(k, batches[k], values[batches[k]])
    assert store.finish(len(batches))
""")


def _write(folder: Path, resume: bool, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "POISE_KILL_AT"}
    if kill_at:
        env["POISE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", RESUMABLE_WRITER, str(folder), "resume" if resume else "new"],
                          capture_output=True, text=True, check=False, env=env)


def test_killed_and_resumed_int8_store_is_byte_identical(tmp_path) -> None:
    whole = _write(tmp_path / "whole", resume=False)
    assert whole.returncode == 0, whole.stderr
    killed = _write(tmp_path / "resumed", resume=False, kill_at="writes:3")
    assert killed.returncode == -9  # the 3rd batch's rows and scales flushed, not yet logged
    assert (tmp_path / "resumed" / "progress" / "rank-0.log").read_text().split() == ["0", "1"]
    resumed = _write(tmp_path / "resumed", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("features.npy", "scales.npy"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert np.abs(np.load(tmp_path / "whole" / "scales.npy")).min() > 0


# --------------------------------------------------------------------------------------- attribution
def naive_rows(folder: Path) -> np.ndarray:
    """float64 rows dequantised from the files with numpy alone (the formats of docs/formats.md)."""
    info = json.loads((folder / "info.json").read_text())
    stored, d = np.load(folder / "features.npy"), info["dim"]
    if info["store"] == "int8":
        return stored.astype(np.float64) * np.load(folder / "scales.npy").astype(np.float64)[:, None]
    if info["store"] == "1bit":
        return np.where(np.unpackbits(stored, axis=1)[:, :d] == 1, 1.0, -1.0) / math.sqrt(d)
    return stored.astype(np.float64)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Train (40 rows) and validation (9 rows) features of two checkpoints in every kind, d = 203."""
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(1)
    out = {}
    for k in (1, 2):
        train = rng.standard_normal((40, 203)).astype(np.float32)
        train[5] = 0.0  # a zero row: cosine 0 (and the signs of a 1bit row)
        val = rng.standard_normal((9, 203)).astype(np.float32) * 1e-3
        val[:, :3] += train[:9, :3]  # some shared direction, so the cosines are not all near 0
        for kind in KINDS:
            out[(f"train{k}", kind)] = make_store(root / f"train{k}-{kind}", kind, train / np.linalg.norm(
                train, axis=1, keepdims=True).clip(1e-30))
            out[(f"val{k}", kind)] = make_store(root / f"val{k}-{kind}", kind, val)  # unnormalised on purpose
    return out


PAIRS = [(kind, kind) for kind in KINDS] + [("1bit", "float32"), ("int8", "float16"), ("float16", "1bit")]


@pytest.mark.parametrize(("train_kind", "val_kind"), PAIRS)
def test_attribution_over_each_kind_equals_numpy_on_the_dequantised_rows(stores, tmp_path, train_kind,
                                                                         val_kind) -> None:
    trains = [stores[(f"train{k}", train_kind)] for k in (1, 2)]
    vals = [stores[(f"val{k}", val_kind)] for k in (1, 2)]
    out = compute_attribution(AttributeConfig(train=[str(p) for p in trains], val=[str(p) for p in vals],
                                              out=str(tmp_path / "a"), weights=["3", "1"], chunk_rows=7))
    got = np.load(out / "scores.npy")

    def unit(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms == 0, 1.0, norms)

    expected = np.zeros(got.shape)
    abs_sums = np.zeros(got.shape)
    for w, t, v in zip((0.75, 0.25), trains, vals, strict=True):
        tu, vu = unit(naive_rows(t)), unit(naive_rows(v))
        expected += w * (tu @ vu.T)
        abs_sums += w * (np.abs(tu) @ np.abs(vu).T)
    # float32 normalisation (a sum of d squares) and a float32 dot product of d terms, weighted: the bound
    # of tests/tolerances.py for d + 4 terms covers both roundings of both sides
    assert_same_sums(got, expected, abs_sums, n_terms=203 + 4)
    assert (got[5] == 0).all() or train_kind == "1bit"


def test_training_rows_are_dequantised_one_chunk_at_a_time(stores, tmp_path, monkeypatch) -> None:
    sizes: list[tuple[str, int]] = []
    original = StoredFeatures.rows

    def spy(self, start, stop):
        sizes.append((self.source, stop - start))
        return original(self, start, stop)

    monkeypatch.setattr(StoredFeatures, "rows", spy)
    train, val = stores[("train1", "int8")], stores[("val1", "1bit")]
    compute_attribution(AttributeConfig(train=[str(train)], val=[str(val)], out=str(tmp_path / "a"), chunk_rows=8))
    assert max(n for source, n in sizes if source == str(train)) == 8
    assert sum(n for source, n in sizes if source == str(train)) == 40


def test_mixed_kinds_are_allowed_but_other_projectors_are_still_refused(stores, tmp_path) -> None:
    other = make_store(tmp_path / "other", "float32", rows_of_every_size(9, 203),
                       settings={**SETTINGS, "projection": {"kind": "sjlt", "dim": 0, "seed": 1}})
    with pytest.raises(PoiseError, match="different projection"):
        compute_attribution(AttributeConfig(train=[str(stores[("train1", "1bit")])], val=[str(other)],
                                            out=str(tmp_path / "x")))
