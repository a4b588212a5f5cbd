"""Reduced precisions against fp32 on full-size ViT-S/14 with random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_photo

from dinoseek.model import Encoder, PrecisionError, build_vit, load_vit
from dinoseek.model.quant import Int4Linear, Int8Linear, quantize_linears, weight_bytes

# Held-out photos: other seeds and sizes than the built-in int4 calibration set.
PHOTOS = [synthetic_photo(300 + 37 * i, 260 + 23 * i, seed=500 + i) for i in range(6)]
MIN_COSINE = {"fp16": 0.999, "bf16": 0.999, "int8": 0.99, "int4": 0.97}


@pytest.fixture(scope="module")
def fp32_vectors(small_folder):
    return Encoder(load_vit(small_folder), precision="fp32").embed(PHOTOS)


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(MIN_COSINE))
def test_cosine_to_fp32(small_folder, fp32_vectors, precision):
    out = Encoder(load_vit(small_folder), precision=precision).embed(PHOTOS)
    for kind in ("cls", "patch"):
        cosine = (getattr(out, kind) * getattr(fp32_vectors, kind)).sum(axis=1)
        assert cosine.min() >= MIN_COSINE[precision], (kind, cosine)
    # Guard against a trivially easy check: the photos must not all embed alike.
    off_diagonal = fp32_vectors.cls @ fp32_vectors.cls.T
    assert off_diagonal[~torch.eye(len(PHOTOS), dtype=torch.bool).numpy()].min() < 0.95


@pytest.mark.slow
def test_int4_weights_are_under_a_third_of_fp16(small_folder):
    fp16 = weight_bytes(Encoder(load_vit(small_folder), precision="bf16").vit)  # same bytes as fp16
    int4 = weight_bytes(Encoder(load_vit(small_folder), precision="int4").vit)
    int8 = weight_bytes(Encoder(load_vit(small_folder), precision="int8").vit)
    assert int4 <= 0.3 * fp16
    assert int8 <= 0.55 * fp16


def test_quantized_linear_dequantizes_to_the_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(5, 7, 256)
    for layer, tolerance in ((Int8Linear(linear, torch.float32), 0.01), (Int4Linear.round_to_nearest(linear, torch.float32, 128), 0.2)):
        w = layer.dequantized(torch.float32)
        assert (w - linear.weight).abs().max() <= tolerance * linear.weight.abs().max()
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, w, linear.bias), atol=1e-5)
        assert layer(x).shape == (5, 7, 96)


def test_int4_group_size_falls_back_for_narrow_layers():
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 8))
    assert quantize_linears(model, bits=4, compute_dtype=torch.float32) == 1  # 8 inputs: no group fits
    assert isinstance(model[0], Int4Linear) and model[0].group_size == 64
    assert isinstance(model[1], torch.nn.Linear)


def test_auto_precision_on_cpu():
    from dinoseek.model.precision import cpu_has_native_bf16

    encoder = Encoder(build_vit(_tiny_config()), precision="auto")
    assert encoder.precision == ("bf16" if cpu_has_native_bf16() else "fp32")


@pytest.mark.parametrize(
    "device,precision,message",
    [("cpu", "fp8", "unknown precision"), ("cuda", "fp16", "CUDA is not available"), ("mps", "fp32", "MPS is not available"), ("tpu", "fp32", "not supported")],
)
def test_unsupported_precision_or_device(device, precision, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(PrecisionError, match=message):
        Encoder(build_vit(_tiny_config()), device=device, precision=precision)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "int4"])
def test_cuda_precisions_match_cpu_fp32(small_folder, fp32_vectors, precision):
    out = Encoder(load_vit(small_folder), device="cuda", precision=precision).embed(PHOTOS)
    assert (out.cls * fp32_vectors.cls).sum(axis=1).min() >= MIN_COSINE[precision]


def _tiny_config():
    from dinoseek.model import ViTConfig

    return ViTConfig(embed_dim=64, depth=1, num_heads=1, mlp_hidden=128, pos_grid=4)
