"""Presets reproduce the released checkpoints' architectures (checked without any weights)."""

from __future__ import annotations

import pytest
import torch

from dinoseek.model import PRESETS, build_vit
from dinoseek.model.checkpoint import check_compatible, config_from_hf, convert_state_dict, drop_unused

# config.json values of the facebook/dinov2-* and facebook/dinov2-with-registers-* Hub repos.
OFFICIAL = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
COMMON = dict(image_size=518, patch_size=14, mlp_ratio=4, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_released_architecture(name):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    base, registers = name.removesuffix("-reg"), name.endswith("-reg")
    values = {**COMMON, **OFFICIAL[base]}
    if registers:
        hf_config = Dinov2WithRegistersConfig(num_register_tokens=4, **values)
        model_class = Dinov2WithRegistersModel
    else:
        hf_config = Dinov2Config(**values)
        model_class = Dinov2Model
    assert config_from_hf(hf_config.to_dict()) == PRESETS[name]
    with torch.device("meta"):
        reference = model_class(hf_config)
    ours = build_vit(name, device="meta")
    # Every released tensor, renamed, has a place of the right shape in our model and vice versa.
    check_compatible(
        {k: v.shape for k, v in ours.state_dict().items()},
        drop_unused(convert_state_dict(dict(reference.state_dict()))),
        name,
    )
    assert PRESETS[name].image_size == 518
