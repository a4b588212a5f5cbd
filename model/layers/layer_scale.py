import torch
from torch import nn


class LayerScale(nn.Module):
    """Learned per-channel scale on a residual branch (CaiT, "Going deeper with Image Transformers")."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
