"""Compute device and process-group set-up shared by every verb."""

from __future__ import annotations

import os

from kvtool.errors import KvtoolError


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available; under torchrun, cuda -> this rank's GPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KvtoolError(f"--device {device} asked for, but no CUDA GPU is visible: use --device cpu")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    elif device != "cpu":
        raise KvtoolError(f"unknown --device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


def init_distributed(device: str) -> tuple[int, int]:
    """Join a torchrun/accelerate process group when one is set up (gloo on CPU, NCCL on GPUs)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(torch.device(device))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
