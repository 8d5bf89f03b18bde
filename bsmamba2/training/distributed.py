"""One process or many (torchrun): rank, device, backend, and the few collective operations training needs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; without them training runs in one process.
Backends: nccl for CUDA, gloo otherwise. On a CPU the cores are shared out among the local processes.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from ..errors import BSMamba2Error

# Ranks wait for each other during validation and checkpointing; give slow ones time before gloo gives up.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


class Distributed:
    def __init__(self, device_choice: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        self.device = _pick_device(device_choice, self.local_rank)
        if self.device.type == "cpu" and local_world_size > 1:
            torch.set_num_threads(max(1, _cpu_count() // local_world_size))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (the tensor itself in one process)."""
        if self.world_size > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values

    def gather(self, value: Any) -> list:
        """Every rank's picklable `value`, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise BSMamba2Error("training.device: cuda requested but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if choice == "mps" and not torch.backends.mps.is_available():
        raise BSMamba2Error("training.device: mps requested but this torch has no MPS device")
    return torch.device(choice)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
