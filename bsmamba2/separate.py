"""`bsmamba2 separate`: split audio files into stems.

    bsmamba2 separate song.mp3 album/ "live/*.flac" -o separated --two-stems vocals
    torchrun --nproc_per_node 4 -m bsmamba2 separate music/ --recursive      # the files are shared out across ranks

The model is loaded once; then every file is separated on its own. A run can be repeated: a track whose stems
are all there is skipped, a track with some missing gets those (--force rewrites everything): the rule of
`Separator.separate_file`. A file that cannot be separated is reported on one line, the run goes on, and the exit
status is then 1. The first Ctrl-C stops after the file in progress (exit 130), a second one at once. Each line
printed is news: a count of zero, or a summary of a single input, is left out.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import soundfile as sf
from tqdm.contrib.logging import logging_redirect_tqdm

from .audio import AUDIO_EXTENSIONS, BIT_DEPTHS, BITRATES, DEFAULT_BIT_DEPTH, DEFAULT_BITRATE, OUTPUT_FORMATS
from .config import QUANTIZE_MODES
from .errors import BSMamba2Error
from .files import write_text_atomic
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
    output.add_argument("--format", default="wav", choices=list(OUTPUT_FORMATS),
                        help="mp3, ogg (Vorbis) and opus where the installed libsndfile writes them "
                             "(default: %(default)s)")
    output.add_argument("--bit-depth", choices=list(BIT_DEPTHS),
                        help="wav and flac only: 16 and 24 clip at full scale (with a warning); 32f (wav only) keeps "
                             f"every value (default: {DEFAULT_BIT_DEPTH})")
    ranges = ", ".join(f"{name} {low}-{high}" for name, (low, high) in BITRATES.items())
    output.add_argument("--bitrate", type=int, metavar="KBPS",
                        help=f"lossy formats only: {ranges} kbps; mp3 is constant bitrate, ogg and opus aim at it "
                             f"(default: {DEFAULT_BITRATE})")
    output.add_argument("--filename", default="{track}/{stem}.{ext}",
                        help="output path template inside OUT_DIR, fields {track}, {stem}, {ext}, {input_ext} (the "
                             "input's extension) and {folder} (the input's folder under the folder or pattern it "
                             "was found by, e.g. {folder}/{track}/{stem}.{ext} mirrors a --recursive tree) "
                             "(default: %(default)s)")
    output.add_argument("--force", action="store_true",
                        help="rewrite every stem (default: skip tracks whose stems are all there, write the "
                             "missing ones of the others)")
    output.add_argument("--report", metavar="FILE",
                        help="write a JSON summary: every input with its status, stems, duration and real-time "
                             "factor (under torchrun one file per rank, FILE.rankN)")
    output.add_argument("--json", action="store_true", help="print that JSON summary on stdout")

    running = parser.add_argument_group("run")
    running.add_argument("--recursive", action="store_true", help="search folders recursively")
    running.add_argument("--jobs", type=int, default=1, metavar="N",
                         help="N >= 2: decode in a background thread and encode in N-1 threads beside inference "
                              "(default: %(default)s)")
    running.add_argument("--threads", type=int, metavar="N",
                         help="CPU threads for torch (default: all cores, shared out among torchrun's local ranks)")
    running.add_argument("-q", "--quiet", action="store_true",
                         help="print only errors and warnings (no progress bars, per-file lines or summary)")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The options that choose a model and how to apply it, shared by every command that separates
    (`load_separator` reads them)."""
    model = parser.add_argument_group("model")
    which = model.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME",
                       help="a model from the registry (`bsmamba2 models` lists them); downloaded on first use")
    which.add_argument("--checkpoint", help="a BSMamba2 checkpoint, ours or a published one, or an .onnx file from "
                       "`bsmamba2 export` (default: the default model; `bsmamba2 models` says which)")
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
                               "(three passes of the model: about 3x the time, docs/performance.md)")


def load_separator(args: argparse.Namespace, **options) -> "Separator":
    """The Separator that `add_model_flags`'s options describe, with `options` for the rest (stems, output);
    under torchrun on a CUDA machine it runs on this rank's own GPU."""
    from .api import Separator  # imports torch: only once a run starts, so `--help` stays quick

    env = TorchrunEnv.from_environ()
    device = resolve_device(args.device, env.local_rank if env.world_size > 1 else None)
    return Separator(args.checkpoint, device, model=args.model, config=args.config, chunk_seconds=args.chunk,
                     overlap=args.overlap, batch_size=args.batch_size, tta=args.tta, quantize=args.quantize,
                     **options)


@dataclass
class Input:
    """An audio file to separate and its folder relative to the folder or pattern that found it ("" for a file
    named directly): the --filename template's {folder}."""

    path: Path
    folder: str = ""


@dataclass
class Outcome:
    """What became of one input, as the --report / --json summary lists it."""

    input: str
    status: str  # separated, skipped, failed, or pending (not reached before Ctrl-C)
    outputs: dict = field(default_factory=dict)  # every stem's path
    written: list = field(default_factory=list)  # the stems written by this run
    seconds: Optional[float] = None  # of audio
    wall_seconds: Optional[float] = None
    real_time_factor: Optional[float] = None
    error: Optional[str] = None


def run(args: argparse.Namespace) -> int:
    env = TorchrunEnv.from_environ()
    if args.threads is not None and args.threads < 1:
        raise BSMamba2Error(f"--threads {args.threads}: must be at least 1")
    setup_process(threads=args.threads or env.cpu_threads())

    # torchrun (or any launcher setting these) runs one process per rank; each takes every world_size-th file
    if env.world_size > 1:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[rank {env.rank}] %(message)s"))
    inputs, problems = find_inputs(args.inputs or default_inputs(), args.recursive)
    outcomes = []

    def fail(outcome: Outcome, message: str) -> None:
        outcome.status, outcome.error = "failed", message
        print(f"error: {message}", file=sys.stderr)

    if env.is_main:  # input problems are the same on every rank: rank 0 reports them
        for item, problem in problems:
            outcomes.append(Outcome(item, "failed"))
            fail(outcomes[-1], problem)

    separator = load_separator(
        args, stems=[name.strip() for name in args.stems.split(",") if name.strip()] if args.stems else None,
        two_stems=args.two_stems, file_format=args.format, bit_depth=args.bit_depth, bitrate=args.bitrate,
        filename=args.filename, force=args.force, jobs=args.jobs, progress=not args.quiet)
    check_collisions(inputs, separator, args.out_dir)

    mine = [Outcome(str(item.path), "pending") for item in inputs[env.rank::env.world_size]]
    outcomes += mine
    with StopAfterFile() as stop, logging_redirect_tqdm():
        try:
            for item, outcome in zip(inputs[env.rank::env.world_size], mine):
                if stop.requested:
                    break
                try:
                    separate_input(separator, item, outcome, args.out_dir)
                except BSMamba2Error as error:
                    fail(outcome, str(error))
                except Exception as error:  # a bug or a device failure on one file must not lose the others
                    log.error("unexpected failure on %s", item.path, exc_info=True)
                    fail(outcome, f"{item.path}: {type(error).__name__}: {error}")
        except KeyboardInterrupt:  # a second Ctrl-C: the file in progress was discarded and stays pending
            stop.requested = True

    counts = {status: sum(outcome.status == status for outcome in outcomes)
              for status in ("separated", "skipped", "failed", "pending")}
    interrupted = counts["pending"] > 0
    summary = {**counts, "interrupted": interrupted, "inputs": [vars(outcome) for outcome in outcomes]}
    if args.report:
        report = Path(args.report)
        if env.world_size > 1:
            report = report.with_name(f"{report.name}.rank{env.rank}")
        write_text_atomic(report, json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    # each failure was printed as it happened; for one input, its own line said everything
    totals = [f"{counts[status]} {status}{detail}" for status, detail in
              (("separated", ""), ("skipped", " (stems already there)"), ("failed", "")) if counts[status]]
    if len(outcomes) > 1 and totals:
        log.info("%s", ", ".join(totals))
    if interrupted:
        print(f"interrupted: {len(mine) - counts['pending']} of {len(mine)} inputs done; run the same command again "
              "to separate the rest (finished tracks are skipped)", file=sys.stderr)
        return 130
    return 1 if counts["failed"] else 0


def separate_input(separator: "Separator", item: Input, outcome: Outcome, out_dir: str) -> None:
    """Write the stems of `item` that are missing (all of them with --force) and record it in `outcome`; a track
    whose stems are all there is skipped."""
    paths = separator.output_paths(item.path, out_dir, item.folder)
    outcome.outputs = {name: str(path) for name, path in paths.items()}
    missing = separator.missing_stems(item.path, out_dir, item.folder)
    if not missing:
        outcome.status = "skipped"
        log.info("%s: skipped, its stems are there: %s (--force rewrites them)", item.path, shown(paths))
        return
    started = time.perf_counter()
    separator.separate_file(item.path, out_dir, folder=item.folder, only=missing)
    outcome.wall_seconds = time.perf_counter() - started
    outcome.seconds = sf.info(str(item.path)).duration
    outcome.real_time_factor = outcome.wall_seconds / outcome.seconds
    outcome.status, outcome.written = "separated", missing
    written = {name: paths[name] for name in missing}
    log.info("%s: %.1f s of audio in %.1f s, real-time factor %.3f → %s", item.path, outcome.seconds,
             outcome.wall_seconds, outcome.real_time_factor, shown(written))
    others = {path.name: path for stem in written.values() for path in other_formats(stem)}
    if others:
        log.info("%s: stems in another format are there too: %s (kept: each format is an output of its own)",
                 item.path, shown(others))


def other_formats(path: Path) -> list[Path]:
    """The files beside stem `path` named as it is but for another output format's extension."""
    return [sibling for name in OUTPUT_FORMATS
            if (sibling := path.with_suffix(f".{name}")) != path and sibling.exists()]


class StopAfterFile:
    """While active, the first Ctrl-C (SIGINT) sets `requested`, so that the loop stops after the file in
    progress; a second one, or SIGTERM (what torchrun and job schedulers send), raises KeyboardInterrupt at once,
    so that the file in progress is cleaned up. Outside the main thread it does nothing."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> "StopAfterFile":
        if threading.current_thread() is threading.main_thread():
            self.previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt),
                             signal.SIGTERM: signal.signal(signal.SIGTERM, self._terminate)}
        return self

    def _interrupt(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after the file in progress (Ctrl-C again stops at once)", file=sys.stderr)

    def _terminate(self, signum, frame) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def shown(paths: dict) -> str:
    """Stem paths for a message, relative to the working directory when under it: `out/song/ (vocals.wav,
    drums.wav)` when they share a folder."""
    def relative(path: Path) -> str:
        absolute = Path(os.path.abspath(path))  # not resolve(): a symlinked folder keeps the name the user gave
        return str(absolute.relative_to(Path.cwd()) if absolute.is_relative_to(Path.cwd()) else absolute)

    folders = {Path(path).parent for path in paths.values()}
    if len(folders) == 1:
        return f"{os.path.join(relative(folders.pop()), '')} ({', '.join(Path(p).name for p in paths.values())})"
    return ", ".join(relative(path) for path in paths.values())


def check_collisions(inputs: list[Input], separator: "Separator", out_dir: str) -> None:
    """Stop before any work if two inputs would write the same stem file, suggesting a --filename that tells
    every input apart (one with {folder} for a tree, with {input_ext} for song.mp3 beside song.ogg)."""
    def collision(template: str):
        owner = {}
        for item in inputs:
            for path in separator.output_paths(item.path, out_dir, item.folder, filename=template).values():
                if path in owner:
                    return owner[path], item, path
                owner[path] = item
        return None

    found = collision(separator.filename)
    if found is None:
        return
    first, second, path = found
    base = separator.filename if "{track}" in separator.filename else "{track}/" + separator.filename
    candidates = [base.replace("{track}", "{folder}/{track}", 1), base.replace("{track}", "{track}_{input_ext}", 1),
                  base.replace("{track}", "{folder}/{track}_{input_ext}", 1)]
    fix = next((candidate for candidate in candidates if collision(candidate) is None), None)
    advice = f"use --filename '{fix}'" if fix else "separate them in two runs with different -o"
    raise BSMamba2Error(f"{first.path} and {second.path} would both write {path}: {advice}")


def default_inputs() -> list[str]:
    """What `bsmamba2 separate` with no IN separates: the bundled example song."""
    from .pretrained import example_song

    return [str(example_song())]


def find_inputs(items: list[str], recursive: bool) -> tuple[list[Input], list[tuple[str, str]]]:
    """The audio files that files, folders and glob patterns name, each once and in order, and (item, message)
    for each item that names nothing usable."""
    files, problems = [], []
    for item in items:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                hint = "" if recursive else " (add --recursive to search its subfolders)"
                problems.append((item, f"{path}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in this folder{hint}"))
            files += [Input(p, folder_under(p, path)) for p in found]
        elif path.exists() or not any(wildcard in item for wildcard in "*?["):
            files.append(Input(path))  # a missing file is reported when it is opened, like any unreadable one
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=recursive) if Path(p).is_file())
            if not found:
                problems.append((item, f"{item}: no file matches this pattern"))
            root = Path(*itertools.takewhile(lambda part: not any(c in part for c in "*?["), path.parts))
            files += [Input(p, folder_under(p, root)) for p in found]
    seen, unique = set(), []
    for found in files:
        if found.path.resolve() not in seen:
            seen.add(found.path.resolve())
            unique.append(found)
    return unique, problems


def folder_under(path: Path, root: Path) -> str:
    """The folder of `path` relative to `root`, in / notation ("" when it is `root` itself)."""
    folder = path.parent.relative_to(root).as_posix()
    return "" if folder == "." else folder
