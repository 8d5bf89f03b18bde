"""Process-wide setup and device choice, decided here once for every command (separate, evaluate, train,
benchmark) and for the Python API.

    runtime.prepare_openmp()                    # first thing, before anything imports torch
    runtime.setup_process()                     # a command's (or load_model's on CPU): glibc keeps freed memory
    env = runtime.TorchrunEnv.from_environ()    # rank, world size, local rank (one process: 0, 1, 0)
    device = runtime.resolve_device("auto", env.local_rank)

torch is imported only inside the functions that need it, so that `bsmamba2 --help` stays quick.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Union

from .errors import BSMamba2Error

if TYPE_CHECKING:
    import torch

log = logging.getLogger("bsmamba2")

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

KEEP_FREED_MEMORY_ENV = "BSMAMBA2_KEEP_FREED_MEMORY"  # "0": leave malloc as it is in every entry point
_process_setup: Optional[dict] = None  # what setup_process applied, once it has run


def prepare_openmp() -> None:
    """OpenMP threads sleep rather than spin when idle: on a CPU shared with other jobs, spinning threads slow
    training steps down many times over. Set OMP_WAIT_POLICY=ACTIVE to spin on a dedicated machine. OpenMP reads
    the variable when it loads, so this must run before `import torch`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def setup_process(keep_freed_memory: bool = True, threads: Optional[int] = None) -> dict:
    """What a command, or `load_model` on the CPU, decides for its whole process: glibc keeps freed memory for
    reuse (see `_keep_freed_memory`; BSMAMBA2_KEEP_FREED_MEMORY=0 opts out), torch uses `threads` threads (default:
    torch's choice). The first call decides and logs it; later calls change nothing. Returns what was applied."""
    global _process_setup
    if _process_setup is None:
        keep_freed_memory = keep_freed_memory and os.environ.get(KEEP_FREED_MEMORY_ENV, "").strip() != "0"
        _process_setup = {"keep_freed_memory": keep_freed_memory and _keep_freed_memory(), "threads": None}
        if threads:
            set_threads(threads)
            _process_setup["threads"] = threads
        log.debug("process setup: malloc %s, %s torch threads, OMP_WAIT_POLICY=%s",
                  "keeps freed memory" if _process_setup["keep_freed_memory"] else "as is",
                  threads or "default", os.environ.get("OMP_WAIT_POLICY", "unset"))
    return _process_setup


def _keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never give freed memory back (glibc only). True if applied.

    glibc serves large allocations (above 128 KiB, adapting up to 32 MiB) with a fresh mmap and unmaps it on free,
    so the next tensor of that size takes a page fault per 4 KiB page. The model allocates and frees the same
    large tensors at every layer call on a CPU; kept, they are reused. The process then keeps its peak memory until
    it exits, and loops of many differently sized small tensors fragment the heap more: a process-wide choice for
    an application's entry point, never made on import."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):     # not glibc (macOS, Windows, musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this process."""
    import torch

    torch.set_num_threads(threads)
    log.debug("torch threads: %d", threads)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class TorchrunEnv:
    """Where this process stands among those that torchrun (or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK
    and LOCAL_WORLD_SIZE) started; without them, the one process of a world of one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "TorchrunEnv":
        world_size = int(environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(environ.get("RANK", "0")), world_size=world_size,
                   local_rank=int(environ.get("LOCAL_RANK", "0")),
                   local_world_size=int(environ.get("LOCAL_WORLD_SIZE", str(world_size))))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def cpu_threads(self) -> int:
        """This process's share of the machine's CPUs when it shares them with the other local processes."""
        return max(1, cpu_count() // self.local_world_size)


def resolve_device(name: Union[str, "torch.device"] = "auto", local_rank: Optional[int] = None,
                   option: str = "--device") -> "torch.device":
    """A torch device from "auto" (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:N" or "mps". With `local_rank`
    (torchrun's LOCAL_RANK), "auto" and "cuda" mean that process's own GPU, cuda:LOCAL_RANK. A named device that
    is not there is an error naming `option`, never a silent fallback."""
    import torch

    name = str(name)
    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    chosen = name
    if name == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu"
    if chosen == "cuda" and local_rank is not None:
        chosen = f"cuda:{local_rank}"
    try:
        device = torch.device(chosen)
    except RuntimeError:
        raise BSMamba2Error(f"{option} {name}: expected {DEVICE_NAMES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BSMamba2Error(f"{option} {name}: CUDA is not available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BSMamba2Error(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not mps_available:
        raise BSMamba2Error(f"{option} {name}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BSMamba2Error(f"{option} {name}: expected {DEVICE_NAMES}")
    return device

