#!/usr/bin/env python3
"""The two CPU inference fast paths of the Mamba2 layers against the plain formulation they replace, timed side by
side in one process on the inputs the paper model really gives them (captured from one forward):

    python scripts/layer_speedups.py --threads 2 --seconds 4

- the causal conv of the `torch` backend (one grouped 2-D conv, channels-last) against the `reference` backend's
  (F.conv1d with padding, then silu);
- the gated RMSNorm's in-place path, taken when autograd needs no intermediates, against the composed one that
  training differentiates.
Each pair is checked to agree, then timed alternately (minimum over --repeats calls, after a warm-up). Run it on an
otherwise idle machine.
"""
import argparse
import os
import time

from bsmamba2 import runtime

runtime.prepare_openmp()  # as the bsmamba2 command does, before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bsmamba2.checkpoint import build_model  # noqa: E402
from bsmamba2.config import Config, load_config  # noqa: E402
from bsmamba2.models import mamba2  # noqa: E402
from bsmamba2.ops.scan_reference import causal_conv1d_reference  # noqa: E402
from bsmamba2.ops.scan_torch import causal_conv1d_torch  # noqa: E402


def capture_first_block_inputs(model, wave):
    """The conv's and the gated norm's inputs in the first block's time path (its first mixer call)."""
    captured = {}
    mixer = next(module for module in model.modules() if isinstance(module, mamba2.Mamba2))
    original_conv = mamba2.causal_conv1d

    def conv(x, weight, bias=None, activation=None, **options):
        # kept channel-last, as the mixer hands it over (a view of its input projection)
        channel_last = x.transpose(1, 2).clone().transpose(1, 2)
        captured.setdefault("conv", (channel_last, weight.clone(), bias.clone(), activation))
        return original_conv(x, weight, bias, activation=activation, **options)

    def norm_inputs(module, args):
        captured.setdefault("norm", (module, args[0].clone(), args[1].clone()))

    hook = mixer.norm.register_forward_pre_hook(norm_inputs)
    mamba2.causal_conv1d = conv
    try:
        with torch.inference_mode():
            model(wave)
    finally:
        mamba2.causal_conv1d = original_conv
        hook.remove()
    return captured


def fastest(calls: dict, repeats: int) -> dict:
    """Minimum seconds of each call, the calls taking turns."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats + 1):  # the first round warms up and is timed too; the minimum discards it
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def sdr(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    error = (estimate.double() - reference.double()).square().sum().clamp_min(1e-300)
    return float(10 * torch.log10(reference.double().square().sum() / error))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the paper model)")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per forward (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls of each (default: %(default)s)")
    args = parser.parse_args()
    runtime.setup_process(threads=args.threads)
    config = load_config(args.config) if args.config else Config()
    torch.manual_seed(0)
    wave = 0.1 * torch.randn(1, config.audio.channels, round(args.seconds * config.audio.sample_rate))
    model = build_model(config).eval()
    load = os.getloadavg()[0]
    inputs = capture_first_block_inputs(model, wave)

    x, weight, bias, activation = inputs["conv"]
    norm, y, z = inputs["norm"]
    pairs = {
        "causal conv": (lambda: causal_conv1d_torch(x, weight, bias, activation),
                        lambda: causal_conv1d_reference(x, weight, bias, activation)),
        # the in-place path overwrites its input, so each call gets a fresh product (as the forward makes one)
        "gated RMSNorm": (lambda: norm._normalize_in_place(F.silu(z).mul_(y)),
                          lambda: norm._normalize(y * F.silu(z))),
    }
    print(f"first block's time path, {args.seconds:g} s of audio, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {load:.2f} before")
    print(f"{'layer':<15} {'input':<20} {'fast path ms':>12} {'plain ms':>9} {'ratio':>6} {'agreement':>10}")
    with torch.inference_mode():
        for name, (fast, plain) in pairs.items():
            agreement = sdr(fast(), plain())
            best = fastest({"fast": fast, "plain": plain}, args.repeats)
            shape = "×".join(map(str, (x if name == "causal conv" else y).shape))
            print(f"{name:<15} {shape:<20} {best['fast'] * 1e3:>12.1f} {best['plain'] * 1e3:>9.1f} "
                  f"{best['fast'] / best['plain']:>5.2f}× {agreement:>7.1f} dB")
    print(f"load average {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
