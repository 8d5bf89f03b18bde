"""Keep freed memory for reuse on glibc (Linux), so that large CPU tensors do not pay page faults on every call.

glibc serves large allocations (above 128 KiB, adapting up to 32 MiB) with a fresh mmap and unmaps it on free, so
the next tensor of that size takes a page fault per 4 KiB page (about a microsecond each, plus zeroing). The
BSMamba2 model allocates hundreds of MB per layer call on CPU. Measured on the 2-core development machine, one
thread, the paper model separating 4 s of audio: 50–52 s of CPU with malloc as is, 29.5–30 s after
`keep_freed_memory()`; peak memory 1.25 → 1.5 GB, and the process keeps its peak until it exits (with inputs of
mixed lengths it plateaus at the largest one's peak rather than growing). Loops of many differently sized small
tensors fragment the heap more (the sequential reference scan's peak grows several-fold), so this is for the
application, not the library: a process-wide choice that a command-line entry point makes, never done on import.
"""
import ctypes
import ctypes.util
import logging

logger = logging.getLogger("bsmamba2")

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never give freed memory back (glibc only). True if applied."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):     # not glibc (macOS, Windows, musl): nothing to tune
        return False
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    if applied:
        logger.debug("malloc: large blocks from the heap, freed memory kept for reuse")
    return applied
