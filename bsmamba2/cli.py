"""`bsmamba2` command: one subcommand per capability, each defined in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.
"""
import argparse
import importlib
import logging
import sys

from . import __version__  # importing the package set OpenMP's wait policy before torch loads
from .errors import BSMamba2Error

COMMANDS = {
    # name: (module, one-line help)
    "separate": ("bsmamba2.separate", "split audio files into stems (files, folders or globs; torchrun shares them out)"),
    "train": ("bsmamba2.training.cli", "train or resume a model from a YAML config (torchrun for several processes)"),
    "evaluate": ("bsmamba2.evaluate", "separate a MUSDB18-HQ-style folder and score every stem (uSDR, cSDR)"),
    "benchmark": ("bsmamba2.benchmark", "time the scan backends side by side (and the whole model): speed, memory, error"),
    "models": ("bsmamba2.models_command", "list the known models (bundled and downloadable) and download them"),
    "export": ("bsmamba2.export", "write a model as ONNX (the network between STFT and iSTFT) for onnxruntime"),
    "ui": ("bsmamba2.ui.command", "a web page on this machine: drop songs, follow them, listen to and download stems"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsmamba2", description="BSMamba2 music source separation.")
    parser.add_argument("--version", action="version", version=f"bsmamba2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s")
    try:
        return args.run(args)
    except BSMamba2Error as error:
        print(f"bsmamba2 {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bsmamba2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
