"""Every config key the training loop and the data pipeline read rejects impossible values, naming the key."""
import pytest

from bsmamba2.config import Config
from bsmamba2.errors import BSMamba2Error

from training_fixtures import tiny_config_dict

BAD_VALUES = [
    ("training", "max_steps", 0), ("training", "batch_size", 0), ("training", "grad_accum_steps", 0),
    ("training", "lr", 0.0), ("training", "weight_decay", -1.0), ("training", "betas", [0.9]),
    ("training", "betas", [0.9, 1.0]), ("training", "scheduler", "step"), ("training", "warmup_steps", -1),
    ("training", "min_lr_ratio", 2.0), ("training", "plateau_factor", 1.0), ("training", "plateau_patience", 0),
    ("training", "grad_clip", -1.0), ("training", "precision", "fp8"), ("training", "device", "tpu"),
    ("training", "ema_decay", 1.0), ("training", "seed", "abc"), ("training", "num_workers", -1),
    ("training", "log_every", 0), ("training", "validate_every", 0), ("training", "checkpoint_every", 0),
    ("training", "keep_last", 0), ("training", "max_nonfinite_steps", 0),
    ("data", "root", 3), ("data", "train_subset", ["train"]), ("data", "valid_subset", 1),
    ("data", "valid_tracks", "one"), ("data", "segment_seconds", 0.0), ("data", "valid_segment_seconds", -1.0),
    ("data", "sources", []), ("data", "sources", ["drums", "bass"]), ("data", "sources", ["vocals", "mixture"]),
    ("data", "sources", ["vocals", "vocals"]), ("data", "gain_range", [1.5, 0.5]), ("data", "silence_prob", 1.0),
    ("data", "mix_different_tracks", "yes"), ("data", "min_activity_db", 6.0), ("data", "channel_swap", 1),
    ("data", "polarity_flip", None),
    ("inference", "chunk_seconds", 0.0), ("inference", "overlap", 1.0), ("inference", "batch_size", 0),
]


@pytest.mark.parametrize("section, key, value", BAD_VALUES, ids=[f"{s}.{k}={v!r}" for s, k, v in BAD_VALUES])
def test_bad_training_values_are_rejected_by_name(tmp_path, section, key, value):
    values = tiny_config_dict(tmp_path)
    values[section][key] = value
    with pytest.raises(BSMamba2Error) as error:
        Config.from_dict(values, source="run.yaml")
    message = str(error.value)
    assert message.startswith(f"run.yaml: {section}.{key}") and "\n" not in message


def test_unknown_training_and_loss_keys_are_rejected(tmp_path):
    for section, key in [("training", "epochs"), ("data", "samples_per_epoch")]:
        values = tiny_config_dict(tmp_path)
        values[section][key] = 1
        with pytest.raises(BSMamba2Error, match=f"unknown key {section}.{key}"):
            Config.from_dict(values)
    values = tiny_config_dict(tmp_path)
    values["training"]["loss"]["l2_weight"] = 1.0
    with pytest.raises(BSMamba2Error, match="unknown key training.loss.l2_weight"):
        Config.from_dict(values)


