"""`bsmamba2 export`: write a model's network as ONNX, for onnxruntime and other ONNX runtimes.

    bsmamba2 export model.ckpt model.onnx [--chunk SECONDS] [--force]
    bsmamba2 export --model bsmamba2-vocals-msst vocals.onnx

The file maps the STFT of one chunk of mixture to the stems' STFTs (`bsmamba2.onnx`); `bsmamba2 separate
--checkpoint model.onnx` runs it, and its metadata says how to run it anywhere else (docs/onnx.md).
"""
from __future__ import annotations

import argparse
import logging
import time

from .errors import BSMamba2Error
from .files import refuse_overwrite
from .runtime import setup_process

log = logging.getLogger("bsmamba2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                        help="a BSMamba2 checkpoint, ours or a published one (default: the default model)")
    parser.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write")
    parser.add_argument("--model", metavar="NAME", help="instead of CHECKPOINT, a model from the registry "
                        "(`bsmamba2 models` lists them); downloaded on first use")
    parser.add_argument("--config", help="YAML config overriding the one stored in the checkpoint")
    parser.add_argument("--chunk", type=float, metavar="SECONDS",
                        help="the chunk length the file takes, fixed at export (default: the config's inference "
                             "chunk)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT.onnx")


def run(args: argparse.Namespace) -> int:
    setup_process()
    if args.model and args.checkpoint:
        raise BSMamba2Error("choose either CHECKPOINT or --model, not both")
    refuse_overwrite(args.out, args.force)
    from .checkpoint import load_model  # imports torch: only once a run starts, so `--help` stays quick
    from .onnx import export_onnx

    checkpoint, config = args.checkpoint, args.config
    if args.model:
        from .hub import checkpoint_file

        checkpoint, registry_config = checkpoint_file(args.model, progress=True)
        config = config if config is not None else registry_config
    model = load_model(checkpoint, config)
    started = time.perf_counter()
    agreement = export_onnx(model, args.out, chunk_seconds=args.chunk)
    log.info("wrote %s in %.0f s; onnxruntime agrees with PyTorch to %.0f dB", args.out,
             time.perf_counter() - started, agreement)
    return 0
