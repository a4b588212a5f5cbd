import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution: (B, C, H, W) -> (B, H//p * W//p, D).

    Pixels beyond the last whole patch are dropped, as in the reference.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H//p, W//p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
