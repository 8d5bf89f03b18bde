#!/usr/bin/env python3
"""BSMamba2 under onnxruntime against PyTorch, side by side: for each model, the export time, how far
onnxruntime's stems are from PyTorch's (their SDR against PyTorch's, dB) and the seconds per chunk, in fp32 and
in int8 (onnxruntime's dynamic quantization of the MatMul weights).

    python scripts/onnx_benchmark.py [--models bundled,paper] [--threads 2] [--repeats 3] [--dir DIR]

bundled: the bundled model; paper: the paper's configuration (48 M parameters) with random weights. One chunk of
the config's inference length (8 s), batch 1, cut from the bundled example song. Exports are kept in DIR and
reused by later runs (their export time is then not measured again).
"""
import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from bsmamba2 import build_model, load_model
from bsmamba2.apply import chunk_length
from bsmamba2.config import Config
from bsmamba2.metrics import usdr
from bsmamba2.onnx import OnnxModel, export_onnx
from bsmamba2.pretrained import example_song
from bsmamba2.runtime import setup_process

MODELS = {
    "bundled": lambda: load_model(),
    "paper": lambda: build_model(Config().validate()).eval(),  # seeded below: the same weights on every run
}


def fastest_calls(runs: dict, repeats: int) -> dict:
    """The fastest of `repeats` timed calls of each run, taken in turns (a run, then the next, ...) so that
    load from other jobs falls on all of them alike; each is called once untimed first (first-call allocations,
    onnxruntime's lazy initialisation)."""
    times = {name: [] for name in runs}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if repeat:
                times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.machine()


def quantized(path: Path) -> Path:
    """An int8 copy (dynamic quantization of the MatMul weights), with the export's metadata."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".int8.onnx")
    if not out.exists():
        logging.disable(logging.WARNING)  # the quantizer's advice to pre-process the graph first
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        logging.disable(logging.NOTSET)
        model = onnx.load(str(out))
        del model.metadata_props[:]
        model.metadata_props.extend(onnx.load(str(path), load_external_data=False).metadata_props)
        onnx.save(model, str(out))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bundled,paper")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch and onnxruntime threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("onnx-benchmark"), help="where the exports are kept")
    args = parser.parse_args()
    setup_process()
    torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)

    print(f"$ python {' '.join(sys.argv)}")
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}, load average {os.getloadavg()[0]:.2f} at start")
    print("| model | export | runtime | s / chunk (fastest) | × PyTorch's time | SDR against PyTorch |")
    print("|---|---|---|---|---|---|")
    song, _ = sf.read(example_song(), dtype="float32", always_2d=True)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = MODELS[name]()
        chunk = chunk_length(model.config.inference.chunk_seconds, model.sample_rate)
        wave = torch.from_numpy(np.ascontiguousarray(song.T[:, :chunk]))[None]  # the song is longer than a chunk
        path = args.dir / f"{name}.onnx"
        export = "reused"
        if not path.exists():
            started = time.perf_counter()
            export_onnx(model, path)
            export = f"{time.perf_counter() - started:.0f} s"
        runs = {"PyTorch": model, "onnxruntime fp32": OnnxModel(path), "onnxruntime int8": OnnxModel(quantized(path))}
        with torch.inference_mode():
            expected = model(wave).numpy()
            agreement = {runtime: usdr(expected, run(wave).numpy()) for runtime, run in runs.items()}
            took = fastest_calls({runtime: lambda run=run: run(wave) for runtime, run in runs.items()}, args.repeats)
        for runtime in runs:
            agrees = "" if runs[runtime] is model else f"{agreement[runtime]:.1f} dB"
            print(f"| {name} | {export if runtime == 'PyTorch' else ''} | {runtime} | {took[runtime]:.3f} | "
                  f"{took[runtime] / took['PyTorch']:.2f} | {agrees} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
