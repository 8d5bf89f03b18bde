"""`python separate.py IN... [options]` is `bsmamba2 separate IN... [options]`; see `python separate.py --help`."""
import sys

from bsmamba2.cli import main

if __name__ == "__main__":
    sys.exit(main(["separate", *sys.argv[1:]]))
