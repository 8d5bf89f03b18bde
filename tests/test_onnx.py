"""`bsmamba2 export` and ONNX models run by onnxruntime: the file, its metadata, and separations that agree with
PyTorch's through every option; the example that needs nothing of this package."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402  (installed with onnxscript)

import bsmamba2  # noqa: E402
from bsmamba2 import Separator  # noqa: E402
from bsmamba2.cli import main  # noqa: E402
from bsmamba2.errors import BSMamba2Error  # noqa: E402
from bsmamba2.metrics import usdr  # noqa: E402
from bsmamba2.pretrained import example_song  # noqa: E402
from separation_fixtures import noise, save_tiny_checkpoint, tiny_config, write_audio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# onnxruntime's stems against PyTorch's, as SDR: float rounding only
AGREEMENT_DB = 60


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, its export): the two-stem test model, exported for 0.5 s chunks."""
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint = save_tiny_checkpoint(folder / "tiny.ckpt", tiny_config(chunk_seconds=0.5))
    assert main(["export", str(checkpoint), str(folder / "tiny.onnx")]) == 0
    return checkpoint, folder / "tiny.onnx"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled vocals model from the registry, exported for 1 s chunks (its 8 s chunk exports too, but slowly)."""
    path = tmp_path_factory.mktemp("bundled") / "synth_vocals.onnx"
    assert main(["export", "--model", "synth-vocals", str(path), "--chunk", "1"]) == 0
    return path


def metadata(path: Path) -> dict:
    return {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}


def test_the_file_carries_what_a_program_needs_to_use_it(tiny):
    checkpoint, path = tiny
    meta = metadata(path)
    assert meta["bsmamba2.version"] == bsmamba2.__version__
    assert (meta["sample_rate"], meta["channels"], meta["n_fft"], meta["hop_length"]) == ("44100", "2", "256", "128")
    assert json.loads(meta["stems"]) == ["vocals", "drums"]
    assert (meta["chunk_samples"], meta["chunk_frames"], meta["overlap"]) == ("22050", "173", "0.25")
    assert json.loads(meta["bsmamba2.config"]) == tiny_config(chunk_seconds=0.5).to_dict()
    graph = onnx.load(str(path)).graph
    shapes = [[dim.dim_value or dim.dim_param for dim in value.type.tensor_type.shape.dim]
              for value in (graph.input[0], graph.output[0])]
    assert [value.name for value in (graph.input[0], graph.output[0])] == ["mixture_stft", "stems_stft"]
    assert isinstance(shapes[0][0], str) and shapes[0][0] == shapes[1][0]  # the batch: dynamic
    assert shapes[0][1:] == [2, 129, 173, 2] and shapes[1][1:] == [2, 2, 129, 173, 2]


@pytest.mark.slow
@pytest.mark.parametrize("channels", [2, 1])
def test_onnxruntime_separates_a_real_song_as_pytorch_does(bundled, channels):
    song, rate = sf.read(example_song(), dtype="float32")
    song = song if channels == 2 else song.mean(1)
    pytorch = Separator(model="synth-vocals", device="cpu", chunk_seconds=1.0)
    onnxruntime = Separator(bundled, device="cpu")
    for samples in (1, 30_001, len(song)):
        expected, got = pytorch.separate(song[:samples], rate), onnxruntime.separate(song[:samples], rate)
        assert list(got) == ["vocals", "no_vocals"]
        for name in expected:
            assert got[name].shape == expected[name].shape == song[:samples].shape
            if samples > 1:  # one sample: both silent or not, no ratio to take
                assert usdr(expected[name], got[name]) >= AGREEMENT_DB, (samples, name)


@pytest.mark.parametrize("options", [{"tta": True, "stems": ["drums"]}, {"two_stems": "vocals", "overlap": 0.5,
                                                                          "batch_size": 3}])
def test_every_option_behaves_the_same(tiny, options):
    checkpoint, path = tiny
    wave = noise(2, 50_000, seed=3)
    expected = Separator(checkpoint, "cpu", **options).separate(wave, 44100)
    got = Separator(path, "cpu", **options).separate(wave, 44100)
    assert list(got) == list(expected)
    for name in expected:
        assert usdr(expected[name], got[name]) >= AGREEMENT_DB


def test_separate_and_evaluate_commands_run_an_onnx_model(tiny, tmp_path, capsys):
    checkpoint, path = tiny
    song = write_audio(tmp_path / "song.wav", noise(2, 40_000, seed=1), 44100)
    for name, model in (("pytorch", checkpoint), ("onnx", path)):
        assert main(["separate", str(song), "--checkpoint", str(model), "-o", str(tmp_path / name),
                     "--bit-depth", "32f", "-q"]) == 0
    for stem in ("vocals", "drums"):
        expected, got = (sf.read(tmp_path / name / "song" / f"{stem}.wav")[0] for name in ("pytorch", "onnx"))
        assert usdr(expected, got) >= AGREEMENT_DB

    track = tmp_path / "data" / "test" / "track"
    track.mkdir(parents=True)
    for index, stem in enumerate(("vocals", "drums")):
        write_audio(track / f"{stem}.wav", noise(2, 30_000, seed=10 + index), 44100)
    write_audio(track / "mixture.wav", noise(2, 30_000, seed=10) + noise(2, 30_000, seed=11), 44100)
    scores = []
    for name, model in (("pytorch", checkpoint), ("onnx", path)):
        assert main(["evaluate", "--checkpoint", str(model), "--data", str(tmp_path / "data"), "--no-csdr",
                     "--quiet", "-o", str(tmp_path / f"results-{name}")]) == 0
        scores.append(json.loads((tmp_path / f"results-{name}" / "results.json").read_text())["tracks"]["track"])
    for stem in ("vocals", "drums"):
        assert scores[1][stem]["usdr"] == pytest.approx(scores[0][stem]["usdr"], abs=1e-3)
    capsys.readouterr()


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_damaged_and_foreign_files_say_so_in_one_line(tiny, tmp_path, capsys):
    song = write_audio(tmp_path / "song.wav", noise(2, 5000), 44100)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny[1].read_bytes()[:5000])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all" * 100)
    foreign = tmp_path / "foreign.onnx"
    identity = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([identity], "foreign", [value("x", 1, [2])],
                                                            [value("y", 1, [2])])), str(foreign))
    for path, expected in ((truncated, "not a readable ONNX model"), (garbage, "not a readable ONNX model"),
                           (foreign, "not a BSMamba2 export"), (tmp_path / "missing.onnx", "no such file")):
        err = one_line_error(capsys, ["separate", str(song), "--checkpoint", str(path), "-o", str(tmp_path)])
        assert f"ONNX model {path}: {expected}" in err


def test_options_that_cannot_apply_to_an_export_are_refused(tiny, tmp_path, capsys):
    checkpoint, path = tiny
    with pytest.raises(BSMamba2Error, match=r"chunk 2.0 s: .* was exported for chunks of 0.5 s \(export it again "
                                            r"with --chunk 2.0"):
        Separator(path, "cpu", chunk_seconds=2.0)
    with pytest.raises(BSMamba2Error, match="an ONNX model carries its own config"):
        Separator(path, "cpu", config=tiny_config())
    err = one_line_error(capsys, ["export", str(checkpoint), str(tmp_path / "short.onnx"), "--chunk", "0.005"])
    assert "chunk 0.005 s: shorter than one STFT window (256 samples)" in err
    err = one_line_error(capsys, ["export", str(checkpoint), str(path)])
    assert "already exists (use --force to overwrite)" in err
    err = one_line_error(capsys, ["export", "--model", "synth-vocals", str(checkpoint), str(tmp_path / "x.onnx")])
    assert "choose either CHECKPOINT or --model" in err


def test_without_onnxruntime_one_line_says_how_to_install_it(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(BSMamba2Error, match=r'running ONNX models needs onnxruntime: pip install "bsmamba2\[onnx\]"'):
        Separator(tiny[1], "cpu")
    err = one_line_error(capsys, ["export", str(tiny[0]), str(tmp_path / "x.onnx")])
    assert 'exporting to ONNX needs onnxruntime: pip install "bsmamba2[onnx]"' in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_the_example_separates_without_this_package_or_torch(bundled, tmp_path):
    """examples/onnx_separate.py with bsmamba2 and torch made unimportable, against `Separator`'s stems."""
    run = ("import runpy, sys\n"
           "sys.modules['bsmamba2'] = sys.modules['torch'] = None\n"
           f"sys.argv = ['onnx_separate.py', {str(bundled)!r}, {str(example_song())!r}, {str(tmp_path)!r}]\n"
           f"runpy.run_path({str(REPO / 'examples' / 'onnx_separate.py')!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = Separator(bundled, "cpu").separate_file(example_song())["vocals"]
    got = sf.read(tmp_path / "vocals.wav", always_2d=True)[0].T
    # The network amplifies float rounding in its input: with numpy's STFT in place of torch's the stems agree to
    # about 66 dB, as close as PyTorch's own stems stay when the song changes by one part in 10⁷.
    assert usdr(expected, got) >= 50


@pytest.mark.slow
def test_the_benchmark_times_each_runtime_and_compares_its_stems(tiny, tmp_path):
    """scripts/onnx_benchmark.py on the tiny model, with its export already in --dir (the script reuses it)."""
    checkpoint, path = tiny
    (tmp_path / "tiny.onnx").write_bytes(path.read_bytes())
    command = [sys.executable, str(REPO / "scripts" / "onnx_benchmark.py"), "--dir", str(tmp_path), "--models",
               str(checkpoint), "--repeats", "2", "--json", str(tmp_path / "figures.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = json.loads((tmp_path / "figures.json").read_text())["records"]
    modes = ["PyTorch fp32", "PyTorch int8", "onnxruntime fp32", "onnxruntime int8"]
    assert [(r["model"], r["mode"]) for r in records] == [("tiny", mode) for mode in modes]
    fp32 = records[0]
    for r in records:
        assert 0 < r["seconds_min"] <= r["seconds_median"] and r["repeats"] == 2 and r["audio_seconds"] == 0.5
        assert r["seconds_per_audio_second"] == pytest.approx(r["seconds_median"] / 0.5)
        assert r["vs_pytorch_fp32"] == pytest.approx(r["seconds_median"] / fp32["seconds_median"])
        assert r["peak_mb"] > 50 and r["export_seconds"] is None  # a Python with torch; the export was reused
    agreement = {r["mode"]: r["agreement_db"] for r in records}
    assert agreement["PyTorch fp32"] is None and agreement["onnxruntime fp32"] >= AGREEMENT_DB
    assert 10 < agreement["PyTorch int8"] < AGREEMENT_DB and 10 < agreement["onnxruntime int8"] < AGREEMENT_DB
    table = [line for line in done.stdout.splitlines() if line.startswith("| tiny |")]
    assert [line.split(" | ")[1] for line in table] == modes
    assert "tiny: 0.5 s chunks, 2 timed calls each; export reused" in done.stdout


def test_onnxruntime_session_suits_a_shared_cpu(tiny, monkeypatch):
    """Idle threads sleep (on a CPU shared with other jobs, spinning threads slow the working ones) unless
    OMP_WAIT_POLICY=ACTIVE asks every runtime to spin; no memory pattern (it doubles the paper model's peak)."""
    from bsmamba2.onnx import OnnxModel

    for policy, spinning in (("PASSIVE", "0"), ("active", "1")):
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        options = OnnxModel(tiny[1]).session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
        assert not options.enable_mem_pattern
