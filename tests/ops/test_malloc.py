"""keep_freed_memory: applied where glibc is, a clean False elsewhere; allocations keep working either way."""
import subprocess
import sys


def test_keep_freed_memory_in_a_fresh_process():
    """Process-wide, so it runs in a child: True on glibc, False elsewhere; big tensors still allocate and free."""
    code = ("import platform, torch\n"
            "from bsmamba2.ops.malloc import keep_freed_memory\n"
            "applied = keep_freed_memory()\n"
            "assert applied == (platform.libc_ver()[0] == 'glibc'), applied\n"
            "for _ in range(3):\n"
            "    t = torch.ones(64, 2 ** 20); assert t.sum().item() == 64 * 2 ** 20; del t\n"
            "print('ok', applied)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_keep_freed_memory_without_mallopt(monkeypatch):
    """On a C library without mallopt (macOS, musl, Windows) it changes nothing and says so."""
    from bsmamba2.ops import malloc

    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(malloc.ctypes, "CDLL", NoMallopt)
    assert malloc.keep_freed_memory() is False
