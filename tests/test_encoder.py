"""Encoder vectors against the reference's last_hidden_state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_hf_model, save_hf, synthetic_photo

from dinoseek.model import Encoder, preprocess


@pytest.fixture(scope="module")
def registers_model(tmp_path_factory):
    ref = random_hf_model(registers=True, swiglu=False, layers=3)
    return ref, save_hf(ref, tmp_path_factory.mktemp("reg"))


def test_cls_and_patch_vectors_match_reference(registers_model, photos):
    ref, folder = registers_model
    encoder = Encoder.from_pretrained(folder, precision="fp32")
    out = encoder.embed(photos, return_tokens=True)
    with torch.no_grad():
        hidden = ref(pixel_values=preprocess(photos)).last_hidden_state  # (B, 1 + 4 + 256, D)
    cls = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    tokens = hidden[:, 5:]  # registers excluded
    patch = torch.nn.functional.normalize(tokens.mean(1), dim=-1).numpy()
    assert out.cls.shape == out.patch.shape == (len(photos), 128)
    assert out.cls.dtype == out.patch.dtype == np.float32
    assert np.abs(out.cls - cls).max() <= 1e-4
    assert np.abs(out.patch - patch).max() <= 1e-4
    assert np.allclose(np.linalg.norm(out.cls, axis=1), 1, atol=1e-5)
    assert out.tokens.shape == (len(photos), 256, 128)
    assert np.abs(out.tokens - tokens.numpy()).max() <= 1e-4


def test_inputs_pil_tensor_and_single_image_agree(tiny_folder, photos):
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32")
    from_pil = encoder.embed(photos[:3])
    from_tensor = encoder.embed(preprocess(photos[:3]))
    from_list = encoder.embed(list(preprocess(photos[:3])))
    single = encoder.embed(photos[1])
    assert from_pil.tokens is None
    np.testing.assert_allclose(from_pil.cls, from_tensor.cls, atol=1e-6)
    np.testing.assert_allclose(from_pil.cls, from_list.cls, atol=1e-6)
    np.testing.assert_allclose(single.cls[0], from_pil.cls[1], atol=1e-5)  # batch-independent


def test_full_mode_embeds_whole_frame(tiny_folder):
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32", mode="full", size=336)
    out = encoder.embed([synthetic_photo(900, 300, seed=1)], return_tokens=True)
    assert out.tokens.shape == (1, 24 * 24, 128)


def test_similar_images_embed_closer_than_different_ones(small_folder):
    encoder = Encoder.from_pretrained(small_folder, precision="fp32")
    a = synthetic_photo(500, 400, seed=11)
    near = a.resize((450, 360)).rotate(2)
    other = synthetic_photo(500, 400, seed=12)
    v = encoder.embed([a, near, other]).cls
    assert v[0] @ v[1] > v[0] @ v[2]


def test_manifest_records_model_identity(tiny_folder):
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32")
    manifest = encoder.manifest()
    assert manifest["dim"] == 128 and manifest["precision"] == "fp32"
    assert manifest["arch"]["depth"] == 2
    assert manifest["preprocess"] == {"mode": "crop", "size": 224}
    import hashlib

    assert manifest["weights_sha256"] == hashlib.sha256((tiny_folder / "model.safetensors").read_bytes()).hexdigest()


def test_bad_full_size_is_rejected_before_loading(tiny_folder):
    with pytest.raises(ValueError, match="multiple of 14"):
        Encoder.from_pretrained(tiny_folder, mode="full", size=300)


def test_fingerprint_comes_from_the_loader_or_the_tensors(tiny_folder):
    import hashlib

    from dinoseek.model import build_vit, load_weights
    from dinoseek.model.fingerprint import tensors_sha256

    files_sha = hashlib.sha256((tiny_folder / "model.safetensors").read_bytes()).hexdigest()
    assert Encoder.from_weights(load_weights(tiny_folder), precision="fp32").weights_sha256 == files_sha
    # A model built in memory has no files: its tensors are its fingerprint (never the sha of nothing).
    vit = load_weights(tiny_folder).vit
    in_memory = Encoder(vit, precision="fp32").weights_sha256
    assert in_memory not in (files_sha, hashlib.sha256(b"").hexdigest())
    assert in_memory == tensors_sha256(load_weights(tiny_folder).vit)  # same weights, same fingerprint
    torch.manual_seed(0)
    other = Encoder(build_vit(vit.config), precision="fp32").weights_sha256
    assert other != in_memory
    # Taken before precision changes the tensors: int8 of the same weights is the same model.
    assert Encoder(load_weights(tiny_folder).vit, precision="int8").weights_sha256 == in_memory
    assert Encoder(vit, precision="fp32", fingerprint="abc").weights_sha256 == "abc"


def test_encoder_is_an_embedder(tiny_folder):
    from dinoseek.model import Embedder

    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32")
    assert isinstance(encoder, Embedder)
    photos = [synthetic_photo(300, 200, seed=i) for i in range(2)]
    pixels = np.stack([encoder.input_spec.pixels(photo) for photo in photos])
    np.testing.assert_allclose(encoder.embed_pixels(pixels).cls, encoder.embed(photos).cls, atol=1e-6)
    with pytest.raises(ValueError, match=r"pixels must be \(B, 224, 224, 3\) uint8"):
        encoder.embed_pixels(pixels[:, :100])
