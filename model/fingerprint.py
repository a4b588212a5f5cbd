"""Weights fingerprints: the sha256 a library manifest records to tell one model's weights from another's."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .files import hash_into, open_regular


def files_sha256(paths: Iterable[Path]) -> str:
    """sha256 over the bytes of the checkpoint files a model was loaded from, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open_regular(path) as f:  # never blocks, should a weights file be swapped for a FIFO
            hash_into(digest, f)
    return digest.hexdigest()


def tensors_sha256(module: nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes and bytes): the fingerprint of a model
    built in memory, which has no files. Taken before any cast or quantization."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
