"""The DINOv2 vision transformer, composed from `model.layers`.

References: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (2023);
Darcet et al., "Vision Transformers Need Registers" (2023). Numerics follow transformers'
`Dinov2Model` / `Dinov2WithRegistersModel`, the project's reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig
from .errors import InvalidArgumentError
from .layers import Block, PatchEmbed


class DinoVisionTransformer(nn.Module):
    """pixel_values (B, 3, H, W) -> final-norm tokens (B, 1 + registers + patches, D).

    Token order is CLS, registers, patches (row-major), as in the reference's `last_hidden_state`.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_registers, D)) if config.num_registers else None
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_hidden, config.ffn, config.layer_norm_eps, config.qkv_bias)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        # Resampled position embeddings per (grid, dtype, device); cleared whenever weights are loaded.
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.register_load_state_dict_pre_hook(lambda *_: self._pos_cache.clear())

    def fold_scales(self) -> "DinoVisionTransformer":
        """Fold layer scales and softmax scales into the linear layers (faster inference; see Block)."""
        for block in self.blocks:
            block.fold_scales()
        return self

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus registers: the tokens before the first patch."""
        return 1 + self.config.num_registers

    def _apply(self, fn, *args, **kwargs):
        self._pos_cache.clear()  # .to(), .half(), .cuda() invalidate cached resampled tensors
        return super()._apply(fn, *args, **kwargs)

    def position_embeddings(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings (1, 1 + h*w, D) for an input of height x width pixels."""
        p = self.config.patch_size
        grid = (height // p, width // p)
        n = self.config.pos_grid
        # Same shortcut as the reference: a square input with the native patch count is used as is.
        if grid[0] * grid[1] == n * n and height == width:
            return self.pos_embed.to(dtype)
        key = (grid, dtype, self.pos_embed.device)
        cached = self._pos_cache.get(key)
        if cached is None:
            cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
            D = patch_pos.shape[-1]
            patch_pos = patch_pos.reshape(1, n, n, D).permute(0, 3, 1, 2)  # (1, D, n, n)
            # Bicubic resampling in half precision shifts the embeddings: interpolate in float32.
            patch_pos = F.interpolate(
                patch_pos.float(),
                size=grid,
                mode="bicubic",
                align_corners=False,
                antialias=self.config.interpolate_antialias,
            )
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D)  # (1, h*w, D)
            cached = torch.cat((cls_pos.float(), patch_pos), dim=1).to(dtype)
            if not torch.is_grad_enabled():
                self._pos_cache[key] = cached
        return cached

    def embed_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS, position embeddings and registers: (B, 1 + R + N, D)."""
        B, _, H, W = pixel_values.shape
        x = self.patch_embed(pixel_values)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)  # (B, 1 + N, D)
        x = x + self.position_embeddings(H, W, x.dtype)
        if self.register_tokens is not None:
            # Registers carry no position embedding; they sit between CLS and the patches.
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x

    def check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` in the weights' dtype, after checking they are (B, C, H, W) of at least one patch."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_chans:
            raise InvalidArgumentError(
                f"pixel_values must be (B, {self.config.in_chans}, H, W), got {tuple(pixel_values.shape)}"
            )
        p = self.config.patch_size
        if pixel_values.shape[2] < p or pixel_values.shape[3] < p:
            raise InvalidArgumentError(f"input {tuple(pixel_values.shape[2:])} is smaller than one {p}x{p} patch")
        return pixel_values.to(self.patch_embed.proj.weight.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(self.check_pixels(pixel_values))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
