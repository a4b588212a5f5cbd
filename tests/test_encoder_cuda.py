"""The compiled encoder (model/compiled.py): its machinery on the CPU, with Dynamo's "eager"
backend standing in for inductor; its numerics and speed-ups on a GPU (`gpu` mark)."""

from __future__ import annotations

import copy
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import random_hf_model, save_hf, synthetic_photo
from dinoseek.model import (
    Encoder,
    InvalidArgumentError,
    ViTConfig,
    build_vit,
    check_settings,
    compiled,
    load_vit,
    preprocess,
)
from dinoseek.model.compiled import CompiledViT, bucket_for

PHOTOS = [synthetic_photo(300 + 37 * i, 260 + 23 * i, seed=700 + i) for i in range(6)]


@pytest.fixture(autouse=True)
def compiling_works(monkeypatch):
    """Each test starts in a process where compiling has not failed yet (the flag is per process)."""
    monkeypatch.setattr(compiled, "_failure", None)


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    vit = build_vit(ViTConfig(embed_dim=64, depth=3, num_heads=1, mlp_hidden=128, pos_grid=4))
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.2)
    return vit.eval().requires_grad_(False)


def pixels(batch: int, seed: int = 0, side: int = 56) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def eager(vit, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vit(x)


# --- CPU: the machinery -------------------------------------------------------------------------

def test_auto_compile_on_cpu_is_the_eager_model(tiny_folder):
    auto = Encoder.from_pretrained(tiny_folder, precision="fp32")
    off = Encoder.from_pretrained(tiny_folder, precision="fp32", compile=False)
    assert auto.compiled is False and auto._compiled_vit is None  # nothing compiled, nothing to fall back from
    x = preprocess(PHOTOS[:3])
    with torch.inference_mode():
        assert torch.equal(auto.hidden_states(x), auto.vit(x))
    a, b = auto.embed(PHOTOS[:3]), off.embed(PHOTOS[:3])
    assert np.array_equal(a.cls, b.cls) and np.array_equal(a.patch, b.patch)


def test_bucket_is_the_smallest_compiled_one_that_fits_or_a_new_multiple_of_8():
    assert bucket_for(1, []) == 8
    assert bucket_for(200, []) == 200
    assert bucket_for(201, []) == 208
    assert bucket_for(37, [128]) == 128  # an indexing run's last batch: padded, not compiled anew
    assert bucket_for(100, [8, 128, 256]) == 128
    assert bucket_for(300, [8, 128, 256]) == 304
    assert bucket_for(300, list(range(8, 72, 8)), max_buckets=8) is None  # full: run eagerly


def test_padded_rows_change_nothing(tiny_vit):
    runner = CompiledViT(tiny_vit, backend="eager")
    x = pixels(8)
    full = runner(x)  # bucket 8: eight real images
    padded = runner(x[:5])  # the same bucket: five images and three rows of zeros
    assert runner.buckets == [8]
    assert padded.shape[0] == 5
    assert torch.equal(padded, full[:5])
    torch.testing.assert_close(padded, eager(tiny_vit, x[:5]), atol=1e-5, rtol=1e-5)


def test_blocks_share_one_graph_and_batches_within_a_bucket_do_not_recompile(tiny_vit):
    runner = CompiledViT(tiny_vit, backend="eager")
    runner(pixels(8))
    assert runner.graphs_compiled == 1  # three blocks, one compiled graph
    for batch in (5, 1, 7, 8):
        runner(pixels(batch, seed=batch))
    assert runner.graphs_compiled == 1
    runner(pixels(12))  # a new bucket (16): one more graph, then none
    runner(pixels(16))
    runner(pixels(9))
    assert runner.buckets == [8, 16] and runner.graphs_compiled == 2


def test_batches_under_the_minimum_run_eagerly(tiny_vit):
    runner = CompiledViT(tiny_vit, backend="eager", min_batch=16)
    x = pixels(4)
    assert torch.equal(runner(x), eager(tiny_vit, x))
    assert runner.buckets == [] and runner.graphs_compiled == 0
    runner(pixels(16))
    assert runner.buckets == [16]


def test_compile_true_on_cpu_matches_eager(tiny_folder, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    on = Encoder.from_pretrained(tiny_folder, precision="fp32", compile=True)
    off = Encoder.from_pretrained(tiny_folder, precision="fp32", compile=False)
    assert on.compiled
    a, b = on.embed(PHOTOS), off.embed(PHOTOS)
    np.testing.assert_allclose(a.cls, b.cls, atol=1e-5)
    np.testing.assert_allclose(a.patch, b.patch, atol=1e-5)
    assert on._compiled_vit.buckets == [8]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_inductor_compiles_the_cpu_path(tiny_vit):
    """The CPU layers call oneDNN's fused ops, which inductor cannot lower; compiled, they must
    give way to plain ops (and Dynamo must trace them without a graph break)."""
    runner = CompiledViT(tiny_vit)
    x = pixels(8)
    out = runner(x)
    assert runner.active, compiled.compile_failure()
    assert runner.graphs_compiled == 1
    torch.testing.assert_close(out, eager(tiny_vit, x), atol=1e-4, rtol=1e-4)


def test_compile_failure_falls_back_to_eager_with_one_warning(tiny_folder, monkeypatch, caplog):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32", compile=True)
    reference = Encoder.from_pretrained(tiny_folder, precision="fp32", compile=False).embed(PHOTOS)
    with caplog.at_level(logging.WARNING, logger="dinoseek.model.compiled"):
        first, second = encoder.embed(PHOTOS), encoder.embed(PHOTOS[:2])
        Encoder.from_pretrained(tiny_folder, precision="fp32", compile=True).embed(PHOTOS)  # not tried again
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no Triton here" in warnings[0].getMessage()
    assert compiled.compile_failure() == "RuntimeError: no Triton here"
    assert np.array_equal(first.cls, reference.cls) and np.array_equal(first.patch, reference.patch)
    assert np.array_equal(second.cls, reference.cls[:2])


def test_backend_failure_at_first_batch_falls_back(tiny_vit, monkeypatch, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("inductor refused an op")

    runner = CompiledViT(tiny_vit, backend=broken_backend)
    x = pixels(3)
    with caplog.at_level(logging.WARNING, logger="dinoseek.model.compiled"):
        out = runner(x)
    assert torch.equal(out, eager(tiny_vit, x))
    assert not runner.active and "inductor refused an op" in caplog.text


def test_bad_pixels_are_the_callers_error_not_a_compile_failure(tiny_vit):
    runner = CompiledViT(tiny_vit, backend="eager")
    with pytest.raises(InvalidArgumentError, match="pixel_values must be"):
        runner(torch.zeros(2, 4, 56, 56))
    assert runner.active


@pytest.mark.parametrize("value", ["yes", 1, None, "on"])
def test_compile_setting_is_checked(tiny_folder, value):
    with pytest.raises(InvalidArgumentError, match="compile must be 'auto', True or False"):
        check_settings(compile=value)
    with pytest.raises(InvalidArgumentError, match="compile must be"):
        Encoder.from_pretrained(tiny_folder, precision="fp32", compile=value)


def test_quantized_models_run_eagerly(tiny_folder):
    assert Encoder.from_pretrained(tiny_folder, precision="int8", compile=True).compiled is False


# --- GPU: numerics, graphs, kernels -------------------------------------------------------------

MIN_COSINE_FP32 = {"fp16": 0.999, "bf16": 0.999}  # the floors of test_precision's CUDA test
# Compiled vs eager, same precision. bf16 keeps 8 bits of mantissa: two orders of rounding
# (fused or not) differ by ~1e-4 in cosine already on a CPU (0.99992 measured), fp16 by ~1e-6.
MIN_COSINE_EAGER = {"fp16": 0.9999, "bf16": 0.9995}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def reference_vectors(model, pixel_values: torch.Tensor, device="cpu", dtype=torch.float32):
    """transformers' CLS and mean-patch vectors (no registers in these models)."""
    model = model.to(device=device, dtype=dtype)
    with torch.inference_mode():
        hidden = model(pixel_values=pixel_values.to(device, dtype)).last_hidden_state.float().cpu()
    return hidden[:, 0].numpy(), hidden[:, 1:].mean(1).numpy()


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    """Full-size ViT-S/14 (random weights) as transformers runs it with SDPA, and its folder."""
    model = random_hf_model(hidden=384, layers=12, heads=6, image_size=518, seed=3)
    model.config._attn_implementation = "sdpa"
    return model, save_hf(model, tmp_path_factory.mktemp("small-sdpa"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_compiled_matches_transformers(small_reference, precision):
    model, folder = small_reference
    x = preprocess(PHOTOS)
    fp32_cls, fp32_patch = reference_vectors(model, x)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    half_cls, half_patch = reference_vectors(copy.deepcopy(model), x, "cuda", half)  # transformers, SDPA on the GPU
    encoder = Encoder(load_vit(folder), device="cuda", precision=precision, compile=True)
    eager_out = Encoder(load_vit(folder), device="cuda", precision=precision, compile=False).embed(x)
    out = encoder.embed(x)
    assert encoder._compiled_vit.active, compiled.compile_failure()
    assert encoder._compiled_vit.buckets == [8]
    for ours, eager_vec, fp32, ref_half in ((out.cls, eager_out.cls, fp32_cls, half_cls),
                                            (out.patch, eager_out.patch, fp32_patch, half_patch)):
        assert cosines(ours, fp32).min() >= MIN_COSINE_FP32[precision]
        assert cosines(ours, ref_half).min() >= MIN_COSINE_FP32[precision]
        assert cosines(ours, eager_vec).min() >= MIN_COSINE_EAGER[precision]
    assert encoder._compiled_vit.compile_seconds < 60


@pytest.fixture(scope="module")
def cuda_pair(small_folder):
    """The same ViT-S/14 fp16 weights on the GPU, compiled (every batch) and eager."""
    compiled_encoder = Encoder(load_vit(small_folder), device="cuda", precision="fp16", compile=True)
    return compiled_encoder, Encoder(load_vit(small_folder), device="cuda", precision="fp16", compile=False)


def cuda_pixels(batch: int, seed: int) -> torch.Tensor:
    return pixels(batch, seed, side=224).to("cuda", torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_sizes_give_the_eager_vectors(cuda_pair):
    compiled_encoder, eager_encoder = cuda_pair
    for batch in (1, 7, 256):
        x = cuda_pixels(batch, seed=batch)
        with torch.inference_mode():
            ours = compiled_encoder.hidden_states(x)[:, 0].float().cpu().numpy()
            reference = eager_encoder.hidden_states(x)[:, 0].float().cpu().numpy()
        assert ours.shape == reference.shape == (batch, 384)
        assert cosines(ours, reference).min() >= MIN_COSINE_EAGER["fp16"], batch
    assert compiled_encoder._compiled_vit.active, compiled.compile_failure()
    assert compiled_encoder._compiled_vit.buckets == [8, 256]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_within_a_bucket_do_not_recompile(cuda_pair):
    runner = cuda_pair[0]._compiled_vit
    with torch.inference_mode():
        runner(cuda_pixels(256, seed=0))
        runner(cuda_pixels(8, seed=0))
        graphs, frames = runner.graphs_compiled, dict(torch._dynamo.utils.counters["frames"])
        for batch in (200, 256, 129, 3, 8, 5):
            runner(cuda_pixels(batch, seed=batch))
    assert runner.active, compiled.compile_failure()
    assert runner.graphs_compiled == graphs
    assert dict(torch._dynamo.utils.counters["frames"]) == frames


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_outputs_survive_the_next_batch(cuda_pair):
    compiled_encoder = cuda_pair[0]
    with torch.inference_mode():
        first = compiled_encoder.hidden_states(cuda_pixels(8, seed=1))
        kept = first.clone()
        compiled_encoder.hidden_states(cuda_pixels(8, seed=2))  # replays the same graph
    assert torch.equal(first, kept)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_attention_runs_on_a_fused_kernel(cuda_pair, small_folder):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    eager_encoder = cuda_pair[1]
    x = cuda_pixels(4, seed=0)
    with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot run
        eager_encoder.hidden_states(x)
    runner = CompiledViT(eager_encoder.vit, cuda_graphs=False)  # kernels visible to the profiler
    with torch.inference_mode():
        runner(x)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner(x)
            torch.cuda.synchronize()
    assert runner.active, compiled.compile_failure()
    names = {event.key.lower() for event in prof.key_averages()}
    fused = [name for name in names if any(word in name for word in ("flash", "efficient", "fmha"))]
    assert fused, sorted(names)
