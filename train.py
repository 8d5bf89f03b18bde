"""Train BSMamba2: `python train.py --config C.yaml [--set key=value ...] [--out RUN_DIR] [--resume]`."""
import os
import sys

# OpenMP threads sleep rather than spin when idle: on a CPU shared with other jobs, spinning threads made training
# steps 10× slower here. Set OMP_WAIT_POLICY=ACTIVE to spin on a dedicated machine. It must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bsmamba2.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
