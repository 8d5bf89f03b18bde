"""CPU inference at the commands' speed from the Python API: int8 (bsmamba2.quantize), and the process setup that
`import bsmamba2`, load_model and Separator apply."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bsmamba2 import Separator, load_model, quantize
from bsmamba2.errors import BSMamba2Error
from bsmamba2.pretrained import example_song
from bsmamba2.quantize import Int8Linear, check_quantize

# The tolerance: int8 output against float32, as SDR (dB), on the bundled model and the example song; a few dB
# below what docs/performance.md reports for the 7-bit activations of x86 CPUs without VNNI (8-bit ones do better).
MIN_SDR_VS_FP32 = 25.0
# Per stem, through Separator, on the default four-stem model: measured on this VNNI CPU vocals 26.7, drums 37.5,
# bass 32.3, other 36.9 dB.
MIN_STEM_SDR_VS_FP32 = 20.0
REPO = Path(__file__).resolve().parents[1]


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - estimate) ** 2)))


@pytest.mark.slow
def test_int8_agrees_with_float32_on_the_bundled_model():
    wave, rate = sf.read(example_song(), dtype="float32", always_2d=True)
    wave = torch.from_numpy(wave.T.copy())[None]
    fp32, int8 = load_model(), load_model(quantize="int8")
    with torch.inference_mode():
        expected, got = fp32(wave).numpy(), int8(wave).numpy()
    quantized = [name for name, module in int8.named_modules() if isinstance(module, Int8Linear)]
    # per dual-path layer of each network (the default model is a bag of two): 2 blocks × (2 mixers × (in_proj,
    # out_proj) + the merge)
    assert len(quantized) == 2 * 5 * sum(network.config.model.depth for network in fp32.members)
    assert all(name.endswith(("mixer.in_proj", "mixer.out_proj", ".linear")) for name in quantized)
    assert not np.array_equal(got, expected)                   # it did run in int8
    assert sdr(expected, got) > MIN_SDR_VS_FP32


@pytest.mark.slow
def test_separator_in_int8_separates_like_float32():
    wave, rate = sf.read(example_song(), dtype="float32")
    stems = Separator(device="cpu", quantize="int8").separate(wave, rate)
    reference = Separator(device="cpu").separate(wave, rate)
    assert stems.keys() == reference.keys() == {"vocals", "drums", "bass", "other"}  # the default model's
    for stem in stems:
        assert stems[stem].shape == wave.shape
        assert sdr(reference[stem], stems[stem]) > MIN_STEM_SDR_VS_FP32, stem


@pytest.mark.parametrize("mode, device, message", [
    ("int8", "cuda", r"^quantize int8: runs on the CPU only, not on cuda \(choose device cpu\)$"),
    ("int8", "meta", r"^quantize int8: runs on the CPU only, not on meta"),
    ("int4", "cpu", r"^quantize int4: expected int8$"),
])
def test_refused_where_it_cannot_run(mode, device, message):
    with pytest.raises(BSMamba2Error, match=message):
        check_quantize(mode, torch.device(device))
    with pytest.raises(BSMamba2Error, match=message):
        load_model(quantize=mode, device=device)


def test_refused_in_a_torch_without_int8_kernels(monkeypatch):
    monkeypatch.setattr(quantize, "int8_unavailable_reason", lambda: "torch 9.9 has no int8 CPU kernels")
    with pytest.raises(BSMamba2Error, match=r"^quantize int8: torch 9\.9 has no int8 CPU kernels$"):
        Separator(device="cpu", quantize="int8")


def test_cli_refuses_int8_on_another_device_in_one_line(tmp_path):
    """`--device meta` passes neither check: what a user sees is one line and exit status 2."""
    done = subprocess.run([sys.executable, "-m", "bsmamba2", "separate", "--quantize", "int8", "--device", "meta",
                           "-o", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "meta" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keeping freed memory is a glibc setting")
@pytest.mark.parametrize("entry", ["load_model()", "Separator(device='cpu')"])
@pytest.mark.parametrize("opt_out", [False, True])
def test_loading_on_the_cpu_keeps_freed_memory_unless_opted_out(entry, opt_out):
    """In a child process (the setting is process-wide): after load_model or Separator, 256 MiB freed stay with
    the process for the next tensors (resident), unless BSMAMBA2_KEEP_FREED_MEMORY=0. Importing bsmamba2 before
    torch also gives OpenMP the commands' wait policy."""
    code = ("from bsmamba2 import Separator, load_model, runtime\n"
            "import json, os, torch\n"
            "def rss():\n"
            "    with open('/proc/self/statm') as file:\n"
            "        return int(file.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
            f"{entry}\n"
            "before = rss()\n"
            "big = torch.ones(64, 2 ** 20)\n"
            "del big\n"
            "print(json.dumps({'kept_mb': (rss() - before) / 2 ** 20, 'setup': runtime.setup_process(),\n"
            "                  'omp': os.environ.get('OMP_WAIT_POLICY')}))\n")
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env["BSMAMBA2_KEEP_FREED_MEMORY"] = "0" if opt_out else "1"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["setup"]["keep_freed_memory"] is not opt_out
    assert result["omp"] == "PASSIVE"
    if opt_out:
        assert result["kept_mb"] < 32
    else:
        assert result["kept_mb"] > 200


@pytest.mark.slow
def test_layer_speedups_script_compares_each_fast_path_with_its_plain_formulation():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "layer_speedups.py"), "--config",
                           str(REPO / "configs" / "synth_vocals.yaml"), "--seconds", "1", "--repeats", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in done.stdout.splitlines()
            if line.startswith(("causal conv", "gated RMSNorm"))}
    assert set(rows) == {"causal conv", "gated RMSNorm"}
    for fields in rows.values():
        assert float(fields[-2]) > 100          # agreement in dB: the fast paths compute the same thing
        assert float(fields[3]) > 0 and float(fields[4]) > 0
