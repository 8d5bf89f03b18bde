#!/usr/bin/env python3
"""Grow a trained model by one dual-path layer without changing what it computes, as a starting point for
fine-tuning a deeper model (`train.py --init GROWN --set model.depth=D+1`) instead of training it from scratch.

    python scripts/grow_model.py bsmamba2/pretrained/synth_vocals.ckpt runs/grown.ckpt [--seed N] [--force]

Every layer is residual (x + block(x)), so a new last layer whose blocks' output projections are zero is the
identity: the grown model separates exactly as its source at first, and training moves it from there.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

import bsmamba2
from bsmamba2.checkpoint import build_model, save_model
from bsmamba2.errors import BSMamba2Error
from bsmamba2.files import refuse_overwrite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="anything bsmamba2.load_model reads")
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0, help="for the new layer's initial weights (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args()
    refuse_overwrite(args.output, args.force)
    source = bsmamba2.load_model(args.checkpoint)
    model_config = dataclasses.replace(source.config.model, depth=source.config.model.depth + 1)
    torch.manual_seed(args.seed)  # the same source and seed always give the same grown weights
    grown = build_model(dataclasses.replace(source.config, model=model_config))
    grown.load_state_dict(source.state_dict(), strict=False)  # all but the new layer
    for block in grown.layers[-1]:
        torch.nn.init.zeros_(block.linear.weight)
        torch.nn.init.zeros_(block.linear.bias)
    save_model(grown, args.output)
    print(f"{args.output}: depth {model_config.depth}, {sum(p.numel() for p in grown.parameters()):,} parameters; "
          f"fine-tune with --init {args.output} --set model.depth={model_config.depth}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BSMamba2Error as error:  # an unreadable or mismatched checkpoint: one line, not a traceback
        sys.exit(f"{Path(__file__).name}: error: {error}")
