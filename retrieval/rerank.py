"""Crop-aware re-ranking of candidate pairs with patch tokens.

A crop shares only part of the frame with its source, so their global (CLS) vectors can fall below
a near-duplicate threshold. Comparing patch tokens finds it: for each token of one image, the best
cosine among the other's tokens, averaged (Chamfer similarity), taken in the direction that fits
best — every patch of a crop has a match in its source, not the other way round.

References: Kusner et al. 2015 (word mover's distance relaxation); ColBERT "MaxSim", Khattab &
Zaharia 2020.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from dinoseek.indexer.decode import DecodeError, load_pixels
from dinoseek.indexer.library import Library
from dinoseek.model import Embedder
from dinoseek.model.progress import progress, track


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Best-direction mean of per-token max cosine; a, b: (tokens, D) unit rows."""
    sims = a @ b.T  # (Ta, Tb)
    return float(max(sims.max(axis=1).mean(), sims.max(axis=0).mean()))


def patch_tokens(library: Library, encoder: Embedder, ids: Iterable[int], batch: int = 16) -> dict[int, np.ndarray]:
    """Unit patch tokens per image id (re-read from disk; files that changed are left out). Reported
    as the step "dedup: crops", in images read and embedded."""
    paths = library.catalog.embedded_paths(ids)  # chunked: a long candidate list never makes one huge IN (...)
    root = os.fsencode(library.root)
    tokens: dict[int, np.ndarray] = {}
    pending: list[tuple[int, np.ndarray]] = []  # (id, pixels)

    def flush():
        out = encoder.embed_pixels(np.stack([pixels for _, pixels in pending]), return_tokens=True).tokens  # (B, T, D)
        out = out / np.linalg.norm(out, axis=-1, keepdims=True)
        for (row_id, _), t in zip(pending, out):
            tokens[row_id] = t
        pending.clear()

    with progress(len(paths), "dedup: crops", unit="images") as step:
        for row_id, raw in paths.items():
            try:  # as the indexer read them; a FIFO or device swapped in since is refused without blocking
                pending.append((row_id, load_pixels(os.path.join(root, raw), encoder.input_spec)[1]))
            except DecodeError:
                step.update()
                continue
            if len(pending) >= batch:
                done = len(pending)
                flush()
                step.update(done)  # counted once embedded: the encoder is most of the time
        if pending:
            done = len(pending)
            flush()
            step.update(done)
    return tokens


def rerank(pairs: Iterable[tuple[int, int, float]], library: Library, encoder: Embedder, threshold: float) -> list[tuple[int, int, float]]:
    """Pairs rescored as max(global similarity, crop similarity), kept if >= threshold."""
    pairs = list(pairs)
    tokens = patch_tokens(library, encoder, [i for a, b, _ in pairs for i in (a, b)])
    kept = []
    for a, b, sim in track(pairs, "dedup: crop matching", unit="pairs"):
        if sim < threshold and a in tokens and b in tokens:
            sim = max(sim, chamfer(tokens[a], tokens[b]))
        if sim >= threshold:
            kept.append((a, b, sim))
    return kept
