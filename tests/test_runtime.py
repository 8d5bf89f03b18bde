"""Process setup (malloc, threads), the torchrun environment and device choice, from bsmamba2.runtime."""
import json
import platform
import subprocess
import sys

import pytest
import torch

from bsmamba2 import runtime
from bsmamba2.errors import BSMamba2Error
from bsmamba2.runtime import TorchrunEnv, resolve_device


def test_setup_process_in_a_fresh_process():
    """Process-wide, so it runs in a child: malloc kept on glibc (not elsewhere), big tensors still allocate and
    free, the threads asked for; a second call changes nothing."""
    code = ("import json, torch\n"
            "from bsmamba2 import runtime\n"
            "first = runtime.setup_process(threads=1)\n"
            "sums = [torch.ones(64, 2 ** 20).sum().item() for _ in range(3)]\n"
            "second = runtime.setup_process(keep_freed_memory=False, threads=2)\n"
            "print(json.dumps([first, second, torch.get_num_threads(), sums]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    first, second, threads, sums = json.loads(done.stdout.splitlines()[-1])
    assert first == second == {"keep_freed_memory": platform.libc_ver()[0] == "glibc", "threads": 1}
    assert threads == 1 and sums == [64 * 2 ** 20] * 3


def test_keep_freed_memory_without_mallopt(monkeypatch):
    """On a C library without mallopt (macOS, musl, Windows) it changes nothing and says so."""
    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(runtime.ctypes, "CDLL", NoMallopt)
    monkeypatch.setattr(runtime, "_process_setup", None)
    assert runtime.setup_process(threads=None)["keep_freed_memory"] is False


def test_torchrun_environment():
    assert TorchrunEnv.from_environ({}) == TorchrunEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)
    env = TorchrunEnv.from_environ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.is_main) == (5, 8, 1, 4, False)
    assert TorchrunEnv.from_environ({"WORLD_SIZE": "3"}).local_world_size == 3  # one machine unless told
    assert env.cpu_threads() == max(1, runtime.cpu_count() // 4)
    with pytest.raises(Exception):
        env.rank = 0  # frozen: read once, the same everywhere


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"), local_rank=3)
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if torch.cuda.is_available():
        assert resolve_device("auto", local_rank=0) == resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    else:
        with pytest.raises(BSMamba2Error, match="--device cuda: CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(BSMamba2Error, match="^training.device cuda: CUDA is not available"):
            resolve_device("cuda", local_rank=1, option="training.device")
    for name in ("tpu", "cuda:x"):
        with pytest.raises(BSMamba2Error, match=f"--device {name}: expected auto, cpu, cuda, cuda:N or mps"):
            resolve_device(name)
