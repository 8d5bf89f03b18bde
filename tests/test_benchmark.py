"""The benchmark: one real measurement in-process, and the report/JSON/options around canned measurements."""
import json

import pytest
import torch

from bsmamba2 import benchmark
from bsmamba2.cli import main


@pytest.mark.slow
def test_scan_measurement_times_and_checks_against_reference():
    job = {"section": "mixer", "backend": "torch", "pass": "fwdbwd", "batch": 3, "seqlen": 20, "chunk_size": 8,
           "device": "cpu", "repeats": 2, "budget": 10.0, "keep_freed_memory": False, "threads": None}
    result = benchmark._worker(job)
    assert result["repeats"] == 2 and 0 < result["min_seconds"] <= result["seconds"] <= result["max_seconds"]
    assert result["first_call_seconds"] > 0 and result["peak_mb"] is not None
    assert result["err_sequences"] == 2 and result["max_abs_err"] < 1e-3 * max(1.0, result["ref_max_abs"])


def fake_measurement(job):
    """Canned results: the loop 20× slower than torch and 8× its memory."""
    if job["section"] == "model":
        return {"seconds": 4.0, "min_seconds": 4.0, "max_seconds": 4.0, "repeats": 1, "first_call_seconds": 5.0,
                "peak_mb": 300.0, "config_name": "paper (defaults)", "backend": "torch", "parameters": 48098188,
                "seconds_per_audio_second": 4.0 / job["audio_seconds"], "seqlen": 51, "d_state": 128}
    slow = 20.0 if job["backend"] == "reference" else 1.0
    return {"seconds": 0.1 * slow, "min_seconds": 0.09 * slow, "max_seconds": 0.2 * slow, "repeats": 2,
            "first_call_seconds": 0.3 * slow, "peak_mb": 10.0 * (8 if slow > 1 else 1), "max_abs_err": 1e-6,
            "err_sequences": 2, "ref_max_abs": 3.0}


def test_report_json_and_unavailable_backends(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark, "_in_subprocess", fake_measurement)
    monkeypatch.setattr(benchmark, "scan_shapes", lambda quick: [
        benchmark.ScanShape("mixer", 8, 512, reference=benchmark.PASSES, compile=True),
        benchmark.ScanShape("time path", 62, 201)])
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--json", str(out), "--audio-seconds", "0.5", "--quiet"]) == 0
    text = capsys.readouterr().out
    records = json.loads(out.read_text())
    if not torch.cuda.is_available():
        assert "cuda: unavailable: the tensors are on cpu" in text
        assert all(r["unavailable"] == "the tensors are on cpu" for r in records if r["backend"] in ("cuda", "triton"))
    torch_rows = [line.split() for line in text.splitlines() if line.startswith("mixer 8×512") and " torch " in line]
    assert [row[2] for row in torch_rows] == ["fwd", "fwdbwd"] and all(row[-2] == "20.0×" for row in torch_rows)
    measured = [r for r in records if "seconds" in r and r["section"] != "model"]
    for record in measured:
        assert {"backend", "pass", "batch", "seqlen", "d_state", "seconds", "peak_mb", "max_abs_err"} <= set(record)
    skipped = {(r["section"], r["backend"], r["pass"]) for r in records if "skipped" in r}
    assert ("time path", "reference", "fwdbwd") in skipped and ("time path", "torch+compile", "fwd") in skipped
    model = next(r for r in records if r["section"] == "model")
    assert model["seconds_per_audio_second"] == 8.0 and "paper (defaults) (torch)" in text

    # an existing output is kept unless --force
    assert main(["benchmark", "--json", str(out), "--quiet"]) == 2
    assert f"{out} already exists (use --force to overwrite)" in capsys.readouterr().err


def test_plot_needs_matplotlib(monkeypatch, tmp_path, capsys):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else real_find_spec(name, *args))
    assert main(["benchmark", "--plot", str(tmp_path / "t.png")]) == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_plot_is_written(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(benchmark, "_in_subprocess", fake_measurement)
    monkeypatch.setattr(benchmark, "scan_shapes", lambda quick: [benchmark.ScanShape("time path", 62, 201),
                                                                 benchmark.ScanShape("time path", 62, 401)])
    plot = tmp_path / "time.png"
    assert main(["benchmark", "--plot", str(plot), "--model-config", "--quiet"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
