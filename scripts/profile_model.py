#!/usr/bin/env python3
"""Where a forward pass of the model spends its time on the CPU, in float32 and in int8, and how close the whole
forward comes to the machine's matmul speed.

    python scripts/profile_model.py --threads 2 --seconds 4            # the paper model (random weights)
    python scripts/profile_model.py --config configs/synth_vocals.yaml --modes fp32

Times each part of one forward (median over --repeats, after a warm-up): STFT + iSTFT, band split, in_proj,
causal conv, scan (over time, and over bands), norms and gate (the pre-norms, the gated norm, the final norm), out_proj, mask estimators, and
the rest (the bidirectional merge, flips, reshapes, mask × spectrum). Then the forward's matmul work (counted by
torch's FlopCounterMode) per second of its time, beside a plain matmul of the in_proj's shape measured in the same
run (float32 `torch.matmul`; int8 the kernel `Int8Linear` calls). The process is set up as the commands set it
up (glibc keeps freed memory); run it on an otherwise idle machine.
"""
import argparse
import os
import statistics
import time
from collections import defaultdict

from bsmamba2 import runtime

runtime.prepare_openmp()  # as the bsmamba2 command does, before torch loads

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bsmamba2.checkpoint import build_model  # noqa: E402
from bsmamba2.config import Config, load_config  # noqa: E402
from bsmamba2.models import mamba2  # noqa: E402
from bsmamba2.quantize import Int8Linear, quantize_model  # noqa: E402

PARTS = ("STFT + iSTFT", "band split", "in_proj", "conv", "scan, time path", "scan, band path", "norms + gate",
         "out_proj", "mask estimators", "rest")
MODES = {"fp32": None, "int8": "int8"}


class PartTimer:
    """Wall-clock seconds per part, collected by wrapping the functions and hooking the modules of one model."""

    def __init__(self, model: torch.nn.Module):
        self.seconds = defaultdict(float)
        self.started = {}
        modules = defaultdict(list, {"band split": [model.band_split], "mask estimators": list(model.mask_estimators),
                                     "norms + gate": [model.final_norm]})
        for name, module in model.named_modules():
            for part, suffix in (("in_proj", "mixer.in_proj"), ("out_proj", "mixer.out_proj"),
                                 ("norms + gate", "mixer.norm"), ("norms + gate", "blocks.0.norm")):
                if name.endswith(suffix):
                    modules[part].append(module)
        for part, members in modules.items():
            for module in members:
                module.register_forward_pre_hook(lambda *_, part=part, module=module: self._start(module))
                module.register_forward_hook(lambda *_, part=part, module=module: self._stop(part, module))

    def _start(self, key) -> None:
        self.started[id(key)] = time.perf_counter()

    def _stop(self, part: str, key) -> None:
        self.seconds[part] += time.perf_counter() - self.started.pop(id(key))

    def wrap(self, part, function):
        """`function`, timed into `part`: a name, or a function of the first argument that returns one."""
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part(args[0]) if callable(part) else part] += time.perf_counter() - start
        return timed


def profile(model, wave, repeats: int) -> dict:
    """Median seconds per part and for the whole forward."""
    timer = PartTimer(model)
    bands = len(model.band_split.band_sizes)

    def scan_path(x):  # x: (sequences, steps, heads, headdim); the band path's sequences are as long as the bands
        return "scan, band path" if x.shape[1] == bands else "scan, time path"

    patched = {(torch, "stft"): "STFT + iSTFT", (torch, "istft"): "STFT + iSTFT",
               (mamba2, "causal_conv1d"): "conv", (mamba2, "mamba_chunk_scan_combined"): scan_path}
    originals = {key: getattr(*key) for key in patched}
    runs = []
    try:
        for (owner, name), part in patched.items():
            setattr(owner, name, timer.wrap(part, originals[(owner, name)]))
        with torch.inference_mode():
            for index in range(repeats + 1):              # the first call warms up
                timer.seconds.clear()
                start = time.perf_counter()
                model(wave)
                total = time.perf_counter() - start
                if index:
                    runs.append({**timer.seconds, "rest": total - sum(timer.seconds.values()), "total": total})
    finally:
        for (owner, name), function in originals.items():
            setattr(owner, name, function)
    return {part: statistics.median(run.get(part, 0.0) for run in runs) for part in PARTS + ("total",)}


def matmul_speed(tokens: int, d_in: int, d_out: int, int8: bool, repeats: int = 5) -> float:
    """GFLOP/s of one (tokens × d_in) @ (d_in × d_out) product, median of `repeats` after a warm-up."""
    x = torch.randn(tokens, d_in)
    weight = torch.randn(d_in, d_out) / d_in ** 0.5
    call = Int8Linear(weight.t()) if int8 else (lambda a: torch.matmul(a, weight))
    times = []
    with torch.inference_mode():
        for index in range(repeats + 1):
            start = time.perf_counter()
            call(x)
            if index:
                times.append(time.perf_counter() - start)
    return 2 * tokens * d_in * d_out / statistics.median(times) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the paper model)")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per forward (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per mode (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    runtime.setup_process(threads=args.threads)
    config = load_config(args.config) if args.config else Config()
    torch.manual_seed(0)
    samples = round(args.seconds * config.audio.sample_rate)
    wave = 0.1 * torch.randn(1, config.audio.channels, samples)
    load = os.getloadavg()

    results, speeds = {}, {}
    model = build_model(config).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(wave)
    gflop = counter.get_total_flops() / 1e9
    frames = samples // config.audio.hop_length + 1
    in_proj = model.layers[0][0].forward_blocks[0].mixer.in_proj
    for mode in args.modes:
        if MODES[mode]:
            model = quantize_model(build_model(config).eval(), MODES[mode], torch.device("cpu"))
        results[mode] = profile(model, wave, args.repeats)
        speeds[mode] = matmul_speed(frames * len(config.model.band_widths), in_proj.in_features,
                                    in_proj.out_features, int8=MODES[mode] == "int8")

    print(f"{config.model.dim}-dim, depth {config.model.depth} model, {args.seconds:g} s of audio per forward, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {load[0]:.2f} before")
    print(f"{'part':<16}" + "".join(f"{mode + ' s':>10}{'share':>7}" for mode in args.modes)
          + ("".join(f"{'speed-up':>10}" for _ in args.modes[1:])))
    for part in PARTS + ("total",):
        cells = "".join(f"{results[mode][part]:>10.3f}{results[mode][part] / results[mode]['total']:>7.0%}"
                        for mode in args.modes)
        ratios = "".join(f"{results[args.modes[0]][part] / max(results[mode][part], 1e-9):>9.2f}x"
                         for mode in args.modes[1:])
        print(f"{part:<16}{cells}{ratios}")
    for mode in args.modes:
        total = results[mode]["total"]
        print(f"{mode}: {total / args.seconds:.2f} s per second of audio; the forward's {gflop:.0f} GFLOP of matmul "
              f"work at {gflop / total:.0f} GFLOP/s, a plain {mode} matmul of the in_proj's shape at "
              f"{speeds[mode]:.0f} GFLOP/s ({gflop / total / speeds[mode]:.0%})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
