import pytest

from bsmamba2.config import MAX_PARAMETERS_ENV, PAPER_BAND_WIDTHS, Config, load_config
from bsmamba2.errors import BSMamba2Error

CONFIGS = ["configs/bsmamba2_vocals.yaml", "configs/bsmamba2_4stem.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert sum(config.model.band_widths) == config.audio.n_fft // 2 + 1


def test_paper_defaults():
    config = Config().validate()
    assert config.model.band_widths == PAPER_BAND_WIDTHS and len(PAPER_BAND_WIDTHS) == 62
    assert (config.model.dim, config.model.depth, config.model.d_state, config.model.expand) == (256, 6, 128, 4)
    assert config.training.loss.stft_windows == [4096, 2048, 1024, 512, 256]


def test_overrides_are_parsed_and_typed():
    config = load_config(CONFIGS[0], ["training.lr=1e-4", "model.stems=[vocals, drums]", "data.root=/x"])
    assert config.training.lr == 1e-4 and config.model.stems == ["vocals", "drums"] and config.data.root == "/x"


def test_round_trip_through_dict():
    config = load_config(CONFIGS[1], ["model.dim=128"])
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("override, message", [
    ("model.dim=abc", "model.dim: expected an integer"),
    ("model.gradient_checkpointing=3", "model.gradient_checkpointing: expected true or false"),
    ("model.band_widths=[1, 2]", "model.band_widths: must be positive and sum to n_fft/2+1 = 1025"),
    ("model.headdim=100", "model.headdim: must divide d_inner"),
    ("model.ngroups=3", "model.ngroups: must divide the number of heads"),
    ("training.loss.stft_windows=[0]", "training.loss.stft_windows"),
    ("training.loss.sdr_weight=-1", "training.loss: weights must be non-negative"),
    ("inference.overlap=1.5", "inference.overlap"),
    ("model.scan_backend=fast", "model.scan_backend"),
    ("data.eq_db=-3", "data.eq_db: must be a non-negative gain in dB"),
    ("training.lr", "expected section.key=value"),
])
def test_bad_values_name_the_key_and_file(override, message):
    with pytest.raises(BSMamba2Error) as error:
        load_config(CONFIGS[0], [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    if "section.key" not in message:
        assert CONFIGS[0] in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("training.lrr=1", "--set 'training.lrr=1': unknown key training.lrr (did you mean training.lr?; known: "),
    ("trainign.lr=1", "--set 'trainign.lr=1': unknown key trainign (did you mean training?; known: audio, data, "),
    ("bogus.key=1", "--set 'bogus.key=1': unknown key bogus (known: audio, data, inference, model, training)"),
    ("model.dim.x=1", "--set 'model.dim.x=1': model.dim is not a section"),
])
def test_a_typo_in_set_is_blamed_on_set_with_a_guess(override, message):
    """Not on the YAML file, which has no such key."""
    with pytest.raises(BSMamba2Error) as error:
        load_config(CONFIGS[0], [override])
    assert str(error.value).startswith(message) and CONFIGS[0] not in str(error.value)


def test_a_typo_in_the_yaml_file_is_blamed_on_it_with_a_guess(tmp_path):
    (tmp_path / "typo.yaml").write_text("inference:\n  chunk_second: 4\n")
    with pytest.raises(BSMamba2Error, match=r"typo.yaml: unknown key inference.chunk_second \(did you mean "
                                            r"inference.chunk_seconds\?; known: batch_size, chunk_seconds, overlap\)$"):
        load_config(tmp_path / "typo.yaml")


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(BSMamba2Error, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(BSMamba2Error, match="invalid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BSMamba2Error, match="mapping"):
        load_config(tmp_path / "list.yaml")


# A checkpoint's stored config is data: these come from whoever made the checkpoint.
STORED = "config stored in evil.ckpt"


@pytest.mark.parametrize("stem", ["../../../tmp/x", "a/b", "..", "C:x", "two\nlines"])
def test_stem_names_must_be_plain_names(stem):
    values = {"model": {"stems": ["vocals", stem]}, "data": {"sources": ["vocals", stem]}}
    with pytest.raises(BSMamba2Error) as error:
        Config.from_dict(values, source=STORED)
    assert str(error.value) == (f"{STORED}: model.stems: {stem!r} is not a plain name (a stem names files: no / or "
                                "\\, drive, control character, nor only dots)")
    values["model"]["stems"] = ["vocals"]
    with pytest.raises(BSMamba2Error, match=f"^{STORED}: data.sources: .* is not a plain name"):
        Config.from_dict(values, source=STORED)


def test_keys_of_any_type_are_one_line():
    with pytest.raises(BSMamba2Error, match=f"^{STORED}: unknown key 7 \\(known: audio, data, "):
        Config.from_dict({7: {}, "model": {}}, source=STORED)


@pytest.mark.parametrize("values", [
    {},  # the paper's model
    {"model": {"stems": ["vocals", "drums", "bass", "other"], "dim": 96, "depth": 3}},
    {"audio": {"channels": 1, "n_fft": 256, "hop_length": 64},
     "model": {"band_widths": [60, 69], "ngroups": 2, "d_conv": 3, "expand": 2, "mask_hidden_factor": 3}},
])
def test_the_parameter_count_from_the_config_is_the_models(values):
    torch = pytest.importorskip("torch")
    from bsmamba2.checkpoint import build_model

    config = Config.from_dict(values)
    with torch.device("meta"):  # shapes without memory
        model = build_model(config)
    assert config.model.parameter_count(config.audio) == sum(p.numel() for p in model.parameters())
    if not values:
        assert config.model.parameter_count(config.audio) == 48_098_188  # the paper's 48.1 M


def test_a_model_above_the_size_limit_is_refused_before_it_is_built(monkeypatch):
    absurd = {"model": {"dim": 200_000, "depth": 50}}
    with pytest.raises(BSMamba2Error, match=f"^{STORED}: model: would have [0-9,]+ parameters \\(dim 200000, depth "
                                            "50\\), above the limit of 1,000,000,000 \\(set "
                                            f"{MAX_PARAMETERS_ENV} to a larger number to build it anyway\\)$"):
        Config.from_dict(absurd, source=STORED)
    monkeypatch.setenv(MAX_PARAMETERS_ENV, str(10 ** 15))  # for those who mean it
    assert Config.from_dict(absurd).model.dim == 200_000
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "40000000")
    with pytest.raises(BSMamba2Error, match="model: would have 48,098,188 parameters"):
        Config.from_dict({})
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "lots")
    with pytest.raises(BSMamba2Error, match=f"^{MAX_PARAMETERS_ENV}='lots': expected a number of parameters"):
        Config.from_dict({})
