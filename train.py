"""Train BSMamba2: `python train.py --config C.yaml [--set key=value ...] [--out RUN_DIR] [--resume]`."""
import sys

from bsmamba2.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
