"""Warmup training (checkpoint layout, determinism, resume, a reference AdamW loop) and HF-Trainer import."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_tokenizer, write_jsonl
from tolerances import gamma

from poise.checkpoint import ADAPTER_WEIGHTS
from poise.config import ImportConfig, TrainConfig, WarmupConfig
from poise.errors import PoiseError
from poise.files import CHECKPOINT_FILE, MOMENTS_FILE
from poise.hf_import import import_checkpoint
from poise.train import epoch_order, run_train
from poise.warmup import run_warmup, subset_indices

WORDS = ["apple", "river", "seven", "blue", "code", "sum", "proof", "list", "tree", "fast", "print", "moon"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class NotATensor:
    """Something torch's weights-only unpickler refuses (a pickle-only optimizer file holds one)."""

    def __init__(self, value: int = 1):
        self.value = value


def conversation(i: int) -> dict:
    user = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + (i * 5) % 7))
    answer = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(1 + (i * 7) % 5))
    return {"id": f"ex{i}", "messages": [{"role": "user", "content": user},
                                         {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> dict:
    """A tiny model folder, a 40-example tulu pool and a warmup run (2 epochs, dropout on) of 24 of them."""
    root = tmp_path_factory.mktemp("warmup")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    pool = write_jsonl(root / "pool.jsonl", [conversation(i) for i in range(40)])
    config = WarmupConfig(data=[str(pool)], model=str(root / "model"), out=str(root / "run-a"), examples=24,
                          epochs=2, batch_size=8, lora_r=4, lora_alpha=16, lr=1e-3, max_batch_size=4, seed=3)
    checkpoints = run_warmup(config)
    return {"root": root, "pool": pool, "model": root / "model", "config": config, "checkpoints": checkpoints}


def trainable_names(model_dir: Path, checkpoint: Path) -> list[str]:
    from poise.lora import load_adapter, lora_parameters
    from poise.model import load_model

    return list(lora_parameters(load_adapter(load_model(str(model_dir)), checkpoint, trainable=True)))


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Equal up to summation order: the largest difference is below `tol` times the largest magnitude."""
    assert actual.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0 and float((actual - expected).abs().max()) <= tol * scale


def step_tolerance(config: WarmupConfig) -> float:
    """2 gamma_n (tests/tolerances.py) for n = the terms of one LoRA gradient coordinate of a step.

    A coordinate of a LoRA weight's gradient sums over the step's token positions and the layer's inner
    width (hidden size or rank), so two runs that accumulate in another order (micro-batches, ranks,
    threads) agree to 2 gamma_n of its magnitude, and so do Adam's moments, which are linear (m) or
    quadratic (v, hence twice that) in the gradients.
    """
    from poise.data import read_examples, tokenize_examples
    from poise.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    _, items, _ = tokenize_examples(read_examples(config.data[0]), tokenizer, config.max_seq_length, progress=False)
    width = int(load_model(config.model).config.hidden_size)
    return 2 * gamma(config.batch_size * max(len(t.input_ids) for t in items) * width)


def close_after_adam(actual: torch.Tensor, expected: torch.Tensor, tol: float, lr_sum: float) -> None:
    """Adapter weights after Adam steps: each step moves a coordinate by lr * m/(sqrt(v)+eps), whose relative
    error is that of the gradients (Adam divides by their own scale), so the weights agree to
    step_tolerance * sum of the learning rates taken, absolutely."""
    assert actual.shape == expected.shape
    assert float((actual - expected).abs().max()) <= tol * lr_sum


def tensors_equal(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


# ------------------------------------------------------------------------------------------ warmup
def test_warmup_writes_the_checkpoint_layout(setup):
    out = Path(setup["config"].out)
    assert setup["checkpoints"] == [out / "checkpoint-1", out / "checkpoint-2"]
    assert (out / "arguments.json").is_file() and (out / "examples.jsonl").is_file()
    assert not list(out.glob(".*partial"))
    names = trainable_names(setup["model"], out / "checkpoint-1")
    assert len(names) == 2 * 2 * len(TARGETS)
    assert names[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    infos = []
    for k, folder in enumerate(setup["checkpoints"], start=1):
        for name in (ADAPTER_WEIGHTS, "adapter_config.json", MOMENTS_FILE, CHECKPOINT_FILE):
            assert (folder / name).is_file(), name
        assert not list(folder.glob("*.pt")) and not list(folder.glob("*.bin"))  # the moments are stored once
        moments = load_file(str(folder / MOMENTS_FILE))
        assert sorted(moments) == sorted(f"{n}.{m}" for n in names for m in ("exp_avg", "exp_avg_sq"))
        for name in names:
            assert moments[f"{name}.exp_avg"].dtype == torch.float32
            v = moments[f"{name}.exp_avg_sq"]
            assert bool((v >= 0).all()) and bool((v > 0).any()), name
        info = json.loads((folder / CHECKPOINT_FILE).read_text())
        assert info["epoch"] == k and info["step"] == 3 * k  # 24 examples / 8 per step
        assert info["model"] == setup["config"].model and info["source"] == "poise warmup"
        assert info["betas"] == [0.9, 0.999] and info["eps"] == 1e-8 and info["weight_decay"] == 0.0
        infos.append(info)
    # 6 steps, ceil(0.03 * 6) = 1 warm-up step at 1e-3 * 1/1, then linear decay: lr_s = 1e-3 * (6 - s) / 5
    rates = [1e-3] + [1e-3 * (6 - s) / 5 for s in range(1, 6)]
    assert infos[0]["lr_mean"] == pytest.approx(sum(rates[:3]) / 3)
    assert infos[1]["lr_mean"] == pytest.approx(sum(rates[3:]) / 3)
    assert infos[0]["lr_mean"] > infos[1]["lr_mean"] > 0
    ids = [json.loads(line)["id"] for line in (out / "examples.jsonl").read_text().splitlines()]
    assert ids == [f"ex{i}" for i in subset_indices(40, 24, 3)]


def test_warmup_is_deterministic(setup):
    first = Path(setup["config"].out)
    second = setup["root"] / "run-b"
    config = dataclasses.replace(setup["config"], out=str(second))
    run_warmup(config)
    for k in (1, 2):
        for name in (ADAPTER_WEIGHTS, MOMENTS_FILE):
            tensors_equal(first / f"checkpoint-{k}" / name, second / f"checkpoint-{k}" / name)
        assert (first / f"checkpoint-{k}" / CHECKPOINT_FILE).read_text() == \
            (second / f"checkpoint-{k}" / CHECKPOINT_FILE).read_text()
    assert not (second / "trainer").exists()  # the Trainer's resume state is removed once training is complete
    # complete: a rerun changes nothing
    before = (second / "checkpoint-2" / MOMENTS_FILE).stat().st_mtime_ns
    assert run_warmup(config) == [second / "checkpoint-1", second / "checkpoint-2"]
    assert (second / "checkpoint-2" / MOMENTS_FILE).stat().st_mtime_ns == before


def test_warmup_refuses_a_run_folder_with_other_settings(setup):
    changed = dataclasses.replace(setup["config"], lr=2e-3)
    with pytest.raises(PoiseError, match=r"made by poise warmup with other settings \(lr: 0\.001 -> 0\.002\)") as info:
        run_warmup(changed)
    assert "\n" not in str(info.value)
    # execution settings may change (e.g. a smaller micro-batch after running out of memory)
    assert run_warmup(dataclasses.replace(setup["config"], max_batch_size=2))
    # --overwrite starts over (in a copy: other tests read run-a)
    copy = setup["root"] / "run-c"
    shutil.copytree(setup["config"].out, copy)
    assert run_warmup(dataclasses.replace(changed, out=str(copy), epochs=1, overwrite=True)) == [copy / "checkpoint-1"]
    assert not (copy / "checkpoint-2").exists()
    assert json.loads((copy / "arguments.json").read_text())["settings"]["lr"] == 2e-3
    # checkpoint folders without arguments.json are not a warmup run of ours
    (copy / "arguments.json").unlink()
    with pytest.raises(PoiseError, match="not empty and not made by poise warmup"):
        run_warmup(dataclasses.replace(changed, out=str(copy), epochs=1))


def test_warmup_bad_settings_are_one_line_errors(setup):
    for change, match in [({"fraction": 0.0}, r"WarmupConfig.fraction must be in \(0, 1\]"),
                          ({"examples": 41}, "only 40"), ({"lr": "fast"}, "WarmupConfig.lr: expected a number"),
                          ({"batch_size": 0}, r"WarmupConfig.batch_size must be in \[1, inf\]"),
                          ({"target_modules": ["q_proj", "qkv"]},
                           r"target_modules qkv: no module of this llama model is named so; its linear layers: "
                           r"q_proj, k_proj, v_proj, o_proj \(attention\); gate_proj, up_proj, down_proj$"),
                          ({"trainer": {"fsdp_shards": 2}}, "unknown TrainingArguments setting 'fsdp_shards'")]:
        config = dataclasses.replace(setup["config"], out=str(setup["root"] / "bad"), **change)
        with pytest.raises(PoiseError, match=match) as info:
            run_warmup(config)
        assert "\n" not in str(info.value)


def test_warmup_refuses_other_settings_naming_every_key_with_both_values(setup):
    changed = dataclasses.replace(setup["config"], lr=2e-3, epochs=3, seed=4, max_batch_size=2)
    with pytest.raises(PoiseError) as info:
        run_warmup(changed)
    message = str(info.value)
    assert "made by poise warmup with other settings (epochs: 2 -> 3; lr: 0.001 -> 0.002; seed: 3 -> 4)" in message
    assert "max_batch_size" not in message and "\n" not in message  # how a step is computed is no setting


def test_python_api_errors_name_the_class_and_field(setup, tmp_path):
    with pytest.raises(PoiseError, match=r"^WarmupConfig\.out is required"):
        run_warmup(dataclasses.replace(setup["config"], out=None))
    with pytest.raises(PoiseError, match=r"^WarmupConfig\.data is required"):
        run_warmup(dataclasses.replace(setup["config"], data=[], out=str(tmp_path / "w")))
    with pytest.raises(PoiseError, match=r"^TrainConfig\.selection is required"):
        run_train(TrainConfig(model=str(setup["model"]), out=str(tmp_path / "t")))
    with pytest.raises(PoiseError, match=r"^ImportConfig\.checkpoint is required"):
        import_checkpoint(ImportConfig(out=str(tmp_path / "i")))
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def no_dropout(setup) -> tuple[WarmupConfig, list[Path]]:
    """A warmup without dropout (so a reference can reproduce it), micro-batched by a small token budget."""
    config = dataclasses.replace(setup["config"], out=str(setup["root"] / "run-ref"), lora_dropout=0.0,
                                 max_batch_size=2, warmup_ratio=0.2, max_grad_norm=0.0)
    return config, run_warmup(config)


def test_warmup_equals_a_plain_adamw_loop(no_dropout):
    """Moments and adapter equal a reference loop: one padded batch per step, AdamW + HF linear schedule."""

    from poise.data import collate, read_examples, tokenize_examples
    from poise.lora import attach_lora
    from poise.losses import per_example_losses
    from poise.model import load_model, load_tokenizer

    config, checkpoints = no_dropout

    tokenizer = load_tokenizer(config.model)
    examples = read_examples(config.data[0])
    chosen = [examples[i] for i in subset_indices(len(examples), config.examples, config.seed)]
    _, items, _ = tokenize_examples(chosen, tokenizer, config.max_seq_length, progress=False)
    model = attach_lora(load_model(config.model), r=config.lora_r, alpha=config.lora_alpha, dropout=0.0,
                        target_modules=TARGETS, seed=config.seed)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    steps = math.ceil(len(items) / config.batch_size)
    total, n_warmup = steps * config.epochs, math.ceil(0.2 * steps * config.epochs)
    # linear warm-up whose first step is already positive, then linear decay (poise.train.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / n_warmup if s < n_warmup else (total - s) / (total - n_warmup))
    lr_sum, tol = 0.0, step_tolerance(config)
    for epoch in range(1, config.epochs + 1):
        order = epoch_order(len(items), config.seed, epoch)
        rates = []
        for s in range(steps):
            batch = collate([items[i] for i in order[s * config.batch_size:(s + 1) * config.batch_size]],
                            tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
            per_example_losses(logits, batch["labels"]).mean().backward()
            rates.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        folder = checkpoints[epoch - 1]
        info = json.loads((folder / CHECKPOINT_FILE).read_text())
        assert info["lr_mean"] == pytest.approx(sum(rates) / len(rates), rel=1e-12)
        moments = load_file(str(folder / MOMENTS_FILE))
        adapter = load_file(str(folder / ADAPTER_WEIGHTS))
        lr_sum += sum(rates)
        for name, p in named:
            state = optimizer.state[p]
            close(moments[f"{name}.exp_avg"], state["exp_avg"], tol)
            close(moments[f"{name}.exp_avg_sq"], state["exp_avg_sq"], 2 * tol)
            close_after_adam(adapter[name.replace(".default", "")], p.detach(), tol, lr_sum)



TORCHRUN_SCRIPT = """
import json, sys
from poise.config import WarmupConfig
from poise.warmup import run_warmup
run_warmup(WarmupConfig(**json.loads(sys.argv[1])))
"""


def test_two_rank_torchrun_warmup_equals_one_process(no_dropout, tmp_path):
    """Each rank takes half of every step's examples; the all-reduced gradients give the one-process step."""
    config, checkpoints = no_dropout
    script = tmp_path / "warmup.py"
    script.write_text(TORCHRUN_SCRIPT)
    two = dataclasses.replace(config, out=str(tmp_path / "two"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), json.dumps(dataclasses.asdict(two))],
        capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tol, lr_sum = step_tolerance(config), 0.0
    for k, folder in enumerate(checkpoints, start=1):
        other = tmp_path / "two" / f"checkpoint-{k}"
        info = json.loads((folder / CHECKPOINT_FILE).read_text())
        assert json.loads((other / CHECKPOINT_FILE).read_text())["lr_mean"] == info["lr_mean"]
        lr_sum += info["lr_mean"] * (info["step"] // info["epoch"])  # the epoch's steps times their mean rate
        expected, actual = load_file(str(folder / MOMENTS_FILE)), load_file(str(other / MOMENTS_FILE))
        assert expected.keys() == actual.keys()
        for key in expected:
            close(actual[key], expected[key], 2 * tol if key.endswith("exp_avg_sq") else tol)
        expected, actual = load_file(str(folder / ADAPTER_WEIGHTS)), load_file(str(other / ADAPTER_WEIGHTS))
        assert expected.keys() == actual.keys()
        for key in expected:
            close_after_adam(actual[key], expected[key], tol, lr_sum)

# ------------------------------------------------------------------------------------------ import
@pytest.fixture(scope="module")
def hf_run(setup, tmp_path_factory) -> dict:
    """A real transformers.Trainer LoRA run (2 epochs of 3 steps, a checkpoint per epoch) on the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("hf")
    tokenizer = tiny_tokenizer()
    rows = []
    for i in range(12):
        ids = tokenizer(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(10)))["input_ids"][:12]
        ids = ids + [tokenizer.pad_token_id] * (12 - len(ids))
        rows.append({"input_ids": ids, "attention_mask": [1] * 12, "labels": ids})
    model = AutoModelForCausalLM.from_pretrained(str(setup["model"]))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    arguments = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=4, num_train_epochs=2,
                                  learning_rate=1e-3, warmup_steps=1, save_strategy="epoch", logging_steps=1,
                                  report_to=[], use_cpu=True, optim="adamw_torch", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=rows)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    final = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            final[name] = {k: optimizer.state[p][k].detach().clone() for k in ("exp_avg", "exp_avg_sq")}
    checkpoint = root / "hf" / "checkpoint-6"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    return {"root": root, "checkpoint": checkpoint, "final": final, "model": model}


def test_import_hf_trainer_checkpoint(setup, hf_run):
    out = hf_run["root"] / "imported"
    assert import_checkpoint(ImportConfig(checkpoint=str(hf_run["checkpoint"]), out=str(out))) == out
    moments = load_file(str(out / MOMENTS_FILE))
    assert sorted(moments) == sorted(f"{n}.{k}" for n in hf_run["final"] for k in ("exp_avg", "exp_avg_sq"))
    assert list(hf_run["final"]) == trainable_names(setup["model"], out)
    for name, state in hf_run["final"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[f"{name}.{key}"], state[key]), (name, key)
    info = json.loads((out / CHECKPOINT_FILE).read_text())
    trainer_state = json.loads((hf_run["checkpoint"] / "trainer_state.json").read_text())
    rates = [e["learning_rate"] for e in trainer_state["log_history"] if "learning_rate" in e and 1 < e["epoch"] <= 2]
    assert len(rates) == 3
    assert info["lr_mean"] == pytest.approx(sum(rates) / 3)
    assert info["epoch"] == 2 and info["step"] == 6 and info["source"] == "hf-trainer import"
    assert info["model"] == str(setup["model"])
    assert info["betas"] == [0.9, 0.999] and info["eps"] == 1e-8
    assert (out / ADAPTER_WEIGHTS).read_bytes() == (hf_run["checkpoint"] / ADAPTER_WEIGHTS).read_bytes()
    # the same import again is up to date; another source into the same folder is refused
    assert import_checkpoint(ImportConfig(checkpoint=str(hf_run["checkpoint"]), out=str(out))) == out
    with pytest.raises(PoiseError, match=r"other settings \(epoch: 2 -> 1\)"):
        import_checkpoint(ImportConfig(checkpoint=str(hf_run["checkpoint"]), out=str(out), epoch=1))
    other = hf_run["checkpoint"].with_name("checkpoint-3")
    with pytest.raises(PoiseError) as info:
        import_checkpoint(ImportConfig(checkpoint=str(other), out=str(out)))
    assert (f"made by poise import-checkpoint with other settings (checkpoint: {str(hf_run['checkpoint'].resolve())!r} "
            f"-> {str(other.resolve())!r}; epoch: 2 -> 1)") in str(info.value)
    # a folder that is not a checkpoint is never replaced
    with pytest.raises(PoiseError, match="not a poise checkpoint folder"):
        import_checkpoint(ImportConfig(checkpoint=str(hf_run["checkpoint"]), out=str(hf_run["root"]), overwrite=True))
    # the checkpoint of epoch 1: the learning rates of epoch 1
    first = import_checkpoint(ImportConfig(checkpoint=str(hf_run["checkpoint"].with_name("checkpoint-3")),
                                           out=str(hf_run["root"] / "imported-1")))
    info = json.loads((first / CHECKPOINT_FILE).read_text())
    rates = [e["learning_rate"] for e in trainer_state["log_history"] if "learning_rate" in e and e["epoch"] <= 1]
    assert info["epoch"] == 1 and info["step"] == 3 and info["lr_mean"] == pytest.approx(sum(rates) / 3)


def test_import_fsdp_optimizer_bin(hf_run):
    """FSDP's optimizer.bin is keyed by wrapped parameter names, without peft's `.default`."""
    folder = hf_run["root"] / "fsdp"
    shutil.copytree(hf_run["checkpoint"], folder)
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    names = list(hf_run["final"])

    def fsdp_name(name: str) -> str:
        name = name.replace(".default", "").replace("base_model.model.model.layers.",
                                                    "_fsdp_wrapped_module.base_model.model.model.layers.")
        return name.replace(".self_attn.", "._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.")

    keyed = {"state": {fsdp_name(n): state["state"][i] for i, n in enumerate(names)},
             "param_groups": [{**state["param_groups"][0], "params": [fsdp_name(n) for n in names]}]}
    torch.save(keyed, folder / "optimizer.bin")
    (folder / "optimizer.pt").unlink()
    out = import_checkpoint(ImportConfig(checkpoint=str(folder), out=str(hf_run["root"] / "imported-fsdp")))
    moments = load_file(str(out / MOMENTS_FILE))
    for name, state in hf_run["final"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[f"{name}.{key}"], state[key]), (name, key)


def test_imported_checkpoints_yield_the_same_adam_features_as_the_native_one(setup, hf_run):
    """optimizer.pt (by index) and FSDP optimizer.bin (by name) imports = a poise checkpoint written from the
    Trainer's live model and optimizer state, all the way to the Adam features."""
    import numpy as np

    from poise.checkpoint import write_checkpoint
    from poise.config import FeaturesConfig
    from poise.features.stage import run_features

    root = hf_run["root"]
    moments = {f"{n}.{k}": v[k] for n, v in hf_run["final"].items() for k in ("exp_avg", "exp_avg_sq")}
    native = write_checkpoint(root / "native", hf_run["model"].save_pretrained, moments,
                              {"epoch": 2, "step": 6, "lr_mean": 1e-3, "model": str(setup["model"]),
                               "betas": [0.9, 0.999], "eps": 1e-8, "source": "test"})
    imported = import_checkpoint(ImportConfig(checkpoint=str(hf_run["checkpoint"]), out=str(root / "imp-a")))
    if not (root / "imported-fsdp").exists():
        test_import_fsdp_optimizer_bin(hf_run)
    features = {}
    sources = (("native", native), ("optimizer.pt", imported), ("optimizer.bin", root / "imported-fsdp"))
    for label, checkpoint in sources:
        out = root / "features" / label.replace(".", "-")
        run_features(FeaturesConfig(data=[str(setup["pool"])], out=str(out), checkpoint=str(checkpoint),
                                    model=str(setup["model"]), kind="adam", projection="none", max_seq_length=64,
                                    output_dtype="float32"))
        features[label] = np.load(out / "features.npy")
    assert np.abs(features["native"]).sum() > 0
    np.testing.assert_array_equal(features["optimizer.pt"], features["native"])
    np.testing.assert_array_equal(features["optimizer.bin"], features["native"])


def test_import_bad_inputs_are_one_line_errors(hf_run):
    root = hf_run["root"]

    def broken(name: str, change) -> Path:
        folder = root / name
        shutil.copytree(hf_run["checkpoint"], folder)
        change(folder)
        return folder

    def bad_shape(folder: Path) -> None:
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        state["state"][5]["exp_avg"] = torch.zeros(3, 3)
        torch.save(state, folder / "optimizer.pt")

    cases = [
        (root / "missing", "does not exist"),
        (broken("no-optimizer", lambda f: (f / "optimizer.pt").unlink()), "no optimizer.pt or optimizer.bin"),
        (broken("pickled", lambda f: torch.save({"state": {0: NotATensor()}}, f / "optimizer.pt")),
         "pickled objects"),
        (broken("shape", bad_shape), "exp_avg of base_model.model.model.layers.0.self_attn.v_proj.lora_B.default"
                                     ".weight has shape \\(3, 3\\)"),
        (broken("no-state", lambda f: (f / "trainer_state.json").unlink()), "no trainer_state.json"),
    ]
    for folder, match in cases:
        with pytest.raises(PoiseError, match=match) as info:
            import_checkpoint(ImportConfig(checkpoint=str(folder), out=str(root / f"out-{folder.name}")))
        assert "\n" not in str(info.value)
        assert not (root / f"out-{folder.name}").exists()


# ------------------------------------------------------------------------------ small warmup sets
@pytest.mark.parametrize("total,ratio", [(1, 0.03), (4, 0.03), (4, 0.5), (6, 0.2), (7, 1.0), (400, 0.03)])
def test_every_step_and_so_every_epoch_has_a_positive_learning_rate(total, ratio):
    from poise.train import learning_rate, warmup_steps

    n_warmup = warmup_steps(total, ratio)
    rates = [learning_rate(s, total, n_warmup, 2e-5) for s in range(total)]
    assert min(rates) > 0 and max(rates) == pytest.approx(2e-5)
    assert rates[:n_warmup] == sorted(rates[:n_warmup]) and rates[n_warmup:] == sorted(rates[n_warmup:], reverse=True)


def test_warmup_set_below_one_batch_warns_before_the_model_is_loaded(setup, monkeypatch):
    import poise.model

    def refuse(*args, **kwargs):
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(poise.model, "load_tokenizer", refuse)
    monkeypatch.setattr(poise.model, "load_model", refuse)
    config = dataclasses.replace(setup["config"], out=str(setup["root"] / "tiny-set"), examples=None, fraction=0.05,
                                 batch_size=128)
    with pytest.warns(UserWarning, match=r"trains on 2 examples \(--fraction 0.05 of 40 pool examples\), fewer than "
                                         r"one batch \(--batch-size 128\)"), \
            pytest.raises(RuntimeError, match="the model was loaded"):
        run_warmup(config)


def test_missing_data_is_one_error_line_before_the_model_is_loaded(setup, monkeypatch):
    import poise.model

    def refuse(*args, **kwargs):
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(poise.model, "load_tokenizer", refuse)
    monkeypatch.setattr(poise.model, "load_model", refuse)
    config = dataclasses.replace(setup["config"], out=str(setup["root"] / "no-data"),
                                 data=[str(setup["root"] / "missing.jsonl")])
    with pytest.raises(PoiseError, match="missing.jsonl"):
        run_warmup(config)


def test_rerun_of_a_complete_warmup_says_so(setup, capfd):
    run_warmup(setup["config"])
    assert "is already complete (2 checkpoints); nothing to do" in capfd.readouterr().err



@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_warmup_killed_after_an_epoch_resumes_and_ends_as_an_uninterrupted_run(setup, tmp_path):
    """SIGKILL right after epoch 1's checkpoints; the same command again resumes from the Trainer's checkpoint."""
    script = tmp_path / "warmup.py"
    script.write_text(TORCHRUN_SCRIPT)
    config = dataclasses.replace(setup["config"], out=str(tmp_path / "killed"))
    argv = [sys.executable, str(script), json.dumps(dataclasses.asdict(config))]
    killed = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300,
                            env={**os.environ, "POISE_KILL_AT": "epoch:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = Path(config.out)
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    # the Trainer's own checkpoint of that epoch, imported, holds the same adapter and moments as poise's
    imported = import_checkpoint(ImportConfig(checkpoint=str(out / "trainer" / "checkpoint-3"),
                                              out=str(tmp_path / "imported"), model=str(setup["model"]), epoch=1))
    for name in (ADAPTER_WEIGHTS, MOMENTS_FILE):
        tensors_equal(imported / name, out / "checkpoint-1" / name)
    before = (out / "checkpoint-1" / MOMENTS_FILE).stat().st_mtime_ns
    resumed = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "warmup: resuming at step 4 of 6" in resumed.stderr
    assert (out / "checkpoint-1" / MOMENTS_FILE).stat().st_mtime_ns == before  # epoch 1 not redone
    first = Path(setup["config"].out)
    for name in (ADAPTER_WEIGHTS, MOMENTS_FILE):
        assert (first / "checkpoint-2" / name).read_bytes() == (out / "checkpoint-2" / name).read_bytes()
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # one log line per step, none repeated by the resume


# ------------------------------------------------------------------------------ train on a selection
def _train_argv(setup, out: Path, selection: Path, *extra: str) -> list[str]:
    return ["train", "--selection", str(selection), "--model", str(setup["model"]), "--out", str(out),
            "--batch-size", "4", "--max-batch-size", "2", "--epochs", "2", "--lora-r", "4", "--lora-alpha", "16",
            "--lr", "1e-3", "--lora-dropout", "0", "--seed", "5", *extra]


def _mean_loss(model, tokenizer, items) -> float:
    from poise.data import collate
    from poise.losses import per_example_losses

    with torch.no_grad():
        batch = collate(items, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        return float(per_example_losses(logits, batch["labels"]).mean())


@pytest.fixture(scope="module")
def selection(setup) -> Path:
    """A selection-like JSONL of 12 pool examples."""
    return write_jsonl(setup["root"] / "selected.jsonl", [conversation(i) for i in range(12)])


def test_train_writes_a_peft_adapter_whose_loss_is_below_the_base_models(setup, selection, tmp_path, capsys):
    from peft import PeftModel

    from poise.cli import main
    from poise.data import read_examples, tokenize_examples
    from poise.model import load_model, load_tokenizer

    out = tmp_path / "trained"
    assert main(_train_argv(setup, out, selection, "--lr", "1e-2")) == 0
    printed = capsys.readouterr().out
    assert "train: 12 examples, 6 steps; loss " in printed and "PeftModel.from_pretrained" in printed
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5, 6] and all(row["lr"] > 0 for row in log)
    assert json.loads((out / "arguments.json").read_text())["settings"]["lr_scheduler"] == "cosine"
    assert not (out / "trainer").exists()
    tokenizer = load_tokenizer(str(setup["model"]))
    _, items, _ = tokenize_examples(read_examples(selection), tokenizer, 2048, progress=False)
    base = _mean_loss(load_model(str(setup["model"])), tokenizer, items)
    trained = _mean_loss(PeftModel.from_pretrained(load_model(str(setup["model"])), str(out)).eval(), tokenizer, items)
    assert trained < base - 0.1, (trained, base)
    # the same command again: complete, nothing redone
    assert main(_train_argv(setup, out, selection, "--lr", "1e-2")) == 0
    assert "is already complete" in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end run (make test-slow; CI runs it)
def test_train_killed_after_its_first_epoch_resumes_and_matches_an_uninterrupted_run(setup, selection, tmp_path):
    argv = [sys.executable, "-m", "poise"]
    whole = subprocess.run(argv + _train_argv(setup, tmp_path / "whole", selection), capture_output=True, text=True,
                           check=False, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = subprocess.run(argv + _train_argv(setup, tmp_path / "resumed", selection), capture_output=True,
                            text=True, check=False, timeout=300, env={**os.environ, "POISE_KILL_AT": "epoch:1"})
    assert killed.returncode == -9
    resumed = subprocess.run(argv + _train_argv(setup, tmp_path / "resumed", selection), capture_output=True,
                             text=True, check=False, timeout=300)
    assert resumed.returncode == 0 and "train: resuming at step 4 of 6" in resumed.stderr, resumed.stderr[-2000:]
    # the Trainer restores the optimizer, scheduler, data order and RNG states: the same bits
    assert (tmp_path / "whole" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "resumed" / ADAPTER_WEIGHTS).read_bytes()


def test_two_rank_torchrun_train_ends_with_the_one_process_adapter(setup, selection, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "poise", *_train_argv(setup, tmp_path / "one", selection)],
                         capture_output=True, text=True, check=False, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "poise", *_train_argv(setup, tmp_path / "two", selection)],
                         capture_output=True, text=True, check=False, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    config = dataclasses.replace(setup["config"], batch_size=4)
    lr_sum = sum(json.loads(line)["lr"] for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines())
    expected, actual = load_file(str(tmp_path / "one" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "two" /
                                                                                          ADAPTER_WEIGHTS))
    assert expected.keys() == actual.keys()
    for key in expected:
        close_after_adam(actual[key], expected[key], step_tolerance(config), lr_sum)


def test_train_bad_selections_are_one_line_errors(setup, tmp_path, capsys):
    from poise.cli import main

    folder = tmp_path / "sel"
    folder.mkdir()
    (folder / "selection.json").write_text(json.dumps({"indices": [0, 1]}))
    assert main(_train_argv(setup, tmp_path / "o", folder)) == 2
    err = capsys.readouterr().err
    assert "no selected.jsonl; pass --pool" in err and len(err.strip().splitlines()) == 1
    assert main(_train_argv(setup, tmp_path / "o", folder, "--pool", str(setup["pool"]))) == 0
    capsys.readouterr()
    # the same folder with another setting is refused, naming it
    assert main(_train_argv(setup, tmp_path / "o", folder, "--pool", str(setup["pool"]), "--lr", "2e-3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made by poise train with other settings (lr: 0.001 -> 0.002)" in err[0], err
    # every differing setting, with both of its values
    assert main(_train_argv(setup, tmp_path / "o", folder, "--pool", str(setup["pool"]), "--lr", "2e-3",
                            "--epochs", "3", "--max-batch-size", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with other settings (epochs: 2 -> 3; lr: 0.001 -> 0.002)" in err[0], err
