"""Weight-only int8 / int4 quantization of the transformer's linear layers.

int8: symmetric, one scale per output channel. int4: asymmetric groups of `group_size` input
channels, in the "tinygemm" convention w ~= (q - 8) * scale + zero with q in [0, 15] — the layout
torchao's Int4WeightOnlyConfig uses. On the CPU the layers call the same ATen kernels torchao
dispatches to (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); elsewhere they dequantize
into the matmul. Activations keep the compute dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (128, 64, 32)  # tried in order; the first that divides in_features is used


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with q int8 (out, in) and scale (out,)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute_dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and _has_op("_weight_int8pack_mm"):
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        else:
            y = F.linear(x2, self.qweight.to(x.dtype) * self.scale[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Grouped asymmetric int4 weights, two per byte; scales_and_zeros (in/group, out, 2)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, group_size: int) -> None:
        super().__init__()
        out_f, in_f = linear.weight.shape
        w = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        low, high = w.amin(dim=-1), w.amax(dim=-1)  # (out, groups)
        scale = (high - low).clamp(min=1e-8) / 15
        zero = low + 8 * scale
        q = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
        self.group_size = group_size
        self.in_features, self.out_features = in_f, out_f
        self.register_buffer("scales_and_zeros", torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(compute_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute_dtype))
        self.cpu_kernel = linear.weight.device.type == "cpu" and _has_op("_weight_int4pack_mm_for_cpu")
        if self.cpu_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (out, in/2) uint8, kernel layout
        else:
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (out, in/2): low nibble first
        self.register_buffer("packed", packed)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """Full weight (out, in) for the generic path."""
        q = torch.stack((self.packed & 0xF, self.packed >> 4), dim=-1).reshape(self.out_features, self.in_features)
        q = q.reshape(self.out_features, -1, self.group_size).to(dtype)  # (out, groups, group)
        scale, zero = self.scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # each (out, groups)
        return ((q - 8) * scale[..., None] + zero[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.cpu_kernel and x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


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
                group = next((g for g in INT4_GROUP_SIZES if child.in_features % g == 0), None)
                if group is None:
                    log.warning("kept %s in full precision: in_features %d has no int4 group size", name, child.in_features)
                    continue
                parent.add_module(name, Int4Linear(child, compute_dtype, group))
            count += 1
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers: what the weights occupy in memory."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)
