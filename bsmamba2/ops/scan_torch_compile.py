"""The `torch+compile` backend: the chunked SSD scan under torch.compile, opt-in.

Compiling fuses the scan's elementwise passes (masks, decays, scaling) into a few loops, but each new input shape
costs a compilation, slow on a CPU (static shapes: they compile faster than dynamic ones, and a model sees few
shapes), so it only pays for long runs (training, many files). Where compilation fails
(no C++ compiler, an unsupported platform or torch build), the eager `torch` backend takes over — logged once.
A failure while compiling the backward pass (at the first `backward()`) is raised there, not caught.
"""
import logging

import torch

from .scan_torch import ssd_scan

logger = logging.getLogger("bsmamba2")
# torch.compile backend: inductor generates fused C++ loops; tests use "aot_eager" (same tracing, no C++ build).
COMPILE_BACKEND = "inductor"
_compiled = None
_compile_failed = False


def ssd_scan_compiled(*args, **kwargs):
    """`ssd_scan` through torch.compile; the eager version if compiling does not work here."""
    global _compiled, _compile_failed
    if _compile_failed:
        return ssd_scan(*args, **kwargs)
    if _compiled is None:
        _compiled = torch.compile(ssd_scan, backend=COMPILE_BACKEND, dynamic=False)
    try:
        return _compiled(*args, **kwargs)
    except Exception as error:
        result = ssd_scan(*args, **kwargs)  # if the eager scan fails too, the inputs are at fault: let that raise
        _compile_failed = True
        logger.warning("scan backend torch+compile: torch.compile failed (%s); using the eager torch scan",
                       f"{type(error).__name__}: {error}".splitlines()[0])
        return result
