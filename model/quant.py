"""Weight-only int8 / int4 quantization of the transformer's linear layers.

int8: symmetric, one scale per output channel. int4: asymmetric groups of `group_size` input
channels, two values per byte, w ~= (q - 8) * scale + zero with q in [0, 15] (the "tinygemm"
convention of torchao's Int4WeightOnlyConfig). Weights stay packed in memory.

Which matmul runs, per device:
- CPU, both: each call dequantizes one layer into the compute dtype and runs a regular GEMM.
  Measured on a 2-core AVX-512 CPU at ViT batch sizes (4112 x 384 -> 1536): dequantize + GEMM
  13.3 ms in bf16 versus 35 ms (`_weight_int8pack_mm`) and 31 ms (`_weight_int4pack_mm_for_cpu`)
  for the packed kernels, and over 1 s for the int8 kernel with fp32 activations.
- CUDA, int4: torch's tinygemm kernel (`_weight_int4pack_mm`, bf16 tensor cores, sm80+), on a copy
  of the codes converted once per layer into its tiled layout (as many bytes again as `packed`).
  The first half-precision CUDA forward of each layer runs it on the real input and checks it
  against dequantize + GEMM; where the op is missing, raises, cannot take the shape, or disagrees,
  that layer keeps dequantize + GEMM (logged once). Both are then timed on that input and the
  faster is kept (INT4_CHOICE): at indexing batches that should be dequantize + GEMM (tinygemm took 6x
  the bf16 GEMM's time on an H200). float32 inputs always dequantize.
- CUDA, int8: dequantize + cuBLAS GEMM. torch's CUDA `_weight_int8pack_mm` (aten/native/cuda/
  int8mm.cu) is a scalar kernel (one thread per output element, fp32 FMAs, no tensor cores): at
  ViT batches (256 x 257 tokens x 384 -> 1536) it would be far slower than a tensor-core GEMM,
  which dominates there anyway; dequantizing one layer's weight costs a few microseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (128, 64, 32)  # tried in order; the first that divides in_features is used


def int4_group_size(in_features: int) -> int | None:
    """The int4 group size for a linear layer with `in_features` inputs, or None when no size in
    INT4_GROUP_SIZES divides it (the layer then stays in full precision)."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with q int8 (out, in) and scale (out,)."""

    kernel = "dequantize"  # on every device: see the module docstring for why not `_weight_int8pack_mm`

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute_dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)


class Int4Linear(nn.Module):
    """Grouped asymmetric int4 weights, two per byte; scale and zero per (output, group).

    `kernel` says how half-precision forwards on a kernel device (CUDA) multiply: None until the
    first, then the kernel's name ("tinygemm") or "dequantize". The kernel's copy of the weights is derived
    (not in the state dict, not counted by `weight_bytes`) and dropped when the module is moved,
    cast or loaded.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        compute_dtype: torch.dtype,
    ) -> None:
        """codes: (out, in) uint8 in [0, 15]; scale, zero: (out, in / group_size)."""
        super().__init__()
        self.group_size = group_size
        self.out_features, self.in_features = codes.shape
        self.register_buffer("packed", codes[:, 0::2] | (codes[:, 1::2] << 4))  # (out, in/2): low nibble first
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("zero", zero.to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        self._forget_kernel()

    @classmethod
    def round_to_nearest(cls, linear: nn.Linear, compute_dtype: torch.dtype, group_size: int) -> Int4Linear:
        out_f, in_f = linear.weight.shape
        w = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        codes, scale, zero = int4_codes(w)
        return cls(codes.reshape(out_f, in_f), scale, zero, linear.bias, group_size, compute_dtype)

    @classmethod
    def from_codes(cls, codes, scale, zero, bias, group_size, compute_dtype) -> Int4Linear:
        return cls(codes, scale, zero, bias, group_size, compute_dtype)

    def codes(self) -> torch.Tensor:
        """The int4 codes unpacked: (out, in) uint8 in [0, 15]."""
        return torch.stack((self.packed & 0xF, self.packed >> 4), dim=-1).reshape(self.out_features, -1)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.codes().reshape(self.out_features, -1, self.group_size).to(dtype)  # (out, groups, group)
        w = (q - 8) * self.scale.to(dtype)[..., None] + self.zero.to(dtype)[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = INT4_KERNELS.get(x.device.type)
        # Half-precision inputs only: float32 (GPTQ calibration, an explicit fp32 run) stays exact.
        if kernel is not None and x.dtype in (torch.bfloat16, torch.float16) and x.numel():
            if self.kernel is None or self._kernel_device != x.device:
                if INT4_CHOICE == "fastest" and x.numel() // self.in_features < INT4_TIMING_ROWS:
                    # Too few rows to time on (a one-image query): decided on the first batch-sized input.
                    return F.linear(x, self.dequantized(x.dtype), self.bias)
                return self._choose_kernel(kernel, x)
            if self.kernel == kernel.name:
                return self._kernel_forward(kernel, x)
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def _forget_kernel(self) -> None:
        self.kernel: str | None = None
        self._kernel_device: torch.device | None = None
        self._kernel_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, scales_and_zeros)

    def _apply(self, fn, *args, **kwargs):
        self._forget_kernel()  # .to(), .cuda(), .half() leave the derived copy stale
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget_kernel()  # new codes: convert again on the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _kernel_forward(self, kernel: Int4Kernel, x: torch.Tensor) -> torch.Tensor:
        weight, scales_and_zeros = self._kernel_weights
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (B*T, in): the kernel takes bf16
        per_launch = min(INT4_KERNEL_MAX_ROWS, (2**31 - 1) // max(self.in_features, self.out_features) // 16 * 16)
        parts = [kernel.mm(chunk, weight, self.group_size, scales_and_zeros) for chunk in rows.split(per_launch)]
        y = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.dtype)  # (B*T, out)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.compiler.disable  # runs once per layer and device, eagerly; compiled graphs see only the outcome
    def _choose_kernel(self, kernel: Int4Kernel, x: torch.Tensor) -> torch.Tensor:
        """Try `kernel` on this input and keep it if it agrees with dequantize + GEMM: this also
        catches a torch whose kernel reads another layout, or a GPU it was not built for. Returns
        the output of the path chosen."""
        reference = F.linear(x, self.dequantized(x.dtype), self.bias)
        reason = kernel.unsupported(self, x.device)
        if reason is None:
            try:
                self._kernel_weights = kernel.prepare(self)
                self.kernel, self._kernel_device = kernel.name, x.device
                y = self._kernel_forward(kernel, x)
                error = relative_error(y, reference)
                if error > INT4_KERNEL_TOLERANCE:  # or NaN
                    reason = f"its result differs from dequantize + GEMM by {error:.2g} (relative)"
                elif INT4_CHOICE == "kernel":
                    return y
                else:
                    kernel_ms = _milliseconds(lambda: self._kernel_forward(kernel, x), x.device)
                    plain_ms = _milliseconds(lambda: F.linear(x, self.dequantized(x.dtype), self.bias), x.device)
                    if kernel_ms <= plain_ms:
                        return y
                    reason = f"it is slower at {x.numel() // self.in_features} rows ({kernel_ms:.3g} ms vs {plain_ms:.3g} ms)"
            except (RuntimeError, NotImplementedError, AttributeError, TypeError) as exc:
                first_line = (str(exc).strip().splitlines() or [""])[0]
                reason = f"it raised {type(exc).__name__}: {first_line}"
        level = logging.INFO if reason.startswith("it is slower") else logging.WARNING
        _log_once((kernel.name, x.device.type, self.in_features, self.out_features), level,
                  f"int4 layers ({self.in_features} -> {self.out_features}) on {x.device.type} use "
                  f"dequantize + GEMM, not {kernel.name}: {reason}")
        self._kernel_weights = None
        self.kernel, self._kernel_device = "dequantize", x.device
        return reference


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """||y - reference|| / ||reference|| in float32 (inf where the reference is zero and y is not)."""
    diff = (y.float() - reference.float()).norm()
    return float(diff / reference.float().norm().clamp(min=1e-30))


# Kernel vs dequantize + GEMM on the same input, both in bf16: ~0.003 (rounding of the dequantized
# weights and of the output); a wrong nibble order, zero convention or layout gives ~1.
INT4_KERNEL_TOLERANCE = 0.02
# "fastest": a layer keeps the kernel only where it beats dequantize + GEMM on its first input,
# timed. Measured on an H200 (torch 2.11), 4112 x 384 -> 1536 in bf16: tinygemm 0.209 ms, the
# dequantized cuBLAS GEMM 0.033 ms — tinygemm is built for the few rows of LLM decoding, and at
# ViT batches (257 rows per image) the tensor-core GEMM on weights dequantized once per call wins.
# "kernel": whenever it is correct (tests that check the kernel itself).
INT4_CHOICE = "fastest"
# Rows (images x tokens) an input needs for the choice to be made on it: 16 images of 257 tokens.
INT4_TIMING_ROWS = 4096
# tinygemm launches one CUDA block per 16 input rows in grid.z, which is at most 65535; it also
# indexes its input and output with int32 (row * in_features), so launches stay under 2**31 elements.
INT4_KERNEL_MAX_ROWS = 65535 * 16


@dataclass(frozen=True)
class Int4Kernel:
    """A packed int4 matmul taking the project's codes in the tinygemm convention.

    `convert(bytes, inner_k_tiles)` turns (out, in/2) uint8 codes, high nibble first (element 2j in
    the high nibble of byte j, as torch's CUDA `_convert_weight_to_int4pack` reads them), into the
    kernel's layout; `mm(x, weight, group_size, scales_and_zeros)` multiplies bf16 x (m, in).
    """

    name: str
    convert: Callable[[torch.Tensor, int], torch.Tensor]
    mm: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]
    min_capability: tuple[int, int] | None  # CUDA compute capability the kernel needs
    out_multiple: int  # out_features must be a multiple of this (the kernel's n tile)

    def unsupported(self, layer: Int4Linear, device: torch.device) -> str | None:
        """Why this kernel cannot run `layer` on `device`, or None."""
        if self.min_capability is not None and torch.cuda.get_device_capability(device) < self.min_capability:
            major, minor = self.min_capability
            return f"it needs compute capability {major}.{minor} or newer"
        if layer.group_size not in (32, 64, 128, 256):
            return f"it takes group sizes 32, 64, 128 or 256, not {layer.group_size}"
        if inner_k_tiles(layer.in_features) is None:
            return f"in_features {layer.in_features} is not a multiple of 32"
        if layer.out_features % self.out_multiple:
            return f"out_features {layer.out_features} is not a multiple of {self.out_multiple}"
        return None

    def prepare(self, layer: Int4Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's weights in this kernel's layout: (weight, scales_and_zeros)."""
        weight = self.convert(tinygemm_bytes(layer.packed), inner_k_tiles(layer.in_features))
        return weight, tinygemm_scales_and_zeros(layer.scale, layer.zero)


def inner_k_tiles(in_features: int) -> int | None:
    """tinygemm's k-tiles (16 inputs each) per packed word: the largest of 8, 4, 2 dividing in_features."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def tinygemm_bytes(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 low nibble first (how Int4Linear stores codes) -> high nibble first."""
    return ((packed & 0xF) << 4) | (packed >> 4)


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale, zero (out, groups) -> (groups, out, 2) bf16: [..., 0] scale, [..., 1] zero, so that
    w = (q - 8) * scale + zero, the same convention as Int4Linear."""
    return torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def _unpack_high_nibble_first(data: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 high nibble first -> (out, in) int32 codes."""
    return torch.stack((data >> 4, data & 0xF), dim=-1).reshape(data.shape[0], -1).to(torch.int32)


TINYGEMM_CUDA = Int4Kernel(
    name="tinygemm",
    # Looked up at call time: a torch without the ops raises AttributeError, caught by the caller.
    convert=lambda data, tiles: torch.ops.aten._convert_weight_to_int4pack(data.contiguous(), tiles),
    mm=lambda x, w, group, sz: torch.ops.aten._weight_int4pack_mm(x, w, group, sz),
    min_capability=(8, 0),  # bf16 mma.sync tensor-core instructions
    out_multiple=8,
)
# The same semantics on the CPU (codes as int32, one per element). Not used by default (dequantize
# + GEMM is faster there, see above); tests install it to check the conversion and the selection
# logic on machines without a GPU.
TINYGEMM_CPU = Int4Kernel(
    name="tinygemm",
    convert=lambda data, tiles: torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_high_nibble_first(data), tiles),
    mm=lambda x, w, group, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz),
    min_capability=None,
    out_multiple=16,
)
INT4_KERNELS: dict[str, Int4Kernel] = {"cuda": TINYGEMM_CUDA}  # device type -> kernel

_logged: set[tuple] = set()


def _log_once(key: tuple, level: int, message: str) -> None:
    """Log once per key (kernel, device type, layer shape), not once per layer of a deep model."""
    if key not in _logged:
        _logged.add(key)
        log.log(level, "%s", message)


def _milliseconds(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median time of `fn` after one warm-up run (CUDA events on a GPU, the wall clock elsewhere)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return sorted(times)[len(times) // 2]


def int4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest over each group's min..max. w: (out, groups, group) ->
    codes uint8 (out, groups, group), scale and zero (out, groups)."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = (high - low).clamp(min=1e-8) / 15
    zero = low + 8 * scale
    codes = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return codes, scale, zero


def quantize_linears(module: nn.Module, bits: int, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear under `module` in place; returns how many were quantized."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if bits == 8:
                parent.add_module(name, Int8Linear(child, compute_dtype))
            else:
                group = int4_group_size(child.in_features)
                if group is None:
                    log.warning("kept %s in full precision: in_features %d has no int4 group size", name, child.in_features)
                    continue
                parent.add_module(name, Int4Linear.round_to_nearest(child, compute_dtype, group))
            count += 1
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers: what the weights occupy in memory."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)
