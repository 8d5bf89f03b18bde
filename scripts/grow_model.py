#!/usr/bin/env python3
"""Grow a trained model, as a starting point for fine-tuning a larger one instead of training it from scratch: by
one dual-path layer (`train.py --init GROWN --set model.depth=D+1`), or by mask estimators for more stems.

    python scripts/grow_model.py bsmamba2/pretrained/synth_vocals.ckpt runs/grown.ckpt [--seed N] [--force]
    python scripts/grow_model.py bsmamba2/pretrained/synth_vocals.ckpt runs/4stem.ckpt --stems vocals,drums,bass,other

Every layer is residual (x + block(x)), so a new last layer whose blocks' output projections are zero is the
identity: the grown model separates exactly as its source at first, and training moves it from there. With
--stems, the source's stems keep their mask estimators (and so their separation), the network before them is the
source's, and each new stem's estimator starts from the usual initialisation.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

import bsmamba2
from bsmamba2.checkpoint import build_model, moved_estimator_name, save_model
from bsmamba2.errors import BSMamba2Error
from bsmamba2.files import refuse_overwrite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="anything bsmamba2.load_model reads")
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0, help="for the new layer's initial weights (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--stems", type=lambda text: text.split(","), metavar="A,B,...",
                        help="instead of a layer, these stems (a superset of the source's, in the order wanted)")
    args = parser.parse_args()
    refuse_overwrite(args.output, args.force)
    source = bsmamba2.load_model(args.checkpoint)
    weights = source.state_dict()
    if args.stems:
        missing = [stem for stem in source.stems if stem not in args.stems]
        if missing:
            raise BSMamba2Error(f"--stems {','.join(args.stems)}: must keep the source's stems (missing "
                                f"{', '.join(missing)})")
        model_config = dataclasses.replace(source.config.model, stems=args.stems)
        # each kept stem's estimator moves to that stem's place in the new order; the new stems' are left out
        weights = {moved_estimator_name(name, source.stems, args.stems): tensor for name, tensor in weights.items()}
    else:
        model_config = dataclasses.replace(source.config.model, depth=source.config.model.depth + 1)
    torch.manual_seed(args.seed)  # the same source and seed always give the same grown weights
    grown = build_model(dataclasses.replace(source.config, model=model_config))
    grown.load_state_dict(weights, strict=False)  # all but the new layer or the new stems' estimators
    if not args.stems:
        for block in grown.layers[-1]:
            torch.nn.init.zeros_(block.linear.weight)
            torch.nn.init.zeros_(block.linear.bias)
    save_model(grown, args.output)
    change = f"--set model.depth={model_config.depth}" if not args.stems else f"stems {','.join(args.stems)}"
    print(f"{args.output}: depth {model_config.depth}, stems {','.join(model_config.stems)}, "
          f"{sum(p.numel() for p in grown.parameters()):,} parameters; fine-tune with --init {args.output} ({change})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BSMamba2Error as error:  # an unreadable or mismatched checkpoint: one line, not a traceback
        sys.exit(f"{Path(__file__).name}: error: {error}")
