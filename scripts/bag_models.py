#!/usr/bin/env python3
"""Make a bag of models: one checkpoint whose stems each come from the model trained best for them, as demucs'
htdemucs_ft takes each source from its own fine-tuned model (`bsmamba2.models.bag`). Each member is a checkpoint
and the stems taken from it; the bag's stems are in the order given, or in that of --stems.

    python scripts/bag_models.py bsmamba2/pretrained/synth_4stem.ckpt --half --sharing-members 2 --force \\
        --stems vocals,drums,bass,other bsmamba2/pretrained/synth_vocals.ckpt:vocals runs/bass14/best.ckpt:bass \\
        runs/dbo10/best.ckpt:drums,other

A member keeps the mask estimators of its stems only. The members must share their audio settings (one STFT feeds
them all).
"""
import argparse
import sys
from pathlib import Path

import bsmamba2
from bsmamba2.checkpoint import keep_stems, save_model
from bsmamba2.errors import BSMamba2Error
from bsmamba2.files import refuse_overwrite
from bsmamba2.models.bag import BagOfModels


def member(text: str) -> tuple:
    path, _, stems = text.rpartition(":")
    if not path or not stems:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CHECKPOINT:STEM[,STEM...]")
    return path, stems.split(",")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("members", nargs="+", type=member, metavar="CHECKPOINT:STEMS",
                        help="a checkpoint (anything bsmamba2.load_model reads) and the stems it gives")
    parser.add_argument("--half", action="store_true", help="store the weights as float16 (half the file)")
    parser.add_argument("--sharing-members", type=int, default=0, metavar="N",
                        help="the last N members' stems share what the others leave of the mixture, so that the "
                             "stems sum to it (for a bag whose stems make up the whole mix)")
    parser.add_argument("--stems", type=lambda text: text.split(","), metavar="STEM,STEM...",
                        help="the bag's stems in this order (default: in the members' order)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args()
    refuse_overwrite(args.output, args.force)
    members = [keep_stems(bsmamba2.load_model(path), stems) for path, stems in args.members]
    given = [stem for _, stems in args.members for stem in stems]
    bag = BagOfModels(members, args.stems or given, args.sharing_members)
    save_model(bag, args.output, half=args.half)
    print(f"{args.output}: stems {', '.join(bag.stems)} from {len(members)} models, "
          f"{sum(p.numel() for p in bag.parameters()):,} parameters, {Path(args.output).stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BSMamba2Error as error:  # an unreadable checkpoint or a stem it lacks: one line, not a traceback
        sys.exit(f"{Path(__file__).name}: error: {error}")
