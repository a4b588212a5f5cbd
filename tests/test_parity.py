"""Our ViT against transformers' Dinov2Model / Dinov2WithRegistersModel on the same random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_to_original, hub_state_dict, random_hf_model, save_hf
from safetensors.torch import save_file

from dinoseek.model import load_vit

SIZES = [(224, 224), (196, 310), (98, 98)]  # native grid, non-square not a multiple of 14, no resampling


def reference_hidden(ref, pixel_values):
    with torch.no_grad():
        return ref(pixel_values=pixel_values).last_hidden_state


def max_diff(ours, ref, pixel_values) -> float:
    with torch.no_grad():
        return (ours(pixel_values) - reference_hidden(ref, pixel_values)).abs().max().item()


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "registers"])
@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_tiny_families_match_reference(tmp_path, registers, swiglu):
    ref = random_hf_model(registers=registers, swiglu=swiglu)
    ours = load_vit(save_hf(ref, tmp_path))
    assert ours.config.num_registers == (4 if registers else 0)
    assert ours.config.ffn == ("swiglu" if swiglu else "mlp")
    torch.manual_seed(0)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        out = ours(x)
        assert out.shape == reference_hidden(ref, x).shape
        assert max_diff(ours, ref, x) <= 1e-4, (h, w)


@pytest.mark.slow
def test_full_size_small_matches_reference(small_folder):
    from transformers import Dinov2Model

    ref = Dinov2Model.from_pretrained(small_folder).eval()
    ours = load_vit(small_folder)
    assert (ours.config.embed_dim, ours.config.depth, ours.config.num_heads) == (384, 12, 6)
    torch.manual_seed(0)
    for h, w in SIZES[:2]:
        x = torch.randn(2, 3, h, w)
        assert max_diff(ours, ref, x) <= 1e-4, (h, w)


@pytest.mark.parametrize("chunks", [0, 2], ids=["flat", "chunked"])
@pytest.mark.parametrize("registers,swiglu", [(False, False), (True, True)], ids=["plain", "reg-swiglu"])
def test_original_pth_layout_loads_identically(tmp_path, registers, swiglu, chunks):
    ref = random_hf_model(registers=registers, swiglu=swiglu, layers=4)
    hf_folder = save_hf(ref, tmp_path / "hf")
    pth = tmp_path / "dinov2_vits14.pth"
    torch.save(hf_to_original(hub_state_dict(hf_folder), chunks=chunks), pth)
    from_hf, from_pth = load_vit(hf_folder), load_vit(pth)
    assert from_pth.config == from_hf.config  # architecture inferred from tensors alone
    x = torch.randn(2, 3, 196, 310)
    with torch.no_grad():
        assert torch.equal(from_pth(x), from_hf(x))


def test_teacher_wrapped_training_checkpoint(tmp_path):
    ref = random_hf_model()
    original = hf_to_original(hub_state_dict(save_hf(ref, tmp_path / "hf")))
    path = tmp_path / "train.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in original.items()}}, path)
    x = torch.randn(1, 3, 224, 224)
    assert max_diff(load_vit(path), ref, x) <= 1e-4


def test_single_safetensors_file_without_config(tmp_path):
    ref = random_hf_model(registers=True)
    single = tmp_path / "weights.safetensors"
    save_file(hub_state_dict(save_hf(ref, tmp_path / "hf")), single)
    x = torch.randn(1, 3, 224, 224)
    assert max_diff(load_vit(single), ref, x) <= 1e-4


def test_sharded_folder(tmp_path):
    ref = random_hf_model(layers=3)
    folder = save_hf(ref, tmp_path, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    x = torch.randn(1, 3, 224, 224)
    assert max_diff(load_vit(folder), ref, x) <= 1e-4


def test_half_precision_checkpoint_and_dtype_argument(tmp_path):
    ref = random_hf_model()
    folder = save_hf(ref.half(), tmp_path)
    ours = load_vit(folder, dtype=torch.bfloat16)
    assert ours.norm.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, 224, 224)
    assert ours(x).dtype == torch.bfloat16
    assert max_diff(load_vit(folder), ref.float(), x) <= 1e-4
