#!/usr/bin/env python3
"""BSMamba2 under onnxruntime against PyTorch, side by side, in fp32 and int8: seconds per chunk, how far each
one's stems are from PyTorch fp32's (their SDR against PyTorch fp32's, dB), and each process's peak memory.

    python scripts/onnx_benchmark.py --dir DIR [--models bundled,paper] [--threads 2] [--repeats 5] [--json F]
    python scripts/onnx_benchmark.py --dir DIR --export-only        # the exports alone (the paper's takes minutes)

Models: `bundled` (the bundled vocals model, synth-vocals), `paper` (configs/bsmamba2_vocals.yaml with random
weights, seed 0), or a checkpoint file. DIR keeps what each model needs: its checkpoint (paper), its export, an int8
copy of the export (onnxruntime's dynamic quantization of the MatMul weights) and the input, one chunk (the config's
inference length) of the bundled example song, batch 1; a later run reuses them. PyTorch int8 is load_model(...,
quantize="int8").

Each timed call runs in a fresh process (a separation command's set-up, --threads threads), after a warm-up call
that gives the stems compared; one process at a time, since the paper-size model's take gigabytes each. The
runtimes take turns (PyTorch fp32, PyTorch int8, onnxruntime fp32, onnxruntime int8, PyTorch fp32, ...), so
that load from other jobs falls on all alike. Prints a markdown table: min and median seconds per chunk, the
median per second of audio and against PyTorch fp32's, the agreement, and the processes' peak memory (resident
set).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this repository's package, in this process and the runtimes' processes

import bsmamba2  # noqa: E402  (before torch: it sets OpenMP's wait policy)
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from bsmamba2.apply import chunk_length  # noqa: E402
from bsmamba2.benchmark import _peak_rss  # noqa: E402
from bsmamba2.checkpoint import build_model, load_model, save_model  # noqa: E402
from bsmamba2.config import load_config  # noqa: E402
from bsmamba2.hub import checkpoint_file  # noqa: E402
from bsmamba2.metrics import usdr  # noqa: E402
from bsmamba2.onnx import OnnxModel, export_onnx  # noqa: E402
from bsmamba2.pretrained import example_song  # noqa: E402
from bsmamba2.runtime import setup_process  # noqa: E402
from bsmamba2.sizes import GB, MB  # noqa: E402

PAPER_CONFIG = REPO / "configs" / "bsmamba2_vocals.yaml"
MODES = ("PyTorch fp32", "PyTorch int8", "onnxruntime fp32", "onnxruntime int8")
BASELINE = MODES[0]


def prepare(name: str, folder: Path) -> dict:
    """The model's files in `folder`, made when missing: checkpoint, export, int8 export, input chunk."""
    files = {"checkpoint": checkpoint_file("synth-vocals", progress=False)[0] if name == "bundled" else Path(name),
             "onnx": folder / f"{Path(name).stem}.onnx", "onnx int8": folder / f"{Path(name).stem}.int8.onnx",
             "input": folder / f"{Path(name).stem}.input.npy", "export": folder / f"{Path(name).stem}.export.json"}
    if name == "paper":
        files["checkpoint"] = folder / "paper.ckpt"
        if not files["checkpoint"].exists():
            torch.manual_seed(0)
            save_model(build_model(load_config(PAPER_CONFIG)), files["checkpoint"])
    if not files["onnx"].exists():
        model = load_model(files["checkpoint"])
        started = time.perf_counter()
        agreement = export_onnx(model, files["onnx"])
        files["export"].write_text(json.dumps({"seconds": time.perf_counter() - started, "agreement_db": agreement}))
    if not files["onnx int8"].exists():
        quantize_onnx(files["onnx"], files["onnx int8"])
    if not files["input"].exists():
        config = OnnxModel(files["onnx"]).config
        song, _ = sf.read(example_song(), dtype="float32", always_2d=True)  # 10 s: longer than a chunk
        chunk = song.T[:config.audio.channels, :chunk_length(config.inference.chunk_seconds, config.audio.sample_rate)]
        np.save(files["input"], np.ascontiguousarray(chunk)[None])
    return files


def quantize_onnx(path: Path, out: Path) -> None:
    """An int8 copy (dynamic quantization of the MatMul weights) that keeps the export's metadata."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # the quantizer's advice to pre-process the graph first
    try:
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        logging.disable(logging.NOTSET)
    model = onnx.load(str(out))
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.load(str(path), load_external_data=False).metadata_props)
    onnx.save(model, str(out))


def worker(mode: str, model_file: str, input_file: str, output_file: str, threads: int) -> None:
    """One runtime in this process: a warm-up call, whose stems go to `output_file`, then one timed call; prints
    its seconds and the process's peak memory."""
    setup_process(threads=threads)
    runtime, precision = mode.split()
    if runtime == "PyTorch":
        model = load_model(model_file, quantize="int8" if precision == "int8" else None)
    else:
        model = OnnxModel(model_file)
    wave = torch.from_numpy(np.load(input_file))
    with torch.inference_mode():
        np.save(output_file, model(wave).numpy())
        started = time.perf_counter()
        model(wave)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": _peak_rss() / MB}))


def measure(files: dict, folder: Path, modes: list, threads: int, repeats: int) -> dict:
    """Each of `modes`' times, agreement with PyTorch fp32 and peak memory, from fresh processes in turns."""
    model_files = {"PyTorch fp32": files["checkpoint"], "PyTorch int8": files["checkpoint"],
                   "onnxruntime fp32": files["onnx"], "onnxruntime int8": files["onnx int8"]}
    outputs = {mode: folder / f"stems.{mode.replace(' ', '-')}.npy" for mode in modes}
    times, peaks = {mode: [] for mode in modes}, {mode: 0.0 for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            done = subprocess.run([sys.executable, __file__, "--worker", mode, str(model_files[mode]),
                                   str(files["input"]), str(outputs[mode]), str(threads)], stdout=subprocess.PIPE,
                                  text=True)
            if done.returncode != 0:
                raise SystemExit(f"{mode}: its process failed (exit {done.returncode}); see its error above")
            figures = json.loads(done.stdout.splitlines()[-1])
            times[mode].append(figures["seconds"])
            peaks[mode] = max(peaks[mode], figures["peak_mb"])
    expected = np.load(outputs[BASELINE])
    audio_seconds = expected.shape[-1] / OnnxModel(files["onnx"]).sample_rate
    return {mode: {"seconds_min": min(times[mode]), "seconds_median": statistics.median(times[mode]),
                   "seconds_per_audio_second": statistics.median(times[mode]) / audio_seconds,
                   "vs_pytorch_fp32": statistics.median(times[mode]) / statistics.median(times[BASELINE]),
                   "agreement_db": None if mode == BASELINE else usdr(expected, np.load(outputs[mode])),
                   "peak_mb": peaks[mode], "audio_seconds": audio_seconds, "repeats": repeats}
            for mode in modes}


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        mode, model_file, input_file, output_file, threads = sys.argv[2:]
        worker(mode, model_file, input_file, output_file, int(threads))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where the exports and inputs are kept")
    parser.add_argument("--models", default="bundled,paper", help="bundled, paper or checkpoint files, by commas")
    parser.add_argument("--modes", default=",".join(MODES), help="runtimes to time, by commas; PyTorch fp32 "
                        "is always timed (default: all four)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each runtime (default: %(default)s)")
    parser.add_argument("--export-only", action="store_true", help="make the files in --dir, time nothing")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))} (known: {', '.join(MODES)})")
    # The export's peak (gigabytes for the paper model) goes back to the system before the runtimes start.
    setup_process(keep_freed_memory=False, threads=args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    records = []
    for name in args.models.split(","):
        files = prepare(name, args.dir)
        if args.export_only:
            continue
        export = json.loads(files["export"].read_text()) if files["export"].exists() else {}
        modes = [mode for mode in MODES if mode == BASELINE or mode in args.modes.split(",")]
        for mode, figures in measure(files, args.dir, modes, args.threads, args.repeats).items():
            records.append({"model": Path(name).stem, "mode": mode, **figures,
                            "export_seconds": export.get("seconds"), "onnx_mb": files["onnx"].stat().st_size / MB,
                            "onnx_int8_mb": files["onnx int8"].stat().st_size / MB})
    if args.export_only:
        return 0
    machine = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
               "onnxruntime": __import__("onnxruntime").__version__, "bsmamba2": bsmamba2.__version__,
               "load_average_before": " ".join(load_before), "load_average_after": "%.2f %.2f %.2f" % os.getloadavg()}
    print(report(records, machine, " ".join(sys.argv[1:])))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "records": records}, indent=1))
    return 0


def report(records: list, machine: dict, arguments: str) -> str:
    lines = [f"`python scripts/onnx_benchmark.py {arguments}`: {machine['cpu']}, {machine['threads']} threads, torch "
             f"{machine['torch']}, onnxruntime {machine['onnxruntime']}; load average {machine['load_average_before']}"
             f" before, {machine['load_average_after']} after", "",
             "| model | runtime | s / chunk (min) | s / chunk (median) | s per s of audio | × PyTorch fp32 | "
             "SDR against PyTorch fp32 | peak memory |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        agreement = "" if r["agreement_db"] is None else f"{r['agreement_db']:.1f} dB"
        lines.append(f"| {r['model']} | {r['mode']} | {r['seconds_min']:.3f} | {r['seconds_median']:.3f} | "
                     f"{r['seconds_per_audio_second']:.3f} | {r['vs_pytorch_fp32']:.2f} | {agreement} | "
                     f"{r['peak_mb'] * MB / GB:.2f} GB |")
    lines.append("")
    for r in (r for r in records if r["mode"] == BASELINE):
        export = "reused" if r["export_seconds"] is None else f"{r['export_seconds']:.0f} s"
        lines.append(f"{r['model']}: {r['audio_seconds']:g} s chunks, {r['repeats']} timed calls each; export "
                     f"{export}, {r['onnx_mb']:.1f} MB (int8 {r['onnx_int8_mb']:.1f} MB)")
    return "\n".join(lines)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
