"""`Embedder`: what the indexer and the query layer need of an encoder, and the vectors it returns.

`Encoder` is the implementation; anything else with these members can stand in for it (a fake in
a benchmark, a remote model, an actor in a cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .preprocess import InputSpec


@dataclass(frozen=True)
class Embeddings:
    cls: np.ndarray  # (B, D) float32, unit norm: final-norm CLS token
    patch: np.ndarray  # (B, D) float32, unit norm: mean of final-norm patch tokens (registers excluded)
    tokens: np.ndarray | None = None  # (B, patches, D) float32 final-norm patch tokens, when asked for


@runtime_checkable
class Embedder(Protocol):
    @property
    def dim(self) -> int:
        """Width of each vector."""
        ...

    @property
    def input_spec(self) -> InputSpec:
        """The pixels `embed_pixels` takes, and the decode size they need."""
        ...

    def manifest(self) -> dict:
        """What a library records to never mix vectors of two models (arch, weights, preprocess, dim...)."""
        ...

    def embed_pixels(self, pixels: np.ndarray, *, return_tokens: bool = False) -> Embeddings:
        """(B, size, size, 3) uint8 pixels made by `input_spec.pixels` -> unit vectors."""
        ...
