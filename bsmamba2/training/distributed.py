"""One process or many (torchrun): rank, device, backend, and the few collective operations training needs.

Where this process stands (`runtime.TorchrunEnv`); without torchrun, training runs in one process. Backends: nccl for
CUDA, gloo otherwise. On a CPU the cores are shared out among the local processes.
"""
from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from ..runtime import TorchrunEnv, resolve_device, set_threads

# Ranks wait for each other during validation and checkpointing; give slow ones time before gloo gives up.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


class Distributed:
    def __init__(self, device_choice: str = "auto"):
        env = TorchrunEnv.from_environ()
        self.rank, self.world_size = env.rank, env.world_size
        self.device = resolve_device(device_choice, env.local_rank, option="training.device")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu" and env.local_world_size > 1:
            set_threads(env.cpu_threads())
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

