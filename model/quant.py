"""Weight-only int8 / int4 quantization of the transformer's linear layers.

int8: symmetric, one scale per output channel. int4: asymmetric groups of `group_size` input
channels, two values per byte, w ~= (q - 8) * scale + zero with q in [0, 15] (the "tinygemm"
convention of torchao's Int4WeightOnlyConfig). Weights stay packed in memory; each call
dequantizes one layer into the compute dtype and runs a regular GEMM. Measured on a 2-core
AVX-512 CPU at ViT batch sizes (4112 x 384 -> 1536): dequantize + GEMM 13.3 ms in bf16 versus
35 ms (`_weight_int8pack_mm`) and 31 ms (`_weight_int4pack_mm_for_cpu`) for the packed kernels,
and over 1 s for the int8 kernel with fp32 activations — so the packed kernels are not used.
"""

from __future__ import annotations

import logging

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
    """Grouped asymmetric int4 weights, two per byte; scale and zero per (output, group)."""

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

    @classmethod
    def round_to_nearest(cls, linear: nn.Linear, compute_dtype: torch.dtype, group_size: int) -> "Int4Linear":
        out_f, in_f = linear.weight.shape
        w = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        codes, scale, zero = int4_codes(w)
        return cls(codes.reshape(out_f, in_f), scale, zero, linear.bias, group_size, compute_dtype)

    @classmethod
    def from_codes(cls, codes, scale, zero, bias, group_size, compute_dtype) -> "Int4Linear":
        return cls(codes, scale, zero, bias, group_size, compute_dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        q = torch.stack((self.packed & 0xF, self.packed >> 4), dim=-1)  # (out, in/2, 2)
        q = q.reshape(self.out_features, -1, self.group_size).to(dtype)  # (out, groups, group)
        w = (q - 8) * self.scale.to(dtype)[..., None] + self.zero.to(dtype)[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)


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
