"""DINOv2 encoder in plain PyTorch: architecture, checkpoints, preprocessing, precision."""

from .config import HUB_REPOS, PRESETS, ViTConfig
from .encoder import Embeddings, Encoder
from .errors import CheckpointError, ModelError, PrecisionError, WeightsNotFoundError
from .load import Weights, build_vit, load_vit, load_weights
from .precision import PRECISIONS
from .preprocess import InputSpec, preprocess
from .vit import DinoVisionTransformer

__all__ = [
    "HUB_REPOS",
    "PRECISIONS",
    "PRESETS",
    "CheckpointError",
    "DinoVisionTransformer",
    "Embeddings",
    "Encoder",
    "InputSpec",
    "ModelError",
    "PrecisionError",
    "ViTConfig",
    "Weights",
    "WeightsNotFoundError",
    "build_vit",
    "load_vit",
    "load_weights",
    "preprocess",
]
