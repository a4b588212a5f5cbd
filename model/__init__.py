"""DINOv2 encoder in plain PyTorch: architecture, checkpoints, preprocessing, precision."""

from .config import HUB_REPOS, PRESETS, ViTConfig
from .embedder import Embedder, Embeddings
from .encoder import Encoder, check_settings, encoder_for_library
from .errors import (
    CheckpointError,
    DeviceUnavailableError,
    InvalidArgumentError,
    ModelError,
    PrecisionError,
    PrecisionUnsupportedError,
    WeightsNotFoundError,
)
from .load import Weights, build_vit, load_vit, load_weights
from .precision import PRECISIONS
from .preprocess import InputSpec, preprocess
from .vit import DinoVisionTransformer

__all__ = [
    "HUB_REPOS",
    "PRECISIONS",
    "PRESETS",
    "CheckpointError",
    "DeviceUnavailableError",
    "DinoVisionTransformer",
    "Embedder",
    "Embeddings",
    "Encoder",
    "InputSpec",
    "InvalidArgumentError",
    "ModelError",
    "PrecisionError",
    "PrecisionUnsupportedError",
    "ViTConfig",
    "Weights",
    "WeightsNotFoundError",
    "build_vit",
    "check_settings",
    "encoder_for_library",
    "load_vit",
    "load_weights",
    "preprocess",
]
