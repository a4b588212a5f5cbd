import torch
import torch.nn.functional as F
from torch import nn

from .kernels import linear_gelu


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear. `hidden` is everything before the output layer `out`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    @property
    def out(self) -> nn.Module:
        return self.fc2

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.fc1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward of the giant model: w12 holds the gate and the value halves fused.

    References: Shazeer, "GLU Variants Improve Transformer" (2020); dinov2 `layers/swiglu_ffn.py`.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    @property
    def out(self) -> nn.Module:
        return self.w3

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # each (B, N, hidden)
        return F.silu(gate) * value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.hidden(x))
