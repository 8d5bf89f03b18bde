"""`python benchmark_mamba_ssm.py [options]` is `bsmamba2 benchmark [options]`; see `--help`."""
import sys

from bsmamba2.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
