#!/usr/bin/env python3
"""Average the weights of models that share one architecture, e.g. a fine-tuned model and the model it started
from (weight-space ensembling, as in WiSE-FT: it often keeps more of what each learned than either alone).

    python scripts/average_models.py runs/a.ckpt runs/b.ckpt out.ckpt [--force]

Inputs are anything `bsmamba2.load_model` reads (training checkpoints give their EMA weights); the output is an
inference checkpoint with the first input's config.
"""
import argparse
import sys
from pathlib import Path

import torch

import bsmamba2
from bsmamba2.checkpoint import save_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="two or more checkpoints, then the output path")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args()
    *inputs, output = args.checkpoints
    if len(inputs) < 2:
        sys.exit("give at least two checkpoints to average, then the output path")
    if Path(output).exists() and not args.force:
        sys.exit(f"{output} exists; pass --force to overwrite")
    models = [bsmamba2.load_model(path) for path in inputs]
    for path, model in zip(inputs[1:], models[1:]):
        if (model.config.audio, model.config.model) != (models[0].config.audio, models[0].config.model):
            sys.exit(f"{path}: another architecture than {inputs[0]} (audio/model config differ)")
    states = [model.state_dict() for model in models]
    average = {name: torch.stack([state[name].float() for state in states]).mean(0).to(tensor.dtype)
               if tensor.is_floating_point() else tensor for name, tensor in states[0].items()}
    models[0].load_state_dict(average)
    save_model(models[0], output)
    print(f"{output}: the mean of {len(inputs)} models' weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
