import torch
from torch import nn

from .attention import Attention
from .kernels import linear_add
from .layer_scale import LayerScale
from .mlp import Mlp, SwiGLUFFN


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, ffn: str, eps: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1: nn.Module = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLUFFN(dim, mlp_hidden) if ffn == "swiglu" else Mlp(dim, mlp_hidden)
        self.ls2: nn.Module = LayerScale(dim)

    @torch.no_grad()
    def fold_scales(self) -> None:
        """Multiply each layer scale into the linear layer before it (gamma * (Wx + b) = (gamma W)x + gamma b).

        Saves two elementwise passes per block and lets the output projections fuse with the
        residual add. Exact up to float rounding; afterwards the state dict has no `ls*.gamma`.
        The attention's softmax scale is folded into its query weights at the same time.
        """
        self.attn.fold_query_scale()
        for name, linear in (("ls1", self.attn.proj), ("ls2", self.mlp.out)):
            scale = getattr(self, name)
            if isinstance(scale, LayerScale):
                linear.weight.mul_(scale.gamma[:, None])
                linear.bias.mul_(scale.gamma)
                setattr(self, name, nn.Identity())

    def _residual(self, x: torch.Tensor, h: torch.Tensor, linear: nn.Module, scale: nn.Module) -> torch.Tensor:
        if isinstance(scale, nn.Identity):
            return linear_add(h, linear, x)
        return x + scale(linear(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.attn.mix(self.norm1(x)), self.attn.proj, self.ls1)
        return self._residual(x, self.mlp.hidden(self.norm2(x)), self.mlp.out, self.ls2)
