"""How a backend is chosen: automatic by device and imports, argument > BSMAMBA2_SCAN > auto, clear errors, one log
line per choice."""
import importlib.util

import pytest
import torch

from bsmamba2.config import SCAN_BACKENDS, Config
from bsmamba2.errors import BSMamba2Error
from bsmamba2.models.mamba2 import Mamba2
from bsmamba2.ops import BACKEND_NAMES, backends, mamba_chunk_scan_combined, resolve_backend, scan_kernels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def scan_log(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("scan backend:")]


def test_auto_on_cpu_without_mamba_ssm_picks_torch(caplog, fresh_backend_log):
    with caplog.at_level("INFO", logger="bsmamba2"):
        assert resolve_backend(None, CPU).name == "torch"
        assert resolve_backend("auto", CPU).name == "torch"
    assert scan_log(caplog) == ["scan backend: torch (chunked SSD, pure PyTorch) on cpu, auto"]


def test_auto_on_cuda_prefers_kernels_by_what_imports(monkeypatch, fresh_backend_log):
    available = {}

    def load_kernel(name):
        if name not in available:
            raise ImportError(f"No module named {name!r}")
        return available[name]

    monkeypatch.setattr(scan_kernels, "load_kernel", load_kernel)
    assert resolve_backend(None, CUDA).name == "torch"                 # nothing installed
    available["mamba_chunk_scan_combined"] = object()
    assert resolve_backend(None, CUDA).name == "triton"                # mamba_ssm without causal-conv1d
    available.update(selective_scan_fn=object(), causal_conv1d_fn=object())
    assert resolve_backend(None, CUDA).name == "cuda"
    assert resolve_backend(None, CPU).name == "torch"                  # never the kernels for CPU tensors


def test_argument_beats_environment_beats_auto(monkeypatch, caplog, fresh_backend_log):
    monkeypatch.setenv("BSMAMBA2_SCAN", "reference")
    with caplog.at_level("INFO", logger="bsmamba2"):
        assert resolve_backend(None, CPU).name == "reference"
        assert resolve_backend("auto", CPU).name == "reference"
        assert resolve_backend("torch", CPU).name == "torch"
    assert scan_log(caplog) == [
        "scan backend: reference (sequential loop over time, for tests) on cpu, from BSMAMBA2_SCAN",
        "scan backend: torch (chunked SSD, pure PyTorch) on cpu, requested"]


def test_unavailable_explicit_backend_raises_with_reason(monkeypatch, fresh_backend_log):
    with pytest.raises(BSMamba2Error, match=r"scan backend 'cuda' needs mamba_ssm and causal_conv1d and CUDA "
                                            r"tensors: the tensors are on cpu"):
        resolve_backend("cuda", CPU)
    if importlib.util.find_spec("mamba_ssm") is not None:
        pytest.skip("mamba_ssm is installed: its import error cannot be shown")
    # On a CUDA tensor the import is tried, and its error is the reason.
    with pytest.raises(BSMamba2Error, match=r"scan backend 'triton' needs .*No module named 'mamba_ssm'"):
        resolve_backend("triton", CUDA)
    monkeypatch.setenv("BSMAMBA2_SCAN", "cuda")
    with pytest.raises(BSMamba2Error, match="scan backend 'cuda' needs"):
        resolve_backend(None, CPU)


def test_unknown_backend_names_its_source(monkeypatch, fresh_backend_log):
    with pytest.raises(BSMamba2Error, match=r"unknown scan backend 'fast' \(choose auto, torch, torch\+compile"):
        resolve_backend("fast", CPU)
    monkeypatch.setenv("BSMAMBA2_SCAN", "gpu")
    with pytest.raises(BSMamba2Error, match=r"BSMAMBA2_SCAN=gpu: unknown scan backend 'gpu'"):
        resolve_backend(None, CPU)


def test_each_choice_logged_once_and_used(monkeypatch, caplog, fresh_backend_log):
    calls = []
    monkeypatch.setattr(scan_kernels, "scan_triton", lambda *a, **k: calls.append("triton"))
    x = torch.randn(1, 5, 2, 4)
    with caplog.at_level("INFO", logger="bsmamba2"):
        for _ in range(3):
            mamba_chunk_scan_combined(x, torch.randn(1, 5, 2), -torch.ones(2), torch.randn(1, 5, 1, 3),
                                      torch.randn(1, 5, 1, 3), 4, backend="reference")
    assert scan_log(caplog) == ["scan backend: reference (sequential loop over time, for tests) on cpu, requested"]
    assert calls == []


def test_mixer_passes_its_configured_backend(caplog, fresh_backend_log):
    mixer = Mamba2(16, d_state=8, expand=2, headdim=8, chunk_size=4, scan_backend="reference")
    with caplog.at_level("INFO", logger="bsmamba2"):
        mixer(torch.randn(1, 6, 16))
    assert "scan backend: reference (sequential loop over time, for tests) on cpu, requested" in scan_log(caplog)


def test_every_backend_name_the_config_accepts_has_an_implementation():
    assert tuple(backends.BACKENDS) == BACKEND_NAMES == SCAN_BACKENDS
    for name in ("auto",) + BACKEND_NAMES:
        assert Config.from_dict({"model": {"scan_backend": name}}).model.scan_backend == name
    with pytest.raises(BSMamba2Error, match="model.scan_backend"):
        Config.from_dict({"model": {"scan_backend": "gpu"}})
