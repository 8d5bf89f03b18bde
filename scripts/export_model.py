#!/usr/bin/env python3
"""Export a training checkpoint as a small inference checkpoint: the resolved config and the EMA weights only;
or, given several checkpoints of one architecture, the mean of their weights (weight-space ensembling, as in
WiSE-FT: a fine-tuned model averaged with the model it started from often keeps more of what each learned).

    python scripts/export_model.py runs/synth_vocals/best.ckpt bsmamba2/pretrained/synth_vocals.ckpt [--force]
    python scripts/export_model.py runs/a.ckpt runs/b.ckpt averaged.ckpt [--force]
    python scripts/export_model.py runs/synth_vocals/best.ckpt synth_vocals.safetensors
    python scripts/export_model.py runs/synth_4stem/best.ckpt bsmamba2/pretrained/synth_4stem.ckpt --half

Inputs are anything `bsmamba2.load_model` reads; the result loads with it too, with the first input's config and
without the optimizer state, raw weights and random-generator states that only resuming needs. An output ending in
.safetensors is written in that format, with the config as JSON in its metadata. --half stores the weights as
float16 (half the size; the model still computes in float32) and prints how closely the stored model's stems
agree with the float32 model's on the bundled example song (SDR in dB).
"""
import argparse
import sys
from pathlib import Path

import soundfile
import torch

import bsmamba2
from bsmamba2.checkpoint import save_model
from bsmamba2.errors import BSMamba2Error
from bsmamba2.files import refuse_overwrite
from bsmamba2.metrics import usdr
from bsmamba2.pretrained import example_song
from bsmamba2.sizes import megabytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="checkpoint", help="one or more checkpoints")
    parser.add_argument("output")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--half", action="store_true", help="store the weights as float16 (half the file)")
    args = parser.parse_args()
    refuse_overwrite(args.output, args.force)
    models = [bsmamba2.load_model(path) for path in args.checkpoints]
    first = models[0]
    for path, model in zip(args.checkpoints[1:], models[1:]):
        if (model.config.audio, model.config.model) != (first.config.audio, first.config.model):
            sys.exit(f"{path}: another architecture than {args.checkpoints[0]} (audio/model config differ)")
    if len(models) > 1:
        states = [model.state_dict() for model in models]
        first.load_state_dict({name: torch.stack([state[name].float() for state in states]).mean(0).to(tensor.dtype)
                               if tensor.is_floating_point() else tensor for name, tensor in states[0].items()})
    save_model(first, args.output, half=args.half)
    agreement = f", agrees with float32 to {half_agreement(first, args.output):.1f} dB" if args.half else ""
    averaged = f", the mean of {len(models)} models" if len(models) > 1 else ""
    print(f"{args.output}: {sum(p.numel() for p in first.parameters()):,} parameters{averaged}, "
          f"{megabytes(Path(args.output).stat().st_size)}{agreement}")
    return 0


def half_agreement(model, stored_path: str) -> float:
    """SDR (dB) of the stored float16 weights' stems against `model`'s own, on the bundled example song: the
    stems of every stem and channel taken as one signal."""
    audio, _ = soundfile.read(example_song(), dtype="float32", always_2d=True)
    mixture = torch.from_numpy(audio.T.copy()).unsqueeze(0)
    with torch.inference_mode():
        expected, stored = model.eval()(mixture), bsmamba2.load_model(stored_path)(mixture)
    return usdr(expected.numpy(), stored.numpy())


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BSMamba2Error as error:  # an unreadable or mismatched checkpoint: one line, not a traceback
        sys.exit(f"{Path(__file__).name}: error: {error}")
