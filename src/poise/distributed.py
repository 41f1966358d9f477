"""torch.distributed helpers that are no-ops without a process group.

Under `torchrun` (WORLD_SIZE > 1) `init()` joins the group: NCCL when the device is CUDA, gloo
otherwise (which is how the tests run 2 ranks on a CPU). Features need no gradient communication:
ranks only share the output file and meet at barriers.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any


def _group() -> Any:
    """torch.distributed when a process group is up, else None. Without torch imported there can be none, so
    the layers that never load torch (selection, report) do not import it for this."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str = "cpu") -> bool:
    """Join the process group when launched by torchrun; returns whether running distributed."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return True


def device_for_rank(device: str) -> str:
    """`cuda` becomes `cuda:<local rank>` under torchrun; anything else is kept."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{local_rank()}"
    return device


def barrier() -> None:
    dist = _group()
    if dist is not None:
        dist.barrier()


def shutdown() -> None:
    dist = _group()
    if dist is not None:
        dist.destroy_process_group()
