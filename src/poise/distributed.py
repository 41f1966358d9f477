"""torch.distributed helpers that are no-ops without a process group.

Under `torchrun` (WORLD_SIZE > 1) `init()` joins the group: NCCL when the device is CUDA, gloo
otherwise (which is how the tests run 2 ranks on a CPU). Features need no gradient communication:
ranks only share the output file and meet at barriers.
"""

from __future__ import annotations

import os
from datetime import timedelta


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


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
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
