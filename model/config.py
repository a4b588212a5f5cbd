"""Architecture configuration and the presets that match the released DINOv2 checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import InvalidArgumentError

# All released DINOv2 models use 64-dimensional heads; used to infer the head count from tensors.
HEAD_DIM = 64


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 14
    # Side of the learned position-embedding grid: released weights are trained at 518 px = 37 x 14.
    pos_grid: int = 37
    # Extra learned tokens between CLS and the patches ("Vision Transformers Need Registers").
    num_registers: int = 0
    # Hidden width of the feed-forward block; for SwiGLU, the width of each of its two halves.
    mlp_hidden: int = 1536
    # "mlp": Linear -> exact GELU -> Linear.  "swiglu": fused w12 -> SiLU gate -> w3 (giant only).
    ffn: str = "mlp"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    # The reference resamples position embeddings with antialiasing only for the register models
    # (transformers Dinov2WithRegistersEmbeddings; dinov2 hubconf `interpolate_antialias=True`).
    interpolate_antialias: bool = False
    in_chans: int = 3

    def __post_init__(self) -> None:
        for name, (low, high) in LIMITS.items():
            check_int(name, getattr(self, name), low, high)
        if self.ffn not in ("mlp", "swiglu"):
            raise InvalidArgumentError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.embed_dim % self.num_heads:
            raise InvalidArgumentError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise InvalidArgumentError(f"layer_norm_eps must be a number in (0, 1), got {self.layer_norm_eps!r}")

    @property
    def image_size(self) -> int:
        """Input side at which position embeddings are used without resampling."""
        return self.pos_grid * self.patch_size

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


# Bounds on each size, far beyond every released model (giant: 1536-d, 40 blocks, 24 heads, 4 registers)
# yet tight enough that a corrupt or hostile config.json is refused by name instead of describing a
# model of terabytes or one that divides by zero.
LIMITS: dict[str, tuple[int, int]] = {
    "embed_dim": (1, 16384),
    "depth": (1, 512),
    "num_heads": (1, 1024),
    "patch_size": (1, 256),
    "pos_grid": (1, 1024),
    "num_registers": (0, 256),
    "mlp_hidden": (1, 131072),
    "in_chans": (1, 64),
}


def check_int(name: str, value, low: int, high: int) -> int:
    """`value` if it is an int (not a bool) in [low, high]; else TypeError/InvalidArgumentError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be in {low}..{high}, got {value}")
    return value


def swiglu_hidden(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8 (dinov2 SwiGLUFFNFused)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


_BASE = {
    "small": ViTConfig(embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536),
    "base": ViTConfig(embed_dim=768, depth=12, num_heads=12, mlp_hidden=3072),
    "large": ViTConfig(embed_dim=1024, depth=24, num_heads=16, mlp_hidden=4096),
    "giant": ViTConfig(embed_dim=1536, depth=40, num_heads=24, mlp_hidden=swiglu_hidden(1536), ffn="swiglu"),
}

PRESETS: dict[str, ViTConfig] = {
    **_BASE,
    **{f"{name}-reg": cfg.replace(num_registers=4, interpolate_antialias=True) for name, cfg in _BASE.items()},
}

# Hugging Face Hub repositories holding the official weights of each preset.
HUB_REPOS: dict[str, str] = {
    **{name: f"facebook/dinov2-{name}" for name in _BASE},
    **{f"{name}-reg": f"facebook/dinov2-with-registers-{name}" for name in _BASE},
}
