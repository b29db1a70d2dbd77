"""torchrun/DDP support: the process group exists only when the command runs under torchrun."""

from __future__ import annotations

import os

# torch.distributed is imported inside the functions: recipe validation must not pay for importing torch.


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> None:
    """Join torchrun's process group: gloo on CPU, nccl on CUDA. A no-op for a single process."""
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
