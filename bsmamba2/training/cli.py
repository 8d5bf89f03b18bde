"""`bsmamba2 train` / `python train.py`: train or resume from a YAML config (torchrun for several processes).

    python train.py --config configs/small.yaml --out runs/small            # start, or continue runs/small
    python train.py --out runs/small --resume --set training.max_steps=4000 # continue with a new step budget
    python train.py --config configs/synth_vocals.yaml --init bsmamba2/pretrained/synth_vocals.ckpt \
        --set data.root=/data/my-songs --out runs/finetune                   # fine-tune the bundled vocals model
    torchrun --nproc_per_node 2 train.py --config configs/bsmamba2_vocals.yaml --set data.root=/data/musdb18hq
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BSMamba2Error
from ..runtime import setup_process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (optional when resuming: the checkpoint holds one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.max_steps=2000 (repeatable)")
    parser.add_argument("--out", help="run directory (default: runs/<config name>); a run directory that holds "
                                      "last.ckpt is continued")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last.ckpt (an error if there is none)")
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="start a new run from these weights (fine-tuning): ours, a bundled model's or a "
                             "published one; the config's audio and model sections must fit them")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")


def run(args: argparse.Namespace) -> int:
    from .loop import Trainer, prepare_run

    if args.out is None and args.config is None:
        raise BSMamba2Error("give --config (to start a run) or --out (to resume one)")
    setup_process()
    run_dir = Path(args.out) if args.out is not None else Path("runs") / Path(args.config).stem
    config, checkpoint = prepare_run(args.config, args.overrides, run_dir, args.resume)
    return Trainer(config, run_dir, checkpoint, quiet=args.quiet, init_from=args.init).run()
