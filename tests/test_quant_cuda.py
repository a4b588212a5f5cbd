"""int4 / int8 weights through packed kernels: tinygemm's layout and the per-layer kernel choice,
checked on the CPU with torch's CPU build of the same kernel, then on CUDA (`gpu` tests)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from test_precision import MIN_COSINE, PHOTOS

from dinoseek.model import Encoder, ViTConfig, build_vit, load_vit, quant
from dinoseek.model.precision import apply_precision, compute_dtype
from dinoseek.model.quant import Int4Linear, Int8Linear, relative_error

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_int4_layer(out_features: int = 96, in_features: int = 256, group_size: int = 64, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
    """Random codes, scales and zeros, so that every nibble and group matters."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8)
    scale = torch.rand(out_features, groups, generator=g) * 0.02 + 0.005
    zero = torch.randn(out_features, groups, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g)
    return Int4Linear(codes, scale, zero, bias, group_size, dtype)


def counting(kernel: quant.Int4Kernel, calls: dict) -> quant.Int4Kernel:
    """`kernel` with its convert and mm calls counted in `calls`."""

    def convert(*args):
        calls["convert"] = calls.get("convert", 0) + 1
        return kernel.convert(*args)

    def mm(*args):
        calls["mm"] = calls.get("mm", 0) + 1
        return kernel.mm(*args)

    return dataclasses.replace(kernel, convert=convert, mm=mm)


@pytest.fixture(autouse=True)
def kernel_whenever_correct(monkeypatch):
    """These tests check the kernel itself: it is kept whenever it is correct, however fast."""
    monkeypatch.setattr(quant, "INT4_CHOICE", "kernel")


def test_int4_layers_keep_the_kernel_only_where_it_is_faster(monkeypatch, caplog):
    monkeypatch.setattr(quant, "INT4_CHOICE", "fastest")
    monkeypatch.setattr(quant, "_logged", set())
    monkeypatch.setitem(quant.INT4_KERNELS, "cpu", quant.TINYGEMM_CPU)
    monkeypatch.setattr(quant, "INT4_TIMING_ROWS", 4)
    few = random_int4_layer(seed=3)
    few(torch.randn(3, 256, dtype=torch.bfloat16))
    assert few.kernel is None  # too few rows to decide on: dequantized, decided later
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    timings = iter([3.0, 1.0, 1.0, 2.0])  # (kernel, dequantize) ms for the first layer, then the second
    monkeypatch.setattr(quant, "_milliseconds", lambda fn, device: next(timings))
    slow, fast = random_int4_layer(seed=1), random_int4_layer(seed=2)
    with caplog.at_level(logging.INFO, logger="dinoseek.model.quant"):
        y = slow(x)
        fast(x)
    assert slow.kernel == "dequantize" and "it is slower at 4 rows (3 ms vs 1 ms)" in caplog.text
    torch.testing.assert_close(y, F.linear(x, slow.dequantized(torch.bfloat16), slow.bias))
    assert fast.kernel == "tinygemm"


@pytest.fixture
def cpu_tinygemm(monkeypatch):
    """Install torch's CPU tinygemm as the CPU int4 kernel; returns its call counts."""
    calls: dict[str, int] = {}
    monkeypatch.setitem(quant.INT4_KERNELS, "cpu", counting(quant.TINYGEMM_CPU, calls))
    return calls


def dequantized_linear(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.dequantized(torch.float32), layer.bias.float())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_tinygemm_layout_matches_the_dequantized_gemm(group_size):
    layer = random_int4_layer(group_size=group_size)
    x = torch.randn(37, layer.in_features, dtype=torch.bfloat16)
    weight, scales_and_zeros = quant.TINYGEMM_CPU.prepare(layer)
    y = quant.TINYGEMM_CPU.mm(x, weight, group_size, scales_and_zeros).float() + layer.bias.float()
    assert relative_error(y, dequantized_linear(layer, x)) < 0.01


def test_tinygemm_layout_check_notices_a_wrong_nibble_order():
    # The check above could fail: the stored (low nibble first) bytes read as high nibble first are wrong.
    layer = random_int4_layer()
    x = torch.randn(37, layer.in_features, dtype=torch.bfloat16)
    unswapped = dataclasses.replace(quant.TINYGEMM_CPU, convert=lambda data, tiles: quant.TINYGEMM_CPU.convert(
        quant.tinygemm_bytes(data), tiles))  # undoes the swap prepare() makes
    weight, scales_and_zeros = unswapped.prepare(layer)
    y = unswapped.mm(x, weight, layer.group_size, scales_and_zeros).float() + layer.bias.float()
    assert relative_error(y, dequantized_linear(layer, x)) > 0.3


def test_int4_layer_takes_the_kernel_once_and_keeps_its_copy(cpu_tinygemm):
    layer = random_int4_layer()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 19, layer.in_features, dtype=torch.bfloat16)
    first = layer(x)
    assert layer.kernel == "tinygemm" and cpu_tinygemm == {"convert": 1, "mm": 1}
    second = layer(x)
    assert cpu_tinygemm == {"convert": 1, "mm": 2}
    assert torch.equal(first, second) and first.shape == (2, 19, layer.out_features) and first.dtype == torch.bfloat16
    assert relative_error(first, dequantized_linear(layer, x)) < 0.01
    # The stored format is untouched: same state dict keys and values, no extra buffers.
    assert set(layer.state_dict()) == {"packed", "scale", "zero", "bias"}
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())


def test_int4_kernel_is_not_used_for_float32_inputs(cpu_tinygemm):
    layer = random_int4_layer(dtype=torch.float32)
    x = torch.randn(5, layer.in_features)
    assert torch.equal(layer(x), F.linear(x, layer.dequantized(torch.float32), layer.bias))
    assert layer.kernel is None and cpu_tinygemm == {}


def test_int4_kernel_falls_back_once_logged_when_the_op_raises(monkeypatch, caplog):
    monkeypatch.setattr(quant, "_logged", set())
    def broken(*_):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(quant.INT4_KERNELS, "cpu", dataclasses.replace(quant.TINYGEMM_CPU, name="broken-kernel", mm=broken))
    layers = [random_int4_layer(seed=1), random_int4_layer(seed=2)]
    x = torch.randn(7, 256, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="dinoseek.model.quant"):
        outputs = [layer(x) for layer in layers] + [layers[0](x)]
    assert [layer.kernel for layer in layers] == ["dequantize", "dequantize"]
    for layer, y in zip(layers + layers[:1], outputs):
        assert torch.equal(y, F.linear(x, layer.dequantized(torch.bfloat16), layer.bias))
    warnings = [r.getMessage() for r in caplog.records if "broken-kernel" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: no kernel image" in warnings[0]


def test_int4_kernel_falls_back_when_its_result_disagrees(monkeypatch, caplog):
    monkeypatch.setattr(quant, "_logged", set())
    wrong_zero = dataclasses.replace(quant.TINYGEMM_CPU, name="wrong-zero-kernel",
                                     mm=lambda x, w, g, sz: quant.TINYGEMM_CPU.mm(x, w, g, sz * torch.tensor([1.0, -1.0]).to(sz)))
    monkeypatch.setitem(quant.INT4_KERNELS, "cpu", wrong_zero)
    layer = random_int4_layer()
    x = torch.randn(7, 256, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="dinoseek.model.quant"):
        y = layer(x)
    assert layer.kernel == "dequantize"
    assert torch.equal(y, F.linear(x, layer.dequantized(torch.bfloat16), layer.bias))
    assert any("wrong-zero-kernel" in r.getMessage() and "differs" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("out_features,in_features,group_size", [(8, 256, 64), (96, 256, 16)])
def test_int4_kernel_skips_shapes_it_cannot_take(cpu_tinygemm, out_features, in_features, group_size):
    layer = random_int4_layer(out_features, in_features, group_size)
    x = torch.randn(3, in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.dequantized(torch.bfloat16), layer.bias))
    assert layer.kernel == "dequantize" and cpu_tinygemm == {}


def test_int4_kernel_splits_inputs_over_its_row_limit(cpu_tinygemm, monkeypatch):
    monkeypatch.setattr(quant, "INT4_KERNEL_MAX_ROWS", 16)
    layer = random_int4_layer()
    x = torch.randn(50, layer.in_features, dtype=torch.bfloat16)
    y = layer(x)
    assert cpu_tinygemm["mm"] == 4 and y.shape == (50, layer.out_features)  # ceil(50 / 16) launches
    assert relative_error(y, dequantized_linear(layer, x)) < 0.01


def test_moving_or_loading_an_int4_layer_drops_the_kernel_copy(cpu_tinygemm):
    layer = random_int4_layer()
    x = torch.randn(4, layer.in_features, dtype=torch.bfloat16)
    layer(x)
    layer.to(torch.float16)
    assert layer.kernel is None and layer._kernel_weights is None
    layer(x.half())
    other = random_int4_layer(seed=9)
    layer.load_state_dict(other.state_dict())
    assert layer.kernel is None
    assert relative_error(layer(x.half()), dequantized_linear(other, x)) < 0.01  # converted again from the new codes
    assert cpu_tinygemm["convert"] == 3


def test_int4_model_through_the_kernel_matches_dequantize(cpu_tinygemm, monkeypatch):
    """A whole GPTQ-calibrated ViT in bf16: every linear layer through the kernel, same tokens."""
    torch.manual_seed(0)
    config = ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden=256, pos_grid=4)
    vit = apply_precision(build_vit(config), "int4", torch.device("cpu"), torch.randn(4, 3, 56, 56)).to(torch.bfloat16)
    pixels = torch.randn(3, 3, 56, 56, dtype=torch.bfloat16)
    with torch.inference_mode():
        through_kernel = vit(pixels)
        layers = [m for m in vit.modules() if isinstance(m, Int4Linear)]
        assert len(layers) == 8 and all(m.kernel == "tinygemm" for m in layers)
        monkeypatch.delitem(quant.INT4_KERNELS, "cpu")
        for m in layers:
            m._forget_kernel()
        reference = vit(pixels)
    assert all(m.kernel is None for m in layers)  # the reference really is dequantize + GEMM
    assert relative_error(through_kernel, reference) < 0.02


def test_int4_computes_in_bf16_on_ampere_or_newer(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert compute_dtype("int4", cuda) == torch.bfloat16
    assert compute_dtype("int8", cuda) == torch.float16  # cuBLAS takes fp16 at the same speed, more mantissa
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert compute_dtype("int4", cuda) == torch.float16  # no tinygemm before sm80: dequantize in fp16


def test_int8_layers_say_they_dequantize():
    assert Int8Linear(torch.nn.Linear(32, 16), torch.float32).kernel == "dequantize"


# ---- on a GPU -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_fp32_vectors(small_folder):
    return Encoder(load_vit(small_folder), precision="fp32").embed(PHOTOS)


@pytest.fixture(scope="module")
def cuda_int4_encoder(small_folder):
    return Encoder(load_vit(small_folder), device="cuda", precision="int4")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cuda_quantized_vectors_keep_the_cpu_fidelity_floors(small_folder, cpu_fp32_vectors, cuda_int4_encoder, precision):
    encoder = cuda_int4_encoder if precision == "int4" else Encoder(load_vit(small_folder), device="cuda", precision="int8")
    out = encoder.embed(PHOTOS)
    for kind in ("cls", "patch"):
        cosine = (getattr(out, kind) * getattr(cpu_fp32_vectors, kind)).sum(axis=1)
        assert cosine.min() >= MIN_COSINE[precision], (kind, cosine)
    layer_type, kernel = (Int4Linear, "tinygemm") if precision == "int4" else (Int8Linear, "dequantize")
    kernels = {m.kernel for m in encoder.vit.modules() if isinstance(m, layer_type)}
    assert kernels == {kernel}, kernels


@pytest.mark.gpu
@needs_cuda
def test_cuda_int4_runs_tinygemm_in_bf16(cuda_int4_encoder):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs sm80 or newer")
    cuda_int4_encoder.embed(PHOTOS[:2])
    assert cuda_int4_encoder.dtype == torch.bfloat16  # the kernel's own dtype: no casts around each layer
    kernels = [m.kernel for m in cuda_int4_encoder.vit.modules() if isinstance(m, Int4Linear)]
    assert kernels == ["tinygemm"] * 48  # every linear layer of ViT-S


@pytest.mark.gpu
@needs_cuda
def test_cuda_tinygemm_matches_the_dequantized_gemm_per_layer(cuda_int4_encoder, monkeypatch):
    calls: dict[str, int] = {}
    monkeypatch.setitem(quant.INT4_KERNELS, "cuda", counting(quant.TINYGEMM_CUDA, calls))
    torch.manual_seed(0)
    layers = [(name, m) for name, m in cuda_int4_encoder.vit.named_modules() if isinstance(m, Int4Linear)]
    for name, layer in layers:
        x = torch.randn(3, 257, layer.in_features, device="cuda", dtype=torch.bfloat16)  # 771 rows: not a tile multiple
        with torch.inference_mode():
            y = layer(x)
        assert layer.kernel == "tinygemm", name
        reference = F.linear(x.float(), layer.dequantized(torch.float32), layer.bias.float())
        assert relative_error(y, reference) < 0.01, name
    assert calls["mm"] == len(layers)  # the kernel really ran, once per layer


@pytest.mark.gpu
@needs_cuda
def test_cuda_tinygemm_takes_more_rows_than_one_launch():
    layer = random_int4_layer(out_features=64, in_features=128, group_size=128).cuda()
    x = torch.randn(quant.INT4_KERNEL_MAX_ROWS + 100, 128, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        y = layer(x)
    assert layer.kernel == "tinygemm"
    reference = F.linear(x.float(), layer.dequantized(torch.float32), layer.bias.float())
    assert relative_error(y, reference) < 0.01


@pytest.mark.gpu
@needs_cuda
def test_cuda_int4_calibration_runs_on_the_gpu(tiny_folder, monkeypatch):
    from dinoseek.model import gptq

    devices = set()
    real = gptq.gptq_int4

    def recording(weight, hessian, group_size, *args, **kwargs):
        devices.update({weight.device.type, hessian.device.type})
        return real(weight, hessian, group_size, *args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_int4", recording)
    Encoder(load_vit(tiny_folder), device="cuda", precision="int4")
    assert devices == {"cuda"}
