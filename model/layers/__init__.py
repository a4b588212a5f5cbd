"""Small building blocks of the DINOv2 ViT, one concept per file."""

from .attention import Attention
from .block import Block
from .layer_scale import LayerScale
from .mlp import Mlp, SwiGLUFFN
from .patch_embed import PatchEmbed

__all__ = ["Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN"]
