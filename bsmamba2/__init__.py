"""BSMamba2: band-split bidirectional Mamba2 music source separation.

    model = bsmamba2.load_model("model.ckpt")          # ours or a published BSMamba2 checkpoint
    stems = model(wave)                                 # (batch, channels, samples) → (batch, stems, channels, samples)
    separator = bsmamba2.Separator()                    # chunked, streaming separation of arrays and files
"""
import importlib

from . import runtime as _runtime

__version__ = "0.1.0"

# OpenMP reads its wait policy when torch loads it: importing bsmamba2 first gives the Python API the commands'
# choice (idle threads sleep; see runtime.prepare_openmp).
_runtime.prepare_openmp()

# Public names, imported on first use so that `import bsmamba2.config` (or the CLI's start) stays light.
_EXPORTS = {
    "Config": "bsmamba2.config",
    "load_config": "bsmamba2.config",
    "build_model": "bsmamba2.checkpoint",
    "load_model": "bsmamba2.checkpoint",
    "Separator": "bsmamba2.api",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bsmamba2' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
