"""`bsmamba2 separate`: split audio files into stems.

    bsmamba2 separate song.mp3 album/ "live/*.flac" -o separated --two-stems vocals
    torchrun --nproc_per_node 4 -m bsmamba2 separate music/ --recursive      # the files are shared out across ranks

The model is loaded once; then every file is separated on its own. A file that cannot be separated is reported
on one line and the run goes on; the failures are listed again at the end and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import glob
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.contrib.logging import logging_redirect_tqdm

from .audio import AUDIO_EXTENSIONS, BIT_DEPTHS, OUTPUT_FORMATS
from .config import QUANTIZE_MODES
from .errors import BSMamba2Error
from .runtime import DEVICE_NAMES, TorchrunEnv, resolve_device, setup_process

if TYPE_CHECKING:
    from .api import Separator

log = logging.getLogger("bsmamba2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="IN", help="audio files, folders or glob patterns")
    parser.add_argument("-o", "--out-dir", default="separated", help="output folder (default: %(default)s)")
    add_model_flags(parser)

    stems = parser.add_argument_group("stems").add_mutually_exclusive_group()
    stems.add_argument("--stems", help="write only these stems, comma-separated (e.g. vocals,drums)")
    stems.add_argument("--two-stems", metavar="STEM",
                       help="write STEM and no_STEM = mixture - STEM (e.g. --two-stems vocals → instrumental)")

    output = parser.add_argument_group("output")
    output.add_argument("--format", default="wav", choices=OUTPUT_FORMATS, help="default: %(default)s")
    output.add_argument("--bit-depth", default="24", choices=list(BIT_DEPTHS),
                        help="16 and 24 clip at full scale (with a warning); 32f (wav only) keeps every value "
                             "(default: %(default)s)")
    output.add_argument("--filename", default="{track}/{stem}.{ext}",
                        help="output path template inside OUT_DIR, fields {track}, {stem}, {ext} "
                             "(default: %(default)s)")
    output.add_argument("--force", action="store_true", help="overwrite existing stems")

    running = parser.add_argument_group("run")
    running.add_argument("--recursive", action="store_true", help="search folders recursively")
    running.add_argument("--jobs", type=int, default=1, metavar="N",
                         help="N >= 2: decode in a background thread and encode in N-1 threads beside inference "
                              "(default: %(default)s)")
    running.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-file summaries")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The options that choose a model and how to apply it, shared by every command that separates
    (`load_separator` reads them)."""
    model = parser.add_argument_group("model")
    which = model.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME",
                       help="a model from the registry (`bsmamba2 models` lists them); downloaded on first use")
    which.add_argument("--checkpoint", help="a BSMamba2 checkpoint, ours or a published one "
                       "(default: the bundled pretrained model)")
    model.add_argument("--config", help="YAML config overriding the one stored in the checkpoint")
    model.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (default: auto = CUDA, else MPS, else "
                       "CPU); under torchrun each rank takes cuda:LOCAL_RANK")
    model.add_argument("--quantize", choices=QUANTIZE_MODES,
                       help="int8: run the projections in int8, faster on the CPU (CPU only; default: float32)")

    chunking = parser.add_argument_group("chunked inference (defaults: the config's inference section)")
    chunking.add_argument("--chunk", type=float, metavar="SECONDS", help="chunk length in seconds")
    chunking.add_argument("--overlap", type=float, metavar="FRACTION", help="overlap of neighbouring chunks, [0, 1)")
    chunking.add_argument("--batch-size", type=int, metavar="N", help="chunks per forward pass")
    chunking.add_argument("--tta", action="store_true",
                          help="test-time augmentation: average with polarity-inverted and channel-swapped passes "
                               "(3x the compute)")


def load_separator(args: argparse.Namespace, **options) -> "Separator":
    """The Separator that `add_model_flags`'s options describe, with `options` for the rest (stems, output);
    under torchrun on a CUDA machine it runs on this rank's own GPU."""
    from .api import Separator  # imports torch: only once a run starts, so `--help` stays quick

    env = TorchrunEnv.from_environ()
    device = resolve_device(args.device, env.local_rank if env.world_size > 1 else None)
    return Separator(args.checkpoint, device, model=args.model, config=args.config, chunk_seconds=args.chunk,
                     overlap=args.overlap, batch_size=args.batch_size, tta=args.tta, quantize=args.quantize,
                     **options)


def run(args: argparse.Namespace) -> int:
    setup_process()

    # torchrun (or any launcher setting these) runs one process per rank; each takes every world_size-th file
    env = TorchrunEnv.from_environ()
    if env.world_size > 1:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[rank {env.rank}] %(message)s"))
    files, problems = find_inputs(args.inputs or default_inputs(), args.recursive)
    failures = []

    def report(message: str) -> None:
        failures.append(message)
        print(f"error: {message}", file=sys.stderr)

    if env.is_main:  # input problems are the same on every rank: rank 0 reports them
        for problem in problems:
            report(problem)

    separator = load_separator(
        args, stems=[name.strip() for name in args.stems.split(",") if name.strip()] if args.stems else None,
        two_stems=args.two_stems, file_format=args.format, bit_depth=args.bit_depth, filename=args.filename,
        force=args.force, jobs=args.jobs, progress=not args.quiet)

    # two inputs that the filename template maps to the same stems: the first one keeps them
    owner = {}
    for path in files:
        for output in separator.output_paths(path, args.out_dir).values():
            owner.setdefault(output, path)

    mine = files[env.rank::env.world_size]
    with logging_redirect_tqdm():
        for path in mine:
            try:
                outputs = separator.output_paths(path, args.out_dir).values()
                clash = next((owner[output] for output in outputs if owner[output] != path), None)
                if clash is not None:
                    raise BSMamba2Error(f"{path}: its stems would overwrite those of {clash} "
                                        "(use {track} in --filename or separate them in two runs)")
                separator.separate_file(path, args.out_dir)
            except BSMamba2Error as error:
                report(str(error))
            except Exception as error:  # a bug or a device failure on one file must not lose the others
                log.error("unexpected failure on %s", path, exc_info=True)
                report(f"{path}: {type(error).__name__}: {error}")

    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


def default_inputs() -> list[str]:
    """What `bsmamba2 separate` with no IN separates: the bundled example song."""
    from .pretrained import example_song

    return [str(example_song())]


def find_inputs(items: list[str], recursive: bool) -> tuple[list[Path], list[str]]:
    """The audio files that files, folders and glob patterns name, each once and in order, and one message
    per item that names nothing usable."""
    files, problems = [], []
    for item in items:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                hint = "" if recursive else " (add --recursive to search its subfolders)"
                problems.append(f"{path}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in this folder{hint}")
            files += found
        elif path.exists() or not any(wildcard in item for wildcard in "*?["):
            files.append(path)  # a missing file is reported when it is opened, like any unreadable one
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=recursive) if Path(p).is_file())
            if not found:
                problems.append(f"{item}: no file matches this pattern")
            files += found
    seen, unique = set(), []
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique, problems
