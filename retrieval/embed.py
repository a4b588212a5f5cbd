"""Embedding any number of image files, a batch at a time: paths in, vectors out, memory flat.

    from dinoseek.retrieval.embed import embed_paths, image_paths
    for batch in embed_paths(image_paths(["photos/", "extra.jpg"]), encoder, batch_size=32):
        for result in batch:                   # Embedded(path, cls, patch) or Skipped(path, status, reason)
            ...

Nothing here holds more than one batch: sources are expanded lazily (folders are walked by the
indexer's scanner as its results come; a path list is read line by line), each file is decoded by
the indexer's decoder (`load_pixels`: EXIF orientation, CMYK, 16-bit, allowlist, bomb and size
limits, regular files only) when its turn comes, and each batch's results are handed on before the
next file is read. A file that cannot be read becomes a `Skipped` with the decoder's status and
reason; it never ends the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dinoseek.indexer.decode import DecodeError, load_pixels
from dinoseek.indexer.scan import ScanEntry, scan
from dinoseek.model import Embedder, InputSpec
from dinoseek.model.progress import progress

from .errors import InvalidArgumentError

__all__ = ["Embedded", "Skipped", "VectorFolder", "embed_paths", "image_paths", "read_path_list"]


@dataclass(frozen=True, eq=False)
class Embedded:
    path: bytes  # as given or as found under a given folder, raw bytes (names need not be UTF-8)
    cls: np.ndarray  # (D,) float32, unit norm
    patch: np.ndarray  # (D,) float32, unit norm

    def to_dict(self) -> dict:
        # fsdecode keeps undecodable bytes as lone surrogates, which JSON writes as \udcXX escapes:
        # os.fsencode(json.loads(line)["path"]) gives the exact bytes back.
        return {"path": os.fsdecode(self.path), "cls": self.cls.tolist(), "patch": self.patch.tolist()}


@dataclass(frozen=True)
class Skipped:
    path: bytes
    status: str  # the decoder's or scanner's status: "unidentified", "unreadable", "unsupported", "linked", ...
    reason: str

    def to_dict(self) -> dict:
        return {"path": os.fsdecode(self.path), "status": self.status, "error": self.reason}


Result = Embedded | Skipped


def read_path_list(stream: BinaryIO, *, null: bool = False) -> Iterator[bytes]:
    """The paths in a list file, one per line (or NUL-separated with `null`, as `find -print0`
    writes them), read as they arrive: a list from a pipe starts embedding before it ends.

    Bytes, so any file name survives. A trailing carriage return is dropped (lists written on
    Windows); empty entries are skipped.
    """
    if not null:
        for line in stream:
            path = line.rstrip(b"\n").removesuffix(b"\r")
            if path:
                yield path
        return
    rest = b""
    while chunk := stream.read1(1 << 16) if hasattr(stream, "read1") else stream.read(1 << 16):
        *paths, rest = (rest + chunk).split(b"\0")
        yield from (p for p in paths if p)
    if rest:
        yield rest


def image_paths(sources: Iterable[bytes | str | os.PathLike], *, follow_symlinks: bool = False
                ) -> Iterator[bytes | Skipped]:
    """Each source in turn: a folder becomes the image files under it, found as `dinoseek index`
    finds them (indexer.scan: image extensions, extension-less files by content, hidden folders
    skipped, each file once however many links lead to it); what the scanner refuses (PSD, RAW,
    unreadable folders, second links) comes out as `Skipped`. Any other path is yielded as it is:
    a file named explicitly is the decoder's to accept or refuse, whatever its extension.

    Memory: the scanner remembers only files a second path could reach (hard links, followed
    symlinks, bind mounts), so walking a folder costs nothing per ordinary file."""
    for source in sources:
        raw = os.fsencode(source)
        if not os.path.isdir(raw):
            yield raw
            continue
        for item in scan(raw, follow_symlinks=follow_symlinks):
            path = os.path.join(raw, item.rel) if item.rel else raw
            yield path if isinstance(item, ScanEntry) else Skipped(path, item.status, item.reason)


def embed_paths(items: Iterable[bytes | str | os.PathLike | Skipped], encoder: Embedder, batch_size: int = 32,
                *, total: int | None = None) -> Iterator[list[Result]]:
    """One list of results per `batch_size` inputs, in input order: each path decoded, then the
    batch's images embedded in one `embed_pixels` call. Skipped inputs pass through in place.

    At most one batch of pixels exists at a time: a run over 100,000 files needs what a run over
    100 does (the caller writes each batch out before asking for the next). Progress is reported
    once per batch, as "embed" (`total`: the number of inputs, where known up front).
    """
    if batch_size < 1:  # checked here, on the call, not on the first next()
        raise InvalidArgumentError(f"must be at least 1, got {batch_size}", argument="batch_size")
    return _batches(items, encoder, batch_size, total)


def _batches(items: Iterable, encoder: Embedder, batch_size: int, total: int | None) -> Iterator[list[Result]]:
    with progress(total, "embed", unit="files") as step:
        batch: list[Skipped | _Pixels] = []
        for item in items:
            batch.append(item if isinstance(item, Skipped) else _decode(os.fsencode(item), encoder.input_spec))
            if len(batch) >= batch_size:
                yield _embed(batch, encoder)
                step.update(len(batch))  # the one progress update: after the caller has written the batch
                batch = []
        if batch:
            yield _embed(batch, encoder)
            step.update(len(batch))


@dataclass(frozen=True)
class _Pixels:
    path: bytes
    pixels: np.ndarray  # (size, size, 3) uint8, as `load_pixels` makes them for the indexer


def _decode(path: bytes, spec: InputSpec) -> _Pixels | Skipped:
    try:
        return _Pixels(path, load_pixels(path, spec)[1])
    except DecodeError as e:
        return Skipped(path, e.status, e.reason)
    except Exception as e:  # noqa: BLE001 - as in the indexer: one bad file must never end the run
        return Skipped(path, "crashed", f"decoder error: {type(e).__name__}: {e}")


def _embed(batch: list[Skipped | _Pixels], encoder: Embedder) -> list[Result]:
    decoded = [item for item in batch if isinstance(item, _Pixels)]
    if not decoded:
        return list(batch)
    vectors = encoder.embed_pixels(np.stack([item.pixels for item in decoded]))  # (B, S, S, 3) uint8
    embedded = iter([Embedded(item.path, cls, patch) for item, cls, patch in zip(decoded, vectors.cls, vectors.patch)])
    return [item if isinstance(item, Skipped) else next(embedded) for item in batch]


class VectorFolder:
    """The `--out` folder: `cls.npy` and `patch.npy`, (N, D) float32, and `paths.jsonl`, whose
    line i ({"path": ...}) names row i. Written a batch at a time; a valid result after every batch.

    Why this layout. An .npz is a zip of complete .npy members, so it can only be written once
    every vector is known: all of them in memory, and nothing left of a run killed at 99%. A plain
    .npy is a header and then raw rows, so rows can be appended and the header's row count
    rewritten in place (numpy pads the header for exactly this: its length does not change as the
    count grows). After each batch the arrays open with `np.load(..., mmap_mode="r")` — also while
    the run goes on — and keep what a killed run finished. Paths go in a JSON Lines file because
    file names may hold newlines or undecodable bytes; JSON escapes both losslessly.

    Per batch the rows are appended and both headers updated before the paths: after a kill the
    arrays may hold more rows than paths.jsonl has lines, never fewer — read `len(paths)` rows.
    Existing files are never overwritten (opened with O_EXCL).
    """

    FILES = ("cls.npy", "patch.npy", "paths.jsonl")

    def __init__(self, folder: str | os.PathLike, dim: int) -> None:
        self.folder = Path(folder)
        self.check(self.folder)
        self.created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim, self.rows = dim, 0
        self.arrays = {}
        self.paths = None
        self.created: list[Path] = []  # the only files discard_if_empty may remove
        try:
            for kind in ("cls", "patch"):
                self.arrays[kind] = open(self.folder / f"{kind}.npy", "xb")  # noqa: SIM115 - held until close()
                self.created.append(self.folder / f"{kind}.npy")
                self._write_header(self.arrays[kind])
            # ASCII: json.dumps escapes everything else. Held until close().
            self.paths = open(self.folder / "paths.jsonl", "x", encoding="ascii")  # noqa: SIM115
            self.created.append(self.folder / "paths.jsonl")
        except BaseException:
            self.close()
            raise

    @classmethod
    def check(cls, folder: str | os.PathLike) -> None:
        """Refuse, before any work, an --out that is a file or already holds an earlier run's output."""
        folder = Path(folder)
        if folder.suffix.lower() in (".npz", ".npy"):
            raise InvalidArgumentError(f"must be a folder (cls.npy, patch.npy and paths.jsonl are written into it), "
                                       f"not a {folder.suffix} file: {folder}", argument="out")
        if folder.exists() and not folder.is_dir():
            raise InvalidArgumentError(f"must be a folder, and {folder} is a file", argument="out")
        taken = [name for name in cls.FILES if (folder / name).exists() or (folder / name).is_symlink()]
        if taken:
            raise InvalidArgumentError(f"{folder} already holds {', '.join(taken)}; choose another folder or remove "
                                       "them", argument="out")

    def append(self, results: Iterable[Result]) -> int:
        """Write the embedded results among `results` (skipped ones have no row); returns how many."""
        embedded = [r for r in results if isinstance(r, Embedded)]
        if not embedded:
            return 0
        for kind, file in self.arrays.items():
            rows = np.stack([getattr(r, kind) for r in embedded]).astype("<f4", copy=False)  # (B, D)
            if rows.shape[1] != self.dim:
                raise InvalidArgumentError(f"vectors of dimension {rows.shape[1]} do not fit a {self.dim}-d folder")
            file.seek(0, os.SEEK_END)
            file.write(rows.tobytes())
        self.rows += len(embedded)
        for file in self.arrays.values():
            file.flush()
            self._write_header(file)
            file.flush()
        self.paths.write("".join(json.dumps({"path": os.fsdecode(r.path)}) + "\n" for r in embedded))
        self.paths.flush()
        return len(embedded)

    def _write_header(self, file) -> None:
        file.seek(0)
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False,
                                                    "shape": (self.rows, self.dim)})
        if self.rows == 0:
            self.header_bytes = file.tell()
        # numpy reserves room for a growing row count; rows written after a shorter header would be
        # misread, so a header that changed length is a bug, not a user error.
        assert file.tell() == self.header_bytes, "the .npy header changed length"

    def close(self) -> None:
        for file in [*self.arrays.values(), self.paths]:
            if file is not None:
                file.close()

    def discard_if_empty(self) -> None:
        """Remove the files (and the folder, if this made it) of a run that embedded nothing, so
        the same --out can be used again. Only files this object created are touched."""
        if self.rows:
            return
        self.close()
        for path in self.created:
            path.unlink(missing_ok=True)
        if self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:  # something else was put there meanwhile: leave it
                pass

    def __enter__(self) -> VectorFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
