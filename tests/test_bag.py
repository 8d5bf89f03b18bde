"""A bag of models: each stem from its own network, stored, loaded and separated as one model."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsmamba2.api import Separator
from bsmamba2.checkpoint import build_model, keep_stems, load_model, save_model
from bsmamba2.config import Config
from bsmamba2.errors import BSMamba2Error
from bsmamba2.metrics import usdr
from bsmamba2.models.bag import BagOfModels

from separation_fixtures import save_tiny_checkpoint, tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bag_models.py"


def tiny_model(stems: list, seed: int, **audio):
    values = tiny_config().to_dict()
    values["model"]["stems"] = stems
    values["audio"].update(audio)
    torch.manual_seed(seed)
    return build_model(Config.from_dict(values)).eval()


def test_each_stem_comes_from_its_member_and_survives_saving(tmp_path):
    vocals_model, four_stem_model = tiny_model(["vocals"], 0), tiny_model(["vocals", "drums", "bass", "other"], 1)
    bag = BagOfModels([vocals_model, keep_stems(four_stem_model, ["other", "drums"])], ["drums", "vocals", "other"])
    mixture = torch.randn(2, 2, 9000)
    with torch.no_grad():
        stems, vocals, four = bag(mixture), vocals_model(mixture), four_stem_model(mixture)
    assert bag.stems == ["drums", "vocals", "other"] and stems.shape == (2, 3, 2, 9000)
    torch.testing.assert_close(stems[:, 1], vocals[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(stems[:, [0, 2]], four[:, [1, 3]], rtol=0, atol=0)
    for name, half, atol in (("bag.ckpt", False, 0), ("bag16.ckpt", True, 1e-2)):
        save_model(bag, tmp_path / name, half=half)
        loaded = load_model(tmp_path / name)
        assert loaded.stems == bag.stems and loaded.config.model.stems == bag.stems and not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(mixture), stems, rtol=0, atol=atol)
    assert (tmp_path / "bag16.ckpt").stat().st_size < 0.6 * (tmp_path / "bag.ckpt").stat().st_size
    save_model(vocals_model, tmp_path / "vocals.ckpt")
    song = mixture[0].numpy()
    separated = Separator(tmp_path / "bag.ckpt", device="cpu").separate(song, bag.sample_rate)
    alone = Separator(tmp_path / "vocals.ckpt", device="cpu").separate(song, bag.sample_rate)
    assert list(separated) == ["drums", "vocals", "other"]
    torch.testing.assert_close(torch.from_numpy(separated["vocals"]), torch.from_numpy(alone["vocals"]))


def test_the_last_members_can_share_what_the_others_leave_so_that_the_stems_sum_to_the_mixture(tmp_path):
    vocals_model, rest_model = tiny_model(["vocals"], 0), tiny_model(["drums", "bass", "other"], 1)
    plain = BagOfModels([vocals_model, rest_model], ["vocals", "drums", "bass", "other"])
    sharing = BagOfModels([vocals_model, rest_model], ["bass", "vocals", "drums", "other"], sharing_members=1)
    mixture = torch.randn(1, 2, 9000)
    with torch.no_grad():
        before, after = plain(mixture), sharing(mixture)
    assert usdr(mixture.numpy(), before.sum(1).numpy()) < 20  # the members alone leave part of the mixture out
    torch.testing.assert_close(after.sum(1), mixture, rtol=0, atol=1e-4)
    torch.testing.assert_close(after[:, 1], before[:, 0], rtol=0, atol=0)  # the vocals stay the vocals model's
    assert not torch.allclose(after[:, [2, 0, 3]], before[:, 1:], atol=1e-3)
    save_model(sharing, tmp_path / "bag.ckpt")
    loaded = load_model(tmp_path / "bag.ckpt")
    assert loaded.sharing_members == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(mixture), after, rtol=0, atol=0)
    # a bag saved before `sharing_members` says `last_shares_rest`
    payload = torch.load(tmp_path / "bag.ckpt")
    payload["last_shares_rest"] = payload.pop("sharing_members") == 1
    torch.save(payload, tmp_path / "old.ckpt")
    assert load_model(tmp_path / "old.ckpt").sharing_members == 1
    # the rest shared by two members: as by one member that gives their stems, whichever gives which
    split = BagOfModels([vocals_model, keep_stems(rest_model, ["bass"]), keep_stems(rest_model, ["drums", "other"])],
                        ["bass", "vocals", "drums", "other"], sharing_members=2)
    with torch.no_grad():
        torch.testing.assert_close(split(mixture), after, rtol=0, atol=1e-5)
    with pytest.raises(BSMamba2Error, match="cannot have 3 sharing the rest"):
        BagOfModels([vocals_model, rest_model], ["vocals", "drums", "bass", "other"], sharing_members=3)


def test_a_bag_that_cannot_work_is_refused_in_one_line(tmp_path):
    vocals_model = tiny_model(["vocals"], 0)
    with pytest.raises(BSMamba2Error, match="must give each of its stems"):
        BagOfModels([vocals_model, tiny_model(["vocals", "drums"], 1)], ["vocals", "drums"])
    with pytest.raises(BSMamba2Error, match="differ in audio.hop_length"):
        BagOfModels([vocals_model, tiny_model(["drums"], 1, hop_length=64)], ["vocals", "drums"])
    with pytest.raises(BSMamba2Error, match="has no bass stem"):
        keep_stems(vocals_model, ["bass"])
    bag = BagOfModels([vocals_model, tiny_model(["drums"], 1)], ["vocals", "drums"])
    with pytest.raises(BSMamba2Error, match="saved as a torch checkpoint"):
        save_model(bag, tmp_path / "bag.safetensors")
    save_model(bag, tmp_path / "bag.ckpt")
    with pytest.raises(BSMamba2Error, match="is a bag of models: its members keep their own configs"):
        load_model(tmp_path / "bag.ckpt", config=tiny_config())


def test_the_script_bags_the_stems_asked_for(tmp_path):
    vocals_path = save_tiny_checkpoint(tmp_path / "vocals.ckpt")  # stems vocals, drums
    other = tiny_model(["bass", "drums"], 3)
    save_model(other, tmp_path / "other.ckpt")
    out = tmp_path / "bag.ckpt"
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), f"{vocals_path}:vocals",
                             f"{tmp_path / 'other.ckpt'}:drums,bass"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    bag, mixture = load_model(out), torch.randn(1, 2, 5000)
    with torch.no_grad():
        torch.testing.assert_close(bag(mixture)[:, 1:], other(mixture)[:, [1, 0]], rtol=0, atol=0)
    assert bag.sharing_members == 0
    sharing = subprocess.run([sys.executable, str(SCRIPT), str(out), "--force", "--sharing-members", "1",
                              "--stems", "bass,vocals,drums", f"{vocals_path}:vocals",
                              f"{tmp_path / 'other.ckpt'}:drums,bass"], capture_output=True, text=True, timeout=120)
    assert sharing.returncode == 0, sharing.stderr
    assert load_model(out).sharing_members == 1 and load_model(out).stems == ["bass", "vocals", "drums"]
    again = subprocess.run([sys.executable, str(SCRIPT), str(out), f"{vocals_path}:vocals"], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode != 0 and "already exists (use --force to overwrite)" in again.stderr
    lacking = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "x.ckpt"), f"{vocals_path}:other"],
                             capture_output=True, text=True, timeout=120)
    assert lacking.returncode != 0 and "has no other stem" in lacking.stderr and "Traceback" not in lacking.stderr
    assert not (tmp_path / "x.ckpt").exists()


def test_int8_and_the_onnx_export_take_a_bag(tmp_path):
    bag = BagOfModels([tiny_model(["vocals"], 0), tiny_model(["drums", "bass"], 1)], ["vocals", "drums", "bass"],
                      sharing_members=1)
    save_model(bag, tmp_path / "bag.ckpt")
    mixture = torch.randn(1, 2, 9000)
    int8 = load_model(tmp_path / "bag.ckpt", quantize="int8")
    with torch.no_grad():
        expected, got = bag(mixture), int8(mixture)
    assert not torch.equal(expected, got) and usdr(expected.numpy(), got.numpy()) > 20
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from bsmamba2.onnx import export_onnx  # the export checks onnxruntime's stems against PyTorch's first

    assert export_onnx(bag, tmp_path / "bag.onnx") >= 60
    exported = Separator(tmp_path / "bag.onnx", device="cpu").separate(mixture[0].numpy(), bag.sample_rate)
    assert list(exported) == ["vocals", "drums", "bass"]
