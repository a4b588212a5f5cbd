"""Query API: similarity search over a library, with metadata filters.

    from dinoseek.retrieval import open_library
    with open_library("~/Pictures", weights="./dinov2-small") as lib:
        for hit in lib.search("query.jpg", k=10, folder="2023/"):
            print(hit.score, hit.path)

Scores are inner products of unit vectors (cosine similarity). Hits come from catalog rows that
are embedded at query time, so a row deleted by a concurrent run never comes back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dinoseek.indexer.catalog import KINDS
from dinoseek.indexer.catalog_gateway import Filters, parse_capture_time  # noqa: F401 - part of this API (search filters)
from dinoseek.indexer.decode import DecodeError, load_pixels, read_image
from dinoseek.indexer.errors import NotIndexedError
from dinoseek.indexer.library import Library
from dinoseek.indexer.paths import under_root
from dinoseek.indexer.tuning import EXACT_FILTER_LIMIT, OVERFETCH
from dinoseek.model import Embedder

from .errors import InvalidArgumentError, QueryError

KIND_CHOICES = (*KINDS, "both")


@dataclass(frozen=True)
class Hit:
    id: int
    path: str  # printable, relative to the library root
    score: float
    raw_path: bytes = field(repr=False)  # exact bytes of the relative path
    metadata: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": round(self.score, 6), **self.metadata}


class LibrarySearch:
    """Search a library. Image queries need an encoder of the library's model (`encoder=`).

    Whoever opens the library closes it: `close()` closes it only when it was handed over with
    `owns_library=True` (as `open_library` does); otherwise the caller's library stays open.
    """

    def __init__(self, library: Library, encoder: Embedder | None = None, *, owns_library: bool = False) -> None:
        self.library = library
        self.owns_library = owns_library
        self.encoder = encoder
        if encoder is not None:
            library.check_model(encoder.manifest())
        manifest = library.manifest()
        if manifest is None:
            raise NotIndexedError(f"{library.folder} has no vectors yet", library.root)
        self.dim = manifest["dim"]
        self.indexes = library.load_indexes()

    def close(self) -> None:
        if self.owns_library:
            self.library.close()

    def __enter__(self) -> "LibrarySearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- queries -> vectors --------------------------------------------------------------------
    def vectors_for(self, queries, kind: str) -> np.ndarray:
        """Unit query vectors (n, D) for paths, PIL images, images as arrays, or vectors.

        For kind "both" each row is [cls, patch] (n, 2D), each half unit-normalized; a D-dim
        vector given for "both" is used for both halves.
        """
        if isinstance(queries, (str, os.PathLike, Image.Image)) or (isinstance(queries, np.ndarray) and queries.ndim == 1):
            queries = [queries]
        width = 2 * self.dim if kind == "both" else self.dim
        if isinstance(queries, np.ndarray) and queries.ndim == 2 and queries.shape[1] in (self.dim, width):
            return self._normalized(queries, kind)
        vectors, images, slots = [None] * len(queries), [], []  # images: PIL, or pixels from a file
        for i, query in enumerate(queries):
            if isinstance(query, np.ndarray) and query.ndim == 1:
                if query.shape[0] not in (self.dim, width):
                    raise QueryError(f"query vector has {query.shape[0]} dimensions, the library {self.dim}")
                vectors[i] = np.tile(query, width // query.shape[0]) if query.shape[0] != width else query
            elif isinstance(query, np.ndarray) and query.ndim == 3 and query.dtype == np.uint8:
                images.append(Image.fromarray(query))
                slots.append(i)
            elif isinstance(query, Image.Image):
                images.append(query)
                slots.append(i)
            elif isinstance(query, (str, os.PathLike)):
                images.append(self._read_query(query))  # pixels (None without an encoder)
                slots.append(i)
            else:
                raise QueryError(f"unsupported query of type {type(query).__name__}")
        if images:
            if self.encoder is None:
                raise QueryError("image queries need the library's model: pass its encoder (encoder=)")
            spec = self.encoder.input_spec
            embedded = self.encoder.embed_pixels(
                np.stack([spec.pixels(im) if isinstance(im, Image.Image) else im for im in images]))
            chosen = np.hstack((embedded.cls, embedded.patch)) if kind == "both" else getattr(embedded, kind)
            for slot, vector in zip(slots, chosen):
                vectors[slot] = vector
        return self._normalized(np.stack(vectors), kind)

    def _read_query(self, path) -> np.ndarray | None:
        """A query file's pixels through the indexer's own path (`load_pixels`: regular files only,
        size and pixel caps, format allowlist, EXIF orientation, the encoder's decode size): the same
        file gives the same vector as when it was indexed, and a FIFO or device is refused instead
        of blocking. Without an encoder the file is still read, so an unreadable one is named first."""
        try:
            if self.encoder is None:
                read_image(path)  # checked only: nothing is embedded without an encoder
                return None
            return load_pixels(path, self.encoder.input_spec)[1]
        except DecodeError as e:
            raise QueryError(f"cannot read query image {os.fsdecode(path)}: {e.reason}") from e

    def _normalized(self, vectors: np.ndarray, kind: str) -> np.ndarray:
        if kind != "both":
            return _unit(vectors)
        if vectors.shape[1] == self.dim:
            vectors = np.hstack((vectors, vectors))
        return np.hstack((_unit(vectors[:, : self.dim]), _unit(vectors[:, self.dim :])))

    def row_vector(self, path_or_id, kind: str) -> tuple[int, np.ndarray]:
        """(id, vector) of an indexed image, by id or path (absolute or relative to the root)."""
        if isinstance(path_or_id, (int, np.integer)):
            found = self.library.catalog.row_vectors(row_id=int(path_or_id))
        else:
            found = self.library.catalog.row_vectors(path=self._relative(path_or_id))
        if found is None:
            raise QueryError(f"{path_or_id} is not an embedded image of this library")
        row_id, (cls, patch) = found[0], (found[1]["cls"], found[1]["patch"])
        vector = {"cls": cls, "patch": patch, "both": np.concatenate((cls, patch))}[kind]
        return row_id, self._normalized(vector[None], kind)[0]

    def _relative(self, path) -> bytes:
        raw = os.fsencode(under_root(self.library.root, path))
        root = os.fsencode(self.library.root)
        return os.path.normpath(os.path.relpath(os.path.realpath(raw) if os.path.exists(raw) else raw, root))

    # ---- search -------------------------------------------------------------------------------
    def search(self, query, k: int = 10, kind: str = "cls", filters: Filters | None = None, **filter_args) -> list[Hit]:
        """The k most similar images to one query (path, PIL image, image array, or vector)."""
        return self.search_batch([query] if not (isinstance(query, np.ndarray) and query.ndim == 2) else query,
                                 k, kind, filters, **filter_args)[0]

    def similar(self, path_or_id, k: int = 10, kind: str = "cls", filters: Filters | None = None, **filter_args) -> list[Hit]:
        """Images most similar to an indexed one (itself excluded)."""
        row_id, vector = self.row_vector(path_or_id, kind)
        hits = self.search_batch(vector[None], k + 1, kind, filters, **filter_args)[0]
        return [h for h in hits if h.id != row_id][:k]

    def search_batch(self, queries, k: int = 10, kind: str = "cls", filters: Filters | None = None, **filter_args) -> list[list[Hit]]:
        """One list of hits per query; queries as for `search`, or an (n, D) array of vectors."""
        if kind not in KIND_CHOICES:
            raise InvalidArgumentError(f"must be one of {', '.join(KIND_CHOICES)}, got {kind!r}", argument="kind")
        if k < 1:
            raise InvalidArgumentError(f"must be at least 1, got {k}", argument="k")
        filters = filters or Filters(**filter_args)
        vectors = self.vectors_for(queries, kind)
        scores, ids = self._search_vectors(vectors, k, kind, filters)
        return self._hits(scores, ids, k)

    def _search_vectors(self, vectors: np.ndarray, k: int, kind: str, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        allowed = self.library.catalog.filtered_ids(filters) if filters.active() else None
        if kind == "both" or (allowed is not None and len(allowed) <= EXACT_FILTER_LIMIT):
            return self._exact(vectors, k, kind, allowed)
        index = self.indexes[kind]
        # Over-fetch a little: hits of rows deleted since the index was loaded are dropped later.
        extra = k + OVERFETCH
        if allowed is None:
            return index.search(vectors, extra)
        return index.search_subset(vectors, extra, allowed)

    def _exact(self, vectors: np.ndarray, k: int, kind: str, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the catalog's own vectors (the source of truth); "both" averages the
        CLS and patch similarities."""
        if kind == "both":
            ids, (cls, patch) = self.library.catalog.vector_sets(("cls", "patch"), allowed)
            scores = (vectors[:, : self.dim] @ cls.T + vectors[:, self.dim :] @ patch.T) / 2  # (n, N)
        else:
            ids, matrix = self.library.catalog.vectors(kind, allowed)
            scores = vectors @ matrix.T  # (n, N)
        n = min(k, scores.shape[1])
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n] if n else np.zeros((len(vectors), 0), int)
        order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, 1)
        out_ids = np.full((len(vectors), k), -1, np.int64)
        out_scores = np.full((len(vectors), k), -np.inf, np.float32)
        out_ids[:, :n] = ids[top]
        out_scores[:, :n] = np.take_along_axis(scores, top, 1)
        return out_scores, out_ids

    def _hits(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[Hit]]:
        """The first k live rows of each result list, with their metadata."""
        rows: dict[int, tuple] = {}
        looked_up: set[int] = set()
        # Look up each query's first k ids; the over-fetched ones only where some of those are gone.
        for width in (k, ids.shape[1]):
            part = ids[:, :width]
            if width > k:
                short = [i for i, row in enumerate(part[:, :k].tolist()) if sum(r in rows for r in row) < k]
                part = part[short]
            wanted = [i for i in np.unique(part[part >= 0]).tolist() if i not in looked_up]
            rows.update(self._rows(wanted))
            looked_up.update(wanted)
        results = []
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
            hits = []
            for score, row_id in zip(row_scores, row_ids):
                found = rows.get(row_id)
                if found is not None:  # deleted rows (and FAISS's -1 padding) never come back
                    hits.append(Hit(row_id, found[1], min(1.0, max(-1.0, score)), found[0], found[2]))  # float16 rounding
                    if len(hits) == k:
                        break
            results.append(hits)
        return results

    def _rows(self, wanted: list[int]) -> dict[int, tuple]:
        """id -> (raw path, printable path, metadata) for the embedded rows among `wanted`."""
        rows = {}
        for row_id, raw, text, width, height, size, fmt, captured, camera in self.library.catalog.hit_rows(wanted):
            rows[row_id] = (raw, text, {"width": width, "height": height, "bytes": size, "format": fmt,
                                        "captured_at": captured, "camera": camera})
        return rows


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise QueryError("a query vector is all zeros")
    return np.ascontiguousarray(vectors / norms)


def open_library(
    root: str | Path,
    *,
    folder: str | Path | None = None,
    url: str | None = None,
    model: str | None = None,
    weights: str | Path | None = None,
    device: str = "cpu",
    precision: str = "auto",
    load_model: bool = False,
) -> LibrarySearch:
    """Open a library for searching. An encoder for image queries is loaded when `model`/`weights`
    name one (it must be the library's), or with `load_model=True` the one the library recorded
    (its weights path or Hub repo, and its preprocessing). Without either, searches take vectors
    and `similar` works, with no model loaded."""
    library = Library.open(Path(root).expanduser(), folder=folder, url=url)
    try:
        encoder, manifest = None, library.manifest()
        if (model or weights or load_model) and manifest is not None:  # none: not indexed yet, said below
            from dinoseek.model import encoder_for_library

            encoder = encoder_for_library(manifest, weights or model, root=library.root, device=device,
                                          precision=precision)
        return LibrarySearch(library, encoder, owns_library=True)  # closed with it
    except BaseException:
        library.close()
        raise
