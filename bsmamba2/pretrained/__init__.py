"""The bundled models and example song, shipped inside the package (the models' cards: README.md and
synth_4stem.md here).

`synth_4stem.ckpt` (the default, `hub.DEFAULT_MODEL`): a CPU-sized four-stem BSMamba2 (configs/synth_4stem.yaml)
and `synth_vocals.ckpt`: a vocals one (configs/synth_vocals.yaml), both trained on synthetic songs, EMA weights and
config only; the registry (registry.yaml) names them. `example.flac`: a few seconds of a synthetic song they have
never heard.
"""
from pathlib import Path

from ..errors import BSMamba2Error

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / "example.flac"


def default_checkpoint() -> Path:
    """The default model's file: what `bsmamba2 separate` and `bsmamba2.load_model()` use when no checkpoint is
    named."""
    from ..hub import DEFAULT_MODEL, checkpoint_file

    return checkpoint_file(DEFAULT_MODEL, progress=False)[0]


def example_song() -> Path:
    """The bundled example mixture: what `bsmamba2 separate` separates when no input is named."""
    if not EXAMPLE.is_file():
        raise BSMamba2Error(f"the bundled example song {EXAMPLE} is missing from this installation (reinstall "
                            f"bsmamba2, or name a file yourself)")
    return EXAMPLE
