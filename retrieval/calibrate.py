"""Threshold calibration on the user's own photos: how similar do altered copies stay?

A sample of indexed photos is copied with the edits duplicates usually carry (resize, JPEG
re-encode, crop, rotation, colour shift); each copy is embedded and compared with every original.
Pairs (copy, its original) are positives, (copy, another original) negatives; precision and recall
of "similarity >= t" are reported per threshold. A library's own duplicates are not false positives:
at threshold t, another original at least t similar to the copy's own original (a backup, a byte
copy) is left out of that copy's negatives.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from dinoseek.indexer.catalog_gateway import vectors_from_blobs
from dinoseek.indexer.decode import DecodeError, read_image
from dinoseek.indexer.library import Library
from dinoseek.model import Embedder
from dinoseek.model.progress import progress

from .errors import CalibrationError


def _reencode(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


ALTERATIONS = {
    "resize-50%": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.LANCZOS),
    "jpeg-q60": lambda im: _reencode(im, 60),
    "crop-80%": lambda im: im.crop((im.width // 10, im.height // 10, im.width - im.width // 10, im.height - im.height // 10)),
    "rotate-90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "colour-shift": lambda im: ImageEnhance.Brightness(ImageEnhance.Color(im).enhance(1.4)).enhance(1.15),
}
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.50, 1.0, 0.02))


@dataclass(frozen=True)
class Row:
    threshold: float
    precision: float
    recall: float
    recall_by_edit: dict


def calibrate(library: Library, encoder: Embedder, *, sample: int = 50, kind: str = "cls", seed: int = 0,
              min_precision: float = 0.99) -> tuple[list[Row], float | None, int]:
    """(table, recommended threshold, photos used). The recommendation is the lowest threshold
    whose precision reaches `min_precision` (catching the most edited copies without false pairs)."""
    library.check_model(encoder.manifest())
    rows = library.catalog.embedded_path_blobs(kind)
    if len(rows) < 2:
        raise CalibrationError("calibration needs at least 2 embedded photos in the library")
    random.Random(seed).shuffle(rows)
    spec = encoder.input_spec
    # Read at twice the side the encoder needs: the 50% resize must still leave it that much.
    side = 2 * spec.decode_side
    originals, copies, owners, edits = [], [], [], []  # copies: pixels of the altered images
    # Counted in photos used: one that cannot be read is replaced by the next, so the count only
    # moves when a photo and its altered copies are ready.
    with progress(min(sample, len(rows)), "calibrate: altering", unit="photos") as step:
        for row_id, raw, blob in rows:
            if len(originals) >= sample:
                break
            try:
                image = read_image(os.path.join(os.fsencode(library.root), raw), min_side=side).image
            except DecodeError:
                continue  # gone or changed since indexing: pick another
            owner = len(originals)
            originals.append(vectors_from_blobs([blob], library.dim())[0])
            for name, alter in ALTERATIONS.items():
                copies.append(spec.pixels(alter(image)))  # the path every other caller takes to the model
                owners.append(owner)
                edits.append(name)
            step.update()
    if len(originals) < 2:
        raise CalibrationError("calibration could not read 2 of the library's photos")
    batches = []
    with progress(len(copies), "calibrate: embedding", unit="copies") as step:
        for i in range(0, len(copies), 32):
            batch = copies[i:i + 32]
            batches.append(getattr(encoder.embed_pixels(np.stack(batch)), kind))
            step.update(len(batch))
    embedded = np.concatenate(batches)
    originals = np.stack(originals)
    sims = embedded @ originals.T  # (copies, originals)
    positive = np.zeros_like(sims, dtype=bool)
    positive[np.arange(len(owners)), owners] = True
    owner_sims = (originals @ originals.T)[owners]  # (copies, originals): each copy's own original vs the others
    table = []
    for t in THRESHOLDS:
        predicted = sims >= t
        tp = int((predicted & positive).sum())
        fp = int((predicted & ~positive & (owner_sims < t)).sum())  # duplicates in the library are not errors
        by_edit = {name: float(np.mean([predicted[i, owners[i]] for i in range(len(owners)) if edits[i] == name]))
                   for name in ALTERATIONS}
        table.append(Row(t, tp / (tp + fp) if tp + fp else 1.0, tp / positive.sum(), by_edit))
    recommended = next((r.threshold for r in table if r.precision >= min_precision), None)
    return table, recommended, len(originals)
