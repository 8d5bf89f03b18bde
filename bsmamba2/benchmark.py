"""`bsmamba2 benchmark` / `python benchmark_mamba_ssm.py`: how fast is each scan backend, and the whole model?

Scan section: the Mamba2 scan at the paper's mixer shape (16 heads × 64, d_state 128, ngroups 1) for every backend
that can run here — `reference` (the sequential loop other projects fall back to), `torch`, `torch+compile`, and on
CUDA `cuda` and `triton` (listed as unavailable, with the reason, elsewhere) — forward and forward+backward, at
8 sequences × 512 steps and at BSMamba2's own shapes: the time path (62 bands × frames) and the band path
(frames × 62 bands). Model section: seconds of audio separated per second, per config.

Every measurement runs in a fresh subprocess (so peak memory is that measurement's own): inputs are made on the
device, a first call warms up (and compiles, for torch+compile; its time is reported too; a first call longer than
--budget counts as a measurement, except a compiling one), then up to --repeats timed calls (at least one; no more
once --budget seconds are spent), with torch.cuda.synchronize on GPU.
Reported: the median and min..max of the times, the peak memory above the inputs (CUDA max allocated, or peak
RSS on CPU), and the largest absolute difference from the `reference` loop on the first sequences (outputs, and
for forward+backward the gradients of x, dt, B, C), computed after timing. Other processes on the same cores slow
loops of small operations (the reference) much more than large matmuls, so the load average is printed too.
torch is imported inside the functions that use it, so that `bsmamba2 benchmark --help` stays quick.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from tqdm import tqdm

from .config import SCAN_BACKENDS as BACKENDS
from .errors import BSMamba2Error
from .files import atomic_write, refuse_overwrite, write_text_atomic
from .runtime import DEVICE_NAMES, resolve_device, setup_process
from .sizes import MB

if TYPE_CHECKING:
    import torch

NHEADS, HEADDIM, DSTATE = 16, 64, 128          # the paper mixer: d_model 256, expand 4, headdim 64, d_state 128
PASSES = ("fwd", "fwdbwd")
ERROR_SEQUENCES = 2                              # sequences the reference recomputes for the error column


@dataclass
class ScanShape:
    section: str                  # "mixer", "time path" or "band path"
    batch: int                    # sequences
    seqlen: int
    reference: tuple = ()         # passes the sequential loop runs (its backward takes minutes and tens of GB)
    compile: bool = False         # run torch+compile here (each new shape compiles for minutes on a CPU)


def scan_shapes(quick: bool) -> list:
    if quick:
        return [ScanShape("mixer", 2, 64, reference=PASSES), ScanShape("time path", 62, 101),
                ScanShape("band path", 101, 62)]
    return [ScanShape("mixer", 8, 512, reference=PASSES, compile=True),
            ScanShape("time path", 62, 201, reference=("fwd",)),
            ScanShape("time path", 62, 401),
            ScanShape("time path", 62, 801, compile=True),
            ScanShape("band path", 201, 62, reference=("fwd",)),
            ScanShape("band path", 801, 62, compile=True)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes, no torch.compile: under a minute")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (default: auto)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), metavar="NAME",
                        help=f"scan backends to compare (default: all: {', '.join(BACKENDS)})")
    parser.add_argument("--chunk-size", type=int, default=128,
                        help="SSD chunk length for the chunked backends (default: 128, the paper config's)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default: 5, --quick: 2)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="stop repeating a measurement after this long (default: 30, --quick: 3)")
    parser.add_argument("--model-config", nargs="*", metavar="YAML",
                        help="configs for the whole-model section (default: the paper config; none: skip it)")
    parser.add_argument("--audio-seconds", type=float, metavar="S",
                        help="audio per whole-model call (default: 8, --quick: 0.5)")
    parser.add_argument("--json", metavar="PATH", help="write all records as a JSON list")
    parser.add_argument("--plot", metavar="PNG", help="plot time against sequence length (needs matplotlib)")
    parser.add_argument("--paths", nargs="+", choices=("mixer", "time", "band"), default=["mixer", "time", "band"],
                        help="which scan shapes: the 8×512 mixer shape, the time path, the band path (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads in each measurement (default: torch's choice)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="measure with glibc keeping freed memory, as the other commands run "
                             "(bsmamba2.runtime.setup_process: faster, higher peak memory); default: malloc as is")
    parser.add_argument("--force", action="store_true", help="overwrite existing --json/--plot files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the table is printed)")


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .ops.backends import unavailable_reason

    _check_outputs(args)
    device = resolve_device(args.device)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.budget = args.budget or (3.0 if args.quick else 30.0)
    if args.repeats < 1 or args.chunk_size < 1 or args.budget <= 0:
        raise BSMamba2Error("--repeats, --chunk-size and --budget must be positive")
    unavailable = {name: unavailable_reason(name, device) for name in args.backends}
    unavailable = {name: reason for name, reason in unavailable.items() if reason}

    jobs = []
    for shape in scan_shapes(args.quick):
        if shape.section.split()[0] not in args.paths:
            continue
        for pass_ in PASSES:
            for backend in args.backends:
                record = {"section": shape.section, "backend": backend, "pass": pass_, "batch": shape.batch,
                          "seqlen": shape.seqlen, "nheads": NHEADS, "headdim": HEADDIM, "d_state": DSTATE,
                          "chunk_size": args.chunk_size, "device": str(device)}
                if backend in unavailable:
                    record["unavailable"] = unavailable[backend]
                elif backend == "reference" and pass_ not in shape.reference:
                    record["skipped"] = "not run: the sequential loop takes minutes here" if pass_ == "fwd" \
                        else "not run: the sequential loop's backward takes many minutes and GB here"
                elif backend == "torch+compile" and not shape.compile:
                    record["skipped"] = "not run: torch.compile takes minutes per new shape on a CPU" \
                        + (" (--quick)" if args.quick else "; compiled at one shape per section")
                jobs.append(record)
    model_configs = args.model_config if args.model_config is not None else [None]
    for config in filter(None, model_configs):
        load_config(config)                          # a bad config fails now, naming the file
    audio_seconds = args.audio_seconds or (0.5 if args.quick else 8.0)
    for config in model_configs:
        jobs.append({"section": "model", "config": config, "pass": "fwd", "batch": 1,
                     "audio_seconds": audio_seconds, "device": str(device)})

    settings = {"repeats": args.repeats, "budget": args.budget, "keep_freed_memory": args.keep_freed_memory,
                "threads": args.threads}
    args.load_before = _load_average()
    records = []
    for job in tqdm(jobs, desc="benchmark", unit="run", disable=args.quiet):
        if "unavailable" in job or "skipped" in job:
            records.append(job)
        else:
            records.append({**job, **_in_subprocess({**job, **settings})})

    args.load_after = _load_average()
    print(_report(records, device, args))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(records, indent=2) + "\n")
    if args.plot:
        _plot(records, Path(args.plot))
    return 0


def _check_outputs(args) -> None:
    """Fail before minutes of measuring, not after: existing outputs, missing matplotlib."""
    for path in filter(None, (args.json, args.plot)):
        refuse_overwrite(path, args.force)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise BSMamba2Error("--plot needs matplotlib: pip install matplotlib (or bsmamba2[plot])")


# ---- measuring, in a subprocess --------------------------------------------------------------------------------

def _in_subprocess(job: dict) -> dict:
    """Run one measurement in a fresh Python, so that its peak memory is its own; its result is a JSON line."""
    command = [sys.executable, "-m", "bsmamba2.benchmark", "--worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": f"exit {done.returncode}: {last}"}
    return json.loads(lines[-1])


def _worker(job: dict) -> dict:
    import torch

    setup_process(keep_freed_memory=job["keep_freed_memory"], threads=job["threads"])
    device = torch.device(job["device"])
    measure = _measure_model if job["section"] == "model" else _measure_scan
    return measure(job, device)


def _measure_scan(job: dict, device: torch.device) -> dict:
    import torch

    from .ops import mamba_chunk_scan_combined

    backward = job["pass"] == "fwdbwd"
    inputs = _scan_inputs(job["batch"], job["seqlen"], device, requires_grad=backward)
    grad_out = torch.randn(job["batch"], job["seqlen"], NHEADS, HEADDIM, device=device,
                           generator=torch.Generator(device).manual_seed(1))

    def call():
        with torch.set_grad_enabled(backward):
            y = mamba_chunk_scan_combined(**inputs, chunk_size=job["chunk_size"], dt_softplus=True,
                                          backend=job["backend"])
            if backward:
                y.backward(grad_out)
        return y

    result = _time(call, job, device)
    if job["backend"] == "reference":
        result["max_abs_err"] = 0.0
    else:
        result.update(_error_vs_reference(inputs, grad_out, job, call))
    return result


def _scan_inputs(batch: int, seqlen: int, device: torch.device, requires_grad: bool) -> dict:
    """Mamba2-like inputs: A = −U(1, 16), dt_bias = softplus⁻¹ of log-uniform [1e-3, 0.1], D = 1."""
    import torch

    g = torch.Generator(device).manual_seed(0)
    dt_init = torch.exp(torch.empty(NHEADS, device=device).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    inputs = {
        "x": torch.randn(batch, seqlen, NHEADS, HEADDIM, device=device, generator=g),
        "dt": torch.randn(batch, seqlen, NHEADS, device=device, generator=g),
        "A": -torch.empty(NHEADS, device=device).uniform_(1, 16, generator=g),
        "B": torch.randn(batch, seqlen, 1, DSTATE, device=device, generator=g),
        "C": torch.randn(batch, seqlen, 1, DSTATE, device=device, generator=g),
        "D": torch.ones(NHEADS, device=device),
        "dt_bias": dt_init + torch.log(-torch.expm1(-dt_init)),
    }
    for name in ("x", "dt", "B", "C"):
        inputs[name].requires_grad_(requires_grad)
    return inputs


def _error_vs_reference(inputs: dict, grad_out, job: dict, call) -> dict:
    """Max |difference| from the reference loop on the first sequences: y, and dx, ddt, dB, dC after backward."""
    import torch

    from .ops.scan_reference import scan_reference

    k = min(ERROR_SEQUENCES, job["batch"])
    backward = job["pass"] == "fwdbwd"
    for name in ("x", "dt", "B", "C"):
        inputs[name].grad = None
    y = call()
    ours = [y.detach()[:k]] + ([inputs[name].grad[:k] for name in ("x", "dt", "B", "C")] if backward else [])
    sliced = {name: (t[:k] if t.dim() > 1 else t).detach().cpu().float() for name, t in inputs.items()}
    for name in ("x", "dt", "B", "C"):
        sliced[name].requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        y_ref = scan_reference(**sliced, chunk_size=job["chunk_size"], dt_softplus=True)
        if backward:
            y_ref.backward(grad_out[:k].cpu())
    theirs = [y_ref.detach()] + ([sliced[name].grad for name in ("x", "dt", "B", "C")] if backward else [])
    error = max((a.cpu().float() - b).abs().max().item() for a, b in zip(ours, theirs))
    return {"max_abs_err": error, "err_sequences": k, "ref_max_abs": y_ref.abs().max().item()}


def _measure_model(job: dict, device: torch.device) -> dict:
    import torch

    from .checkpoint import build_model
    from .config import Config, load_config
    from .ops import resolve_backend

    config = load_config(job["config"]) if job["config"] else Config()
    model = build_model(config).eval().to(device)
    samples = round(job["audio_seconds"] * config.audio.sample_rate)
    wave = torch.randn(1, config.audio.channels, samples, device=device,
                       generator=torch.Generator(device).manual_seed(0)) * 0.1

    def call():
        with torch.no_grad():
            return model(wave)

    result = _time(call, job, device)
    result.update({"config_name": Path(job["config"]).stem if job["config"] else "paper (defaults)",
                   "backend": resolve_backend(config.model.scan_backend, device).name,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "seconds_per_audio_second": result["seconds"] / job["audio_seconds"],
                   "seqlen": samples // config.audio.hop_length + 1, "d_state": config.model.d_state})
    return result


def _time(call, job: dict, device: torch.device) -> dict:
    """Warm-up, then timed repetitions; peak memory above what existed before the first call."""
    import torch

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _current_rss()
    synchronize()
    start = time.perf_counter()
    call()
    synchronize()
    first = time.perf_counter() - start
    # A first call longer than the whole budget is a measurement (warming up changes nothing at that scale),
    # except a compiling one.
    times = [first] if first > job["budget"] and job.get("backend") != "torch+compile" else []
    spent = sum(times)
    while len(times) < job["repeats"] and (not times or spent < job["budget"]):
        start = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _peak_rss() - base if base is not None else None
    return {"seconds": statistics.median(times), "min_seconds": min(times), "max_seconds": max(times),
            "repeats": len(times), "first_call_seconds": first,
            "peak_mb": None if peak is None else peak / MB}


def _load_average() -> Optional[tuple]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def _current_rss() -> Optional[int]:
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _peak_rss() -> int:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024      # bytes on macOS, KiB on Linux


# ---- reporting -------------------------------------------------------------------------------------------------

def _report(records: list, device: torch.device, args) -> str:
    import torch

    threads = args.threads or torch.get_num_threads()
    malloc = "malloc keeps freed memory" if args.keep_freed_memory else "malloc as is"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {threads} threads"
    lines = [f"BSMamba2 scan benchmark — {device.type} ({where}), torch {torch.__version__}, {malloc}, "
             f"chunk size {args.chunk_size}",
             f"scan: {NHEADS} heads × {HEADDIM}, d_state {DSTATE}, ngroups 1; times are median (min..max) "
             f"of up to {args.repeats} calls; error = max |Δ| vs reference on the first {ERROR_SEQUENCES} sequences"]
    if args.load_before and args.load_after:
        lines.append(f"load average (1 min) {args.load_before[0]:.1f} before, {args.load_after[0]:.1f} after, on "
                     f"{os.cpu_count()} logical CPUs")
    unavailable = {r["backend"]: r["unavailable"] for r in records if "unavailable" in r}
    lines += [f"{name}: unavailable: {reason}" for name, reason in unavailable.items()]
    header = f"{'shape':<22} {'pass':<7} {'backend':<14} {'median s':>9} {'min..max s':>17} {'1st call':>9} " \
             f"{'peak MB':>8} {'speed-up':>9} {'max abs err':>12}"
    lines += ["", header, "-" * len(header)]
    reference = {(r["section"], r["batch"], r["seqlen"], r["pass"]): r for r in records
                 if r["backend"] == "reference" and "seconds" in r}
    for r in records:
        if r["section"] == "model" or r["backend"] in unavailable:
            continue
        shape = f"{r['section']} {r['batch']}×{r['seqlen']}"
        if "seconds" not in r:
            lines.append(f"{shape:<22} {r['pass']:<7} {r['backend']:<14} {r.get('skipped') or r.get('failed')}")
            continue
        ref = reference.get((r["section"], r["batch"], r["seqlen"], r["pass"]))
        speedup = f"{ref['seconds'] / r['seconds']:.1f}×" if ref else "—"
        peak = "—" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"{shape:<22} {r['pass']:<7} {r['backend']:<14} {r['seconds']:>9.3f} "
                     f"{r['min_seconds']:>8.3f}..{r['max_seconds']:<8.3f} {r['first_call_seconds']:>9.2f} "
                     f"{peak:>8} {speedup:>9} {r['max_abs_err']:>12.1e}")
    models = [r for r in records if r["section"] == "model"]
    if models:
        lines += ["", f"{'model config':<22} {'parameters':>11} {'audio s':>8} {'median s':>9} {'s per audio s':>14} "
                      f"{'peak MB':>9}"]
        for r in models:
            if "seconds" not in r:
                lines.append(f"{r['config'] or 'paper (defaults)':<22} {r.get('failed')}")
                continue
            lines.append(f"{r['config_name'] + ' (' + r['backend'] + ')':<22} {r['parameters']:>11,} "
                         f"{r['audio_seconds']:>8.1f} "
                         f"{r['seconds']:>9.2f} {r['seconds_per_audio_second']:>14.2f} {r['peak_mb']:>9.0f}")
    return "\n".join(lines)


def _plot(records: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = {"mixer": "^", "time path": "o-", "band path": "s--"}
    for axis, pass_ in zip(axes, PASSES):
        for color, backend in enumerate(BACKENDS):
            for section, marker in markers.items():
                # per step of one sequence, so that shapes with different numbers of sequences share the axis
                points = sorted((r["seqlen"], 1e6 * r["seconds"] / (r["batch"] * r["seqlen"])) for r in records
                                if (r["backend"], r["pass"], r["section"]) == (backend, pass_, section)
                                and "seconds" in r)
                if points:
                    axis.plot(*zip(*points), marker[0], linestyle=marker[1:] or "none", color=f"C{color}",
                              label=f"{backend}, {section}")
        axis.set_title("forward" if pass_ == "fwd" else "forward + backward")
        axis.set_xlabel("sequence length (steps)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("µs per sequence step (median)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    with atomic_write(path) as file:
        figure.savefig(file, format="png", dpi=120)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
