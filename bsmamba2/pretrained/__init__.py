"""The bundled default model and example song, shipped inside the package (its card: README.md here).

`synth_vocals.ckpt`: a CPU-sized vocals BSMamba2 (configs/synth_vocals.yaml) trained on synthetic songs, EMA
weights and config only. `example.flac`: a few seconds of a synthetic song it has never heard.
"""
from pathlib import Path

from ..errors import BSMamba2Error

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "synth_vocals.ckpt"
EXAMPLE = HERE / "example.flac"


def default_checkpoint() -> Path:
    """The bundled model: what `bsmamba2 separate` and `bsmamba2.load_model()` use when no checkpoint is named."""
    return _shipped(CHECKPOINT, "bundled model")


def example_song() -> Path:
    """The bundled example mixture: what `bsmamba2 separate` separates when no input is named."""
    return _shipped(EXAMPLE, "bundled example song")


def _shipped(path: Path, what: str) -> Path:
    if not path.is_file():
        raise BSMamba2Error(f"the {what} {path} is missing from this installation (reinstall bsmamba2, or name a "
                            f"file yourself)")
    return path
