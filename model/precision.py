"""Precision names -> dtypes and quantized modules, checked against the device."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .errors import DeviceUnavailableError, PrecisionError, PrecisionUnsupportedError
from .quant import quantize_linears

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
log = logging.getLogger(__name__)
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls in hardware (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d{1,4}))?")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` (string or torch.device), checked against this machine.

    The one place devices are resolved and validated: `auto` is CUDA where present, else Apple's
    MPS, else the CPU. torch.device() itself raises a RuntimeError listing a dozen backends for a
    typo, and accepts `cuda:7` on a machine with one GPU until first use.
    """
    text = str(device).strip()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    match = _DEVICE.fullmatch(text)
    if match is None:
        raise PrecisionError(f"device {text!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    device_type, device_index = match.groups()
    if device_type == "mps" and not _mps_available():
        raise DeviceUnavailableError(f"device {text!r} requested but Apple MPS is not available")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {text!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if device_index is not None and int(device_index) >= count:
            raise PrecisionError(f"device {text!r} does not exist: this machine has {count} CUDA device(s), "
                                 f"cuda:0 to cuda:{count - 1}")
    return torch.device(text)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> fp16 on CUDA; fp32 on MPS; bf16 on CPUs with native bf16, else fp32. Other names
    are validated."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        if device.type == "mps":  # bf16 needs macOS 14+ there; fp32 works everywhere
            return "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionUnsupportedError("bf16 needs an Ampere or newer GPU")
    if precision == "fp16" and device.type == "cpu":
        log.warning("fp16 on the CPU runs without hardware support and is slow; bf16 or fp32 is faster")
    return precision


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Activation dtype. Quantized weights are dequantized into what `auto` would pick, except int4
    on an Ampere or newer GPU: bf16 there, the only dtype the int4 kernel (tinygemm) takes, which
    spares a cast of every layer's input and output."""
    if precision in _FLOAT:
        return _FLOAT[precision]
    if precision == "int4" and device.type == "cuda" and _cuda_capability(device) >= (8, 0):
        return torch.bfloat16
    return _FLOAT[resolve_precision("auto", device)]


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    # is_bf16_supported() also says yes for GPUs that only emulate bf16; the kernel needs sm80.
    return tuple(torch.cuda.get_device_capability(device))


def apply_precision(
    model: nn.Module, precision: str, device: torch.device, calibration: torch.Tensor | None = None
) -> nn.Module:
    """Cast (and for int8/int4 quantize) a float32 model in place for `precision` on `device`.

    int4 is calibrated with GPTQ on `calibration` pixel values (default: built-in synthetic
    images), on `device` (the GPU where there is one); int8 rounds to nearest per output channel,
    which already keeps cosine > 0.999.
    """
    dtype = compute_dtype(precision, device)
    if precision == "int4":
        from .gptq import calibration_images, quantize_vit_int4_gptq
        from .preprocess import preprocess

        model.to(device=device, dtype=torch.float32)
        pixels = preprocess(calibration_images()) if calibration is None else calibration
        quantize_vit_int4_gptq(model, pixels.to(device))
    elif precision == "int8":
        model.to(device=device)  # round where the model will run: on a GPU, in milliseconds
        quantize_linears(getattr(model, "blocks", model), bits=8, compute_dtype=dtype)
    return model.to(device=device, dtype=dtype)
