#!/usr/bin/env python3
"""Export a training checkpoint as a small inference checkpoint: the resolved config and the EMA weights only.

    python scripts/export_model.py runs/synth_vocals/best.ckpt bsmamba2/pretrained/synth_vocals.ckpt [--force]

The result loads with `bsmamba2.load_model(path)` like the training checkpoint did (same weights), without the
optimizer state, raw weights and random-generator states that only resuming needs.
"""
import argparse
import sys
from pathlib import Path

import bsmamba2
from bsmamba2.checkpoint import save_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args()
    if Path(args.output).exists() and not args.force:
        sys.exit(f"{args.output} exists; pass --force to overwrite")
    model = bsmamba2.load_model(args.checkpoint)
    save_model(model, args.output)
    size = Path(args.output).stat().st_size / 2 ** 20
    print(f"{args.output}: {sum(p.numel() for p in model.parameters()):,} parameters, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
