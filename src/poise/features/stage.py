"""The `poise features` stage: data set + checkpoint -> one row of features per example.

Kinds: `adam` (training examples: LESS's Adam map of the gradient, using the checkpoint's moments),
`sgd` (validation examples: the plain gradient) and `reps` (RDS: a final-layer representation, pooled over the
tokens as `--pooling` says: last token, mean, or RDS+'s position-weighted mean).
Gradients are exact per-example LoRA gradients from one batched backward pass (capture.py), projected
parameter by parameter (projection.py) and L2-normalised (unless `--projection none`).

Runs as one process or under torchrun: batches are built once from the token lengths, ranks take
every world_size-th batch (so shards are length-balanced and the batches, hence the bits, are the same
as in one process) and write their rows of one shared memmap. Finished batches are skipped on restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from poise import distributed
from poise.checkpoint import base_model, read_moments
from poise.config import FeaturesConfig, validate
from poise.errors import PoiseError
from poise.features.store import FeatureStore
from poise.provenance import open_folder


def run_features(config: FeaturesConfig) -> Path:
    """Compute the features folder `config.out` (resuming an interrupted run with the same settings)."""
    import torch

    from poise.data import batch_plan, collate, tokenized_set
    from poise.data.tokenized import IdRows
    from poise.features.capture import backward_per_example, capture_lora_gradients, lora_linear_modules
    from poise.features.precondition import adam_direction
    from poise.features.projection import make_projector
    from poise.lora import adaptation, adaptation_line, load_adapter
    from poise.model import load_model, load_tokenizer

    validate(config)
    if config.projection == "none" and config.kind != "reps" and config.output_dtype != "float32" \
            and distributed.is_main():
        from poise.errors import warn

        warn(f"FeaturesConfig.output_dtype={config.output_dtype} keeps raw (unprojected, unnormalised) gradients "
             "at reduced precision (in float16, entries below 6e-5 in magnitude lose relative precision); pass "
             "output_dtype=float32 for exact ones")
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    if checkpoint is None and config.kind != "reps":
        raise PoiseError(f"FeaturesConfig.kind={config.kind} needs a checkpoint (a poise checkpoint or a peft adapter "
                         "folder)")
    if checkpoint is not None and not checkpoint.is_dir():
        raise PoiseError(f"checkpoint {str(checkpoint)!r} does not exist")
    if not config.model and checkpoint is None:
        raise PoiseError("FeaturesConfig.model is required when there is no checkpoint to name the base model")
    model_name = config.model or base_model(checkpoint)  # type: ignore[arg-type]
    if not model_name:
        raise PoiseError(f"{checkpoint}: cannot tell the base model; pass --model")

    distributed.init(config.device)
    device = distributed.device_for_rank(config.device)
    tokenizer = load_tokenizer(model_name)
    # the tokens on disk (built once, memory-mapped): this process holds only the kept rows and their lengths
    data = tokenized_set(config.data, tokenizer, config.max_seq_length, template=config.template, task=config.task,
                         progress=distributed.is_main())
    ids = IdRows(data)
    # before the model is loaded: a folder made with other settings (or other data) is refused here
    ids_digest = ids.digest()  # streams every id once
    opened = open_folder(config.out, "features", config, extra={"model": model_name, "ids": ids_digest},
                         collective=True)

    model = load_model(model_name, dtype=config.dtype, device=device)
    if checkpoint is not None:
        model = load_adapter(model, checkpoint, trainable=False)
    model.eval()

    settings: dict[str, Any] = {
        "kind": config.kind,
        "model": model_name,
        "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
        "data": [str(Path(p).resolve()) if Path(p).exists() else p for p in config.data],  # a path, or a hub id
        "ids": ids_digest,
        "max_seq_length": config.max_seq_length,
        "template": config.template,
        "dtype": config.dtype,
    }
    if checkpoint is not None:  # what the gradients (or, for reps, the forward) cover; said once and recorded
        settings["lora"] = adaptation(model)
        if distributed.is_main():
            from poise.progress import note

            note(f"features: {adaptation_line(settings['lora'])}")
    if config.kind == "reps":
        settings["pooling"] = config.pooling
        dim = int(model.config.hidden_size)
        projector = None
    else:
        modules = lora_linear_modules(model)
        shapes = {name: tuple(m.weight.shape) for name, m in modules.items()}
        projector = make_projector(config.projection, config.dim, config.seed, shapes, device=device)
        dim = projector.dim
        settings.update(projection=projector.describe(), seed=config.seed, parameters=[[n, list(s)] for n, s in
                                                                                      shapes.items()])
        if config.kind == "adam":
            settings["adam_formula"] = config.adam_formula
            moments = read_moments(checkpoint, list(shapes), device)  # type: ignore[arg-type]
            exp_avg = {n: t.flatten() for n, t in moments.exp_avg.items()}  # (n_p,) to match (b, n_p) gradients
            exp_avg_sq = {n: t.flatten() for n, t in moments.exp_avg_sq.items()}
            betas, eps, step = moments.betas, moments.eps, moments.step
            if config.adam_formula == "textbook" and step is None:
                raise PoiseError(f"{checkpoint}: checkpoint.json has no 'step', needed by --adam-formula textbook")

    store = FeatureStore.open(opened.folder, settings, ids, dim, dtype=config.output_dtype, resume=opened.resumed)

    batches = batch_plan(data.lengths, config.max_tokens, config.max_batch_size)
    done = store.done_batches()
    world, rank = distributed.world_size(), distributed.rank()
    assigned = [k for k in range(len(batches)) if k % world == rank]
    mine = [k for k in assigned if k not in done]
    pad_id = tokenizer.pad_token_id
    padding_side = getattr(tokenizer, "padding_side", "right") or "right"

    from poise.progress import note, track

    main = distributed.is_main()
    n_done = sum(batches.size(k) for k in done if k < len(batches))
    if main and not mine and len(done) == len(batches):
        note(f"features: {config.out} is already complete ({len(ids)} examples); nothing to do")
    elif main and done:
        note(f"features: resuming at {n_done} of {len(ids)} examples ({len(done)} of {len(batches)} batches "
             f"were done)")
    label = f"features ({config.kind})" + (f" rank {rank}/{world}" if world > 1 else "")
    total = sum(batches.size(k) for k in assigned)
    finished_here = sum(batches.size(k) for k in assigned if k in done)
    with track(label, total, unit="examples", done=finished_here, enabled=main and bool(mine)) as progress:
        for k in mine:
            rows = batches[k]
            batch = {key: value.to(device) for key, value in collate(data.items(rows), pad_id, padding_side).items()}
            if config.kind == "reps":
                values = _representations(model, batch, config.pooling)
            else:
                out = torch.zeros(len(rows), dim, dtype=torch.float32, device=device)

                def sink(name: str, grad: torch.Tensor, out=out) -> None:
                    flat = grad.reshape(grad.shape[0], -1).float()  # (b, n_p)
                    if config.kind == "adam":
                        flat = adam_direction(flat, exp_avg[name], exp_avg_sq[name], beta1=betas[0], beta2=betas[1],
                                              eps=eps, mode="adam" if config.adam_formula == "textbook" else "less",
                                              step=step)
                    projector.add(name, flat, out)

                with capture_lora_gradients(model, sink):
                    backward_per_example(model, batch)
                values = out
                if config.projection != "none":
                    values = torch.nn.functional.normalize(values, dim=1)
            store.write_batch(k, rows, values.detach().cpu().numpy())
            progress.advance(len(rows), tokens=int(batch["attention_mask"].sum()))
    complete = store.finish(len(batches))
    if not complete:  # pragma: no cover - only when another rank failed
        raise PoiseError(f"{config.out}: some batches are missing; rerun the same command to finish")
    return Path(config.out)


def _representations(model: Any, batch: dict, pooling: str):
    """(b, hidden) L2-normalised final-layer states: last non-pad token, the masked mean, or RDS+'s weighted mean.

    weighted-mean: token p of an example (p = 0, 1, ... counted over its real tokens, so left and right padding
    agree) weighs (p+1) / sum_q (q+1); pad tokens weigh 0 (RDS+, Ivison et al. 2025, after SGPT).
    """
    import torch

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": batch["position_ids"], "output_hidden_states": True, "use_cache": False}
    with torch.no_grad():
        try:  # the logits are not needed: ask for one position's (most causal LMs take logits_to_keep)
            out = model(**inputs, logits_to_keep=1)
        except TypeError:
            out = model(**inputs)
    hidden = out.hidden_states[-1].float()  # (b, t, h)
    mask = batch["attention_mask"]  # (b, t)
    if pooling == "mean":
        reps = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    elif pooling == "weighted-mean":
        real = mask.to(hidden.dtype)
        weights = real.cumsum(1) * real  # p+1 at a real token (p its position in the example), 0 at a pad
        reps = (hidden * (weights / weights.sum(1, keepdim=True))[..., None]).sum(1)
    else:
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * positions).argmax(dim=1)  # (b,)
        reps = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return torch.nn.functional.normalize(reps, dim=1)
