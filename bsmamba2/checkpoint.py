"""Reading and writing checkpoints, building models, and loading the published BSMamba2 checkpoints.

Our checkpoints are dicts holding at least `config` (the resolved Config as a dict) and `model` (a state dict),
and, from training, `ema` (preferred for inference when present). The published checkpoints (the authors'
Lightning `sota_model.ckpt`, Music-Source-Separation-Training's `bs_mamba2_vocals.ckpt`) hold the same parameter
names, possibly nested under `state_dict` / `model` / `ema`-like keys and prefixed with `model.` / `module.`;
without a stored config they get the paper vocals config.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Union

import torch

from .config import Config, load_config
from .errors import BSMamba2Error
from .files import atomic_write
from .models.bs_mamba2 import BSMamba2

log = logging.getLogger("bsmamba2")

# Every BSMamba2 state dict has exactly one of these; what precedes it in a key is the nesting prefix.
ANCHOR_KEY = "final_norm.gamma"


def build_model(config: Config) -> BSMamba2:
    """An untrained model for `config` (in train mode); `model.config` keeps the config."""
    model = BSMamba2(config.model, config.audio)
    model.config = config
    return model


def load_model(checkpoint: Union[str, Path, None] = None, config: Union[Config, str, Path, None] = None,
               device: Union[str, torch.device] = "cpu") -> BSMamba2:
    """A model in eval mode from a checkpoint (ours or a published one); `config` overrides the stored one.

    Without `checkpoint`, the bundled default model.
    """
    if checkpoint is None:
        from .pretrained import default_checkpoint
        checkpoint = default_checkpoint()
    payload = read_checkpoint(checkpoint)
    if config is not None:
        config = config if isinstance(config, Config) else load_config(config)
    elif isinstance(payload.get("config"), dict):
        config = Config.from_dict(payload["config"], source=f"config stored in {checkpoint}")
    else:
        config = Config().validate()  # the defaults are the published vocals checkpoints' configuration
    model = build_model(config)
    model.load_state_dict(find_state_dict(payload, model, checkpoint))
    return model.to(device).eval()


def find_state_dict(payload: dict, model: torch.nn.Module, source) -> dict:
    """The model's weights inside a checkpoint, checked name by name and shape by shape against `model`."""
    candidates = _weight_sets(payload)
    if not candidates:
        raise BSMamba2Error(f"checkpoint {source}: no BSMamba2 weights found (no '{ANCHOR_KEY}' tensor)")
    # EMA weights are the better ones wherever a checkpoint holds both.
    candidates.sort(key=lambda named: "ema" not in named[0].lower())
    expected = model.state_dict()
    problems = []
    for name, weights in candidates:
        problems = _mismatches(weights, expected)
        if not problems:
            return weights
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    raise BSMamba2Error(f"checkpoint {source} does not match the model config: {shown}")


def _weight_sets(payload, path: str = "", depth: int = 0) -> list:
    """All (where, state dict) pairs found in nested dicts, with any key prefix before the anchor removed."""
    found = []
    if not isinstance(payload, dict) or depth > 3:
        return found
    prefixes = [key[: -len(ANCHOR_KEY)] for key in payload if isinstance(key, str) and key.endswith(ANCHOR_KEY)
                and isinstance(payload[key], torch.Tensor)]
    for prefix in prefixes:
        weights = {key[len(prefix):]: value for key, value in payload.items()
                   if isinstance(key, str) and key.startswith(prefix) and isinstance(value, torch.Tensor)}
        found.append((path + prefix, weights))
    for key, value in payload.items():
        if isinstance(value, dict):
            found += _weight_sets(value, f"{path}{key}/", depth + 1)
    return found


def _mismatches(weights: dict, expected: dict) -> list:
    problems = [f"missing {key}" for key in expected if key not in weights]
    problems += [f"unexpected {key}" for key in weights if key not in expected]
    problems += [f"{key} has shape {tuple(weights[key].shape)}, the config wants {tuple(value.shape)}"
                 for key, value in expected.items() if key in weights and weights[key].shape != value.shape]
    return problems


def read_checkpoint(path: Union[str, Path]) -> dict:
    """torch.load on the CPU, with one-line errors for missing and unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise BSMamba2Error(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise BSMamba2Error(f"checkpoint {path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None
        # Lightning checkpoints may pickle extra objects (hyper-parameters): trust the file the user named.
        log.warning("checkpoint %s holds more than tensors and plain types; loading it fully", path)
        payload = _load_untrusted(path)
    except Exception as error:
        raise BSMamba2Error(f"checkpoint {path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None
    if not isinstance(payload, dict):
        raise BSMamba2Error(f"checkpoint {path}: expected a dict of tensors, found {type(payload).__name__}")
    return payload


def _load_untrusted(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise BSMamba2Error(f"checkpoint {path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_save(obj, path: Union[str, Path]) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves a half-written file."""
    with atomic_write(path) as file:
        torch.save(obj, file)


def save_model(model: BSMamba2, path: Union[str, Path], **extra) -> None:
    """A checkpoint that `load_model` reads: the model's config and weights (plus any `extra` entries)."""
    atomic_save({"config": model.config.to_dict(), "model": model.state_dict(), **extra}, path)

