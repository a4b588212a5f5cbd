"""`load_weights` / `load_vit`: any weights source -> a DinoVisionTransformer in eval mode (and its fingerprint)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    check_compatible,
    check_finite,
    config_from_hf,
    convert_state_dict,
    drop_unused,
    infer_config,
    read_checkpoint,
)
from .config import HUB_REPOS, PRESETS, ViTConfig
from .errors import InvalidArgumentError
from .fingerprint import files_sha256
from .hub import resolve_preset, resolve_repo
from .vit import DinoVisionTransformer


def resolve_source(source: str | Path) -> Path:
    """A preset name (`small`, `base-reg`, ...) or its repo id (`facebook/dinov2-small`) resolves
    through the Hub cache; anything else is a path."""
    if isinstance(source, str) and not Path(source).exists():
        if source in HUB_REPOS:
            return resolve_preset(source)
        if source in HUB_REPOS.values():
            return resolve_repo(source)
    return Path(source).expanduser()


def describe_source(source: str | Path) -> dict:
    """Where weights came from, as a library manifest records it to load them again later:
    `{"hub": repo id}` for a preset (found again in the Hugging Face cache wherever that is), or
    `{"path": absolute path}` for files."""
    if isinstance(source, str) and not Path(source).exists():
        if source in HUB_REPOS:
            return {"hub": HUB_REPOS[source]}
        if source in HUB_REPOS.values():
            return {"hub": source}
    return {"path": os.path.abspath(os.path.expanduser(source))}  # not resolved: a symlink may be re-pointed later


@dataclass(frozen=True)
class Weights:
    """A model loaded from checkpoint files, and what identifies those weights."""

    vit: DinoVisionTransformer
    # sha256 of the files read. A function, called once when a library manifest needs it: hashing
    # gigabytes is left to the commands that record or check one.
    fingerprint: Callable[[], str]
    # Where they were loaded from (`describe_source`), so a library can load them again unasked.
    source: dict | None = None


def load_vit(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ViTConfig | None = None,
) -> DinoVisionTransformer:
    """`load_weights(...).vit`: the model alone."""
    return load_weights(source, device=device, dtype=dtype, config=config).vit


def load_weights(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ViTConfig | None = None,
) -> Weights:
    """Load DINOv2 weights from a preset name, HF folder, `.safetensors` or `.pth` file.

    The module's call on `pixel_values` (B, 3, H, W) returns the final-norm hidden states
    (B, 1 + registers + patches, D) — the reference's `last_hidden_state`. `config` overrides the
    architecture read from config.json or inferred from the tensors. Layer and softmax scales come
    folded into the linear layers (`DinoVisionTransformer.fold_scales`).
    """
    path = resolve_source(source)
    raw = read_checkpoint(path)
    tensors = drop_unused(convert_state_dict(raw.tensors))
    if config is None:
        # An empty config.json is a config without sizes (refused by name), not a missing one.
        config = config_from_hf(raw.hf_config) if raw.hf_config is not None else infer_config(tensors)
    model = build_vit(config, device="meta")  # shapes only: nothing is allocated yet
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_compatible(expected, tensors, str(path))
    check_finite(tensors, expected)
    # Checkpoints may be stored in half precision; go through float32 so every dtype is cast once.
    state = {k: v.to(torch.float32) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # Fold in float32, before any cast, so the products are rounded once.
    model = model.fold_scales().to(device=device, dtype=dtype).eval().requires_grad_(False)
    # Over the files, not the module: the fingerprint stays that of the checkpoint, whatever casts
    # or quantization later do to the model.
    return Weights(model, functools.partial(files_sha256, raw.files), describe_source(source))


def build_vit(config: ViTConfig | str, *, device: str | torch.device = "cpu") -> DinoVisionTransformer:
    """An architecture without weights (random init on a real device; empty on "meta")."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise InvalidArgumentError(f"unknown preset {config!r}; expected one of {', '.join(PRESETS)}")
        config = PRESETS[config]
    with torch.device(device):
        return DinoVisionTransformer(config)
