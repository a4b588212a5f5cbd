"""`load_vit`: any weights source -> a DinoVisionTransformer in eval mode."""

from __future__ import annotations

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
from .hub import resolve_preset
from .vit import DinoVisionTransformer


def resolve_source(source: str | Path) -> Path:
    """A preset name (`small`, `base-reg`, ...) resolves through the Hub cache; anything else is a path."""
    if isinstance(source, str) and source in HUB_REPOS and not Path(source).exists():
        return resolve_preset(source)
    return Path(source)


def load_vit(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ViTConfig | None = None,
) -> DinoVisionTransformer:
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
    model.source_files = raw.files  # for weight fingerprints in library manifests
    # Fold in float32, before any cast, so the products are rounded once.
    return model.fold_scales().to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_vit(config: ViTConfig | str, *, device: str | torch.device = "cpu") -> DinoVisionTransformer:
    """An architecture without weights (random init on a real device; empty on "meta")."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; expected one of {', '.join(PRESETS)}")
        config = PRESETS[config]
    with torch.device(device):
        return DinoVisionTransformer(config)
