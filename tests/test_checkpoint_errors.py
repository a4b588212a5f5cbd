"""Wrong, partial or unsafe weight files give errors that name the problem."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import hf_to_original, hub_state_dict, random_hf_model, save_hf
from safetensors.torch import save_file

from dinoseek.model import CheckpointError, ViTConfig, load_vit


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = save_hf(random_hf_model(), tmp_path_factory.mktemp("hf"))
    return hf_to_original(hub_state_dict(folder))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="weights not found"):
        load_vit(tmp_path / "nope.pth")


def test_missing_keys_are_named(tmp_path, original):
    state = {k: v for k, v in original.items() if not k.startswith("blocks.1.mlp.fc2")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.mlp\.fc2\.bias, blocks\.1\.mlp\.fc2\.weight"):
        load_vit(tmp_path / "partial.pth")


def test_unexpected_keys_are_named(tmp_path, original):
    torch.save({**original, "blocks.0.attn.extra.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.0\.attn\.extra\.weight"):
        load_vit(tmp_path / "extra.pth")


def test_shape_mismatch_is_named(tmp_path, original):
    config = ViTConfig(embed_dim=128, depth=2, num_heads=2, mlp_hidden=256, pos_grid=7)  # wrong MLP width
    torch.save(original, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch: blocks\.0\.mlp\.fc1\.weight \(512, 128\) != \(256, 128\)"):
        load_vit(tmp_path / "w.pth", config=config)


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_vit(path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_vit(path)


def test_not_a_dinov2_checkpoint(tmp_path):
    save_file({"weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a DINOv2 checkpoint: missing cls_token"):
        load_vit(tmp_path / "other.safetensors")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_vit(tmp_path)


def test_missing_shard(tmp_path):
    folder = save_hf(random_hf_model(layers=3), tmp_path, max_shard_size="200KB")
    next(folder.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shards listed in the index are missing"):
        load_vit(folder)


def test_other_model_type_config(tmp_path):
    folder = save_hf(random_hf_model(), tmp_path)
    config = (folder / "config.json").read_text().replace('"dinov2"', '"vit"')
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="'vit' model, not DINOv2"):
        load_vit(folder)
