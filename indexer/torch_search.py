"""Exact inner-product search as torch matrix products: FAISS's Flat search on a CUDA machine
without faiss-gpu.

`TorchExactIndex` holds (ids, vectors) on a device and answers `search` and `range_search` in
FAISS's formats, block by block: a block of queries times a tile of the stored vectors is one
matrix product; top-k lists are merged across tiles. Block and tile sizes follow the free GPU
memory (`torch.cuda.mem_get_info`), so any size fits; out of memory all the same, they are halved
and the block is run again.

Precision. On CUDA the vectors are kept and multiplied in float16 (the catalog stores them as
float16, so nothing is lost keeping them); the products err by ~1e-3 (the query rounded to float16,
float16 output). So these scores only pick candidates: `search` takes RESCORE_EXTRA more than k,
`range_search` everything down to FP16_SLACK below the radius, and each candidate is re-scored in
float32 (the stored row upcast, times the float32 query) before the final order and threshold. The
results are FAISS's up to float32 rounding, except that a neighbour within ~1e-3 of the k-th can
still be swapped with it. On the CPU (tests, `DINOSEEK_TORCH_SEARCH=cpu`) the same code runs in
float32.

Where it is used (`search_device`): CUDA present and faiss-gpu absent, unless the environment
variable DINOSEEK_TORCH_SEARCH says otherwise: `auto` (default), `cuda` (torch even where faiss-gpu
is installed), `cpu` (torch on the CPU: slower than FAISS, for tests), `off` (FAISS always).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .errors import InvalidArgumentError, first_line

log = logging.getLogger(__name__)

ENV = "DINOSEEK_TORCH_SEARCH"
# Under this many vectors `auto` searches a library's exact index with FAISS on the CPU (dedup, which
# compares every pair, still runs on the GPU).
AUTO_MIN_VECTORS = 50_000
SETTINGS = ("auto", "cuda", "cpu", "off")

RESCORE_EXTRA = 16  # candidates beyond k taken on float16 scores, all re-scored in float32
FP16_SLACK = 0.01  # range search: float16 scores err by ~1e-3; look this far below the radius
FP32_SLACK = 1e-4  # the same in float32 (summation order only)
FP16_MAX_NORM = 16.0  # float16 tops out at 65504: vectors up to this norm never overflow a product
RESIDENT_FRACTION = 0.5  # vectors stay on the GPU when they take at most this part of its free memory
WORK_FRACTION = 0.3  # of the free GPU memory, for one block's scores and what top-k / nonzero need
CPU_WORK_BYTES = 256 << 20  # the same on the CPU (a fixed budget: host memory is not asked)
SCORE_BYTES = 8  # work memory per score: the score, a mask or top-k workspace, an index (generous)
QUERY_ROWS = 8192  # queries per block at most: larger blocks no longer speed the products up
MIN_TILE = 4096  # below this many stored rows per tile, the query block shrinks instead
PAIR_ROWS = 1 << 16  # range-search candidates re-scored at a time (each gathers one stored row)
PAD_SCORE = np.float32(-np.finfo(np.float32).max)  # what FAISS pads inner-product results with


def search_device(faiss_gpu: bool, count: int | None = None) -> torch.device | None:
    """The device exact searches run on through torch, or None for FAISS. `faiss_gpu`: whether
    faiss-gpu and a GPU are present (then FAISS's GPU indexes are used, unless the setting is `cuda`).
    `count`: the vectors of the index to search; under AUTO_MIN_VECTORS `auto` leaves it to FAISS on
    the CPU, which scans 50k vectors in a fraction of what it scans 1M in (4.7 ms a query at batch 1,000
    on an H200 machine's 16 cores, measured), before CUDA has even started."""
    setting = os.environ.get(ENV, "").strip().lower() or "auto"
    if setting not in SETTINGS:
        raise InvalidArgumentError(f"{ENV} must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == "off" or (setting == "auto" and (faiss_gpu or (count is not None and count < AUTO_MIN_VECTORS))):
        return None
    if setting == "cpu":
        return torch.device("cpu")
    return _cuda_device()


@functools.cache
def _cuda_device() -> torch.device | None:
    """The current CUDA device, or None (asked once: every search asks)."""
    try:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
    except RuntimeError as e:  # a driver that loads but does not work
        log.warning("CUDA unusable, exact search stays on FAISS: %s", first_line(e))
    return None


def _max_norm(vectors: np.ndarray, rows: int = 1 << 16) -> float:
    """The largest row norm, a slice at a time (no float32 copy of a whole float16 array)."""
    return max((float(np.linalg.norm(vectors[lo:lo + rows].astype(np.float32), axis=1).max())
                for lo in range(0, len(vectors), rows)), default=0.0)


class TorchExactIndex:
    """Exact inner-product search over (ids, vectors) with torch on `device` (see the module doc).

    `query_rows` / `tile_rows` fix the block sizes (tests); by default they follow free memory.
    `half`: float16 storage and products (default: on CUDA, for vectors short enough; tests ask for
    it on the CPU to check the re-scoring).
    `resident`: keep the vectors on the device (default: where they fit in RESIDENT_FRACTION of its
    free memory); otherwise they stay in pinned host memory and are copied over a tile at a time.
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, device: torch.device | str, *,
                 query_rows: int | None = None, tile_rows: int | None = None, resident: bool | None = None,
                 half: bool | None = None) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise InvalidArgumentError(f"need one id per vector row, got {len(ids)} ids for an array of shape "
                                       f"{vectors.shape}")
        self.device = torch.device(device)
        self.dim = vectors.shape[1]
        self._ids = ids
        self._query_rows = query_rows
        self._tile_rows = tile_rows
        self._scale = 1.0  # halved on each out-of-memory error: blocks get smaller from then on
        on_cuda = self.device.type == "cuda"
        if half is None:
            half = on_cuda and _max_norm(vectors) <= FP16_MAX_NORM
        self.dtype = torch.float16 if half else torch.float32
        dtype = np.float16 if half else np.float32
        # Searched in place on the CPU: a copy of its own. On CUDA the move to the device (or into
        # pinned memory) copies anyway.
        host = torch.from_numpy(np.ascontiguousarray(vectors, dtype) if on_cuda else np.array(vectors, dtype))
        if not on_cuda:
            self.resident = True
            self._data = host
            return
        if resident is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            resident = host.numel() * host.element_size() <= RESIDENT_FRACTION * free
        self.resident = resident
        if resident:
            self._data = host.to(self.device)
        else:
            log.info("%d vectors do not fit on %s: searched in tiles copied from host memory", len(ids), self.device)
            try:
                self._data = host.pin_memory()  # page-locked: the tile copies run asynchronously
            except RuntimeError:
                self._data = host

    @property
    def count(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids

    def blocks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) of the stored rows, `size` at a time, in the order they were given."""
        for lo in range(0, self.count, size):
            yield self._ids[lo:lo + size], self._data[lo:lo + size].float().cpu().numpy()

    # ---- FAISS's two searches ----------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k), best first, as FAISS's IndexFlatIP: float32 inner products
        and int64 ids, padded with -FLT_MAX and -1 beyond the stored count."""
        if k < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {k}")
        queries = self._checked(queries)
        scores = np.full((len(queries), k), PAD_SCORE, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if not len(queries) or not self.count:
            return scores, ids
        fetch = min(self.count, k + RESCORE_EXTRA)
        width = min(k, self.count)

        def run(block: torch.Tensor, tile_rows: int):
            return self._search_block(block, fetch, tile_rows)

        for lo, hi, (best, positions) in self._in_blocks(queries, run):
            scores[lo:hi, :width] = best[:, :width].cpu().numpy()
            ids[lo:hi, :width] = self._ids[positions[:, :width].cpu().numpy()]
        return scores, ids

    def range_search(self, queries: np.ndarray, threshold: float,
                     nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lims, scores, ids) as FAISS's range_search: the results of query i are
        scores/ids[lims[i]:lims[i + 1]], every stored vector with inner product above `threshold`
        (strictly, as FAISS), in stored order. `nprobe` is accepted and ignored (exact search)."""
        queries = self._checked(queries)
        radius = float(threshold)
        counts = np.zeros(len(queries), np.int64)
        found_scores, found_ids = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
        if len(queries) and self.count:
            def run(block: torch.Tensor, tile_rows: int):
                return self._range_block(block, radius, tile_rows)

            for lo, hi, (rows, positions, scores) in self._in_blocks(queries, run):
                rows = rows.cpu().numpy()
                counts[lo:hi] = np.bincount(rows, minlength=hi - lo)
                found_scores.append(scores.cpu().numpy())
                found_ids.append(self._ids[positions.cpu().numpy()])
        lims = np.zeros(len(queries) + 1, np.uint64)  # FAISS's lims are size_t
        lims[1:] = np.cumsum(counts)
        return lims, np.concatenate(found_scores), np.concatenate(found_ids)

    # ---- one block of queries ---------------------------------------------------------------------
    def _search_block(self, queries: torch.Tensor, fetch: int, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 scores, stored positions), each (B, fetch), best first, for queries (B, D)."""
        lowered = self._lowered(queries)
        best = positions = None
        for start, tile in self._tiles(tile_rows):
            scores = lowered @ tile.to(lowered.dtype).T  # (B, T); a too-long query upcasts the tile
            top, where = torch.topk(scores, min(fetch, scores.shape[1]), dim=1)
            where = where + start
            if best is not None:  # merge with the best of the tiles before
                top, where = torch.cat((best, top), 1), torch.cat((positions, where), 1)
                if top.shape[1] > fetch:
                    top, order = torch.topk(top, fetch, dim=1)
                    where = where.gather(1, order)
            best, positions = top, where
        exact = torch.empty(positions.shape, dtype=torch.float32, device=self.device)  # (B, fetch)
        step = max(1, PAIR_ROWS // positions.shape[1])  # queries re-scored at a time: one stored row per pair
        for lo in range(0, len(queries), step):
            wanted = positions[lo:lo + step]
            exact[lo:lo + step] = (self._rows(wanted.reshape(-1)).view(*wanted.shape, self.dim)
                                   * queries[lo:lo + step, None, :]).sum(-1)
        exact, order = torch.sort(exact, dim=1, descending=True, stable=True)
        return exact, positions.gather(1, order)

    def _range_block(self, queries: torch.Tensor, radius: float,
                     tile_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query rows, stored positions, float32 scores) of every pair above `radius`, ordered by
        query row, then stored position."""
        lowered = self._lowered(queries)
        floor = radius - (FP16_SLACK if lowered.dtype == torch.float16 else FP32_SLACK)
        rows, positions = [], []
        for start, tile in self._tiles(tile_rows):
            r, c = torch.nonzero(lowered @ tile.to(lowered.dtype).T >= floor, as_tuple=True)  # candidates, row by row
            rows.append(r)
            positions.append(c + start)
        rows, positions = torch.cat(rows), torch.cat(positions)
        exact = torch.empty(len(rows), dtype=torch.float32, device=self.device)
        for lo in range(0, len(rows), PAIR_ROWS):
            hi = lo + PAIR_ROWS
            exact[lo:hi] = (self._rows(positions[lo:hi]) * queries[rows[lo:hi]]).sum(1)
        keep = exact > radius  # strictly, as FAISS's range search for inner products
        rows, positions, exact = rows[keep], positions[keep], exact[keep]
        order = torch.argsort(rows * self.count + positions)  # tiles gave each row's hits tile by tile
        return rows[order], positions[order], exact[order]

    # ---- helpers ------------------------------------------------------------------------------------
    def _checked(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidArgumentError(f"queries must be an (n, {self.dim}) array, got shape {queries.shape}")
        return queries

    def _lowered(self, queries: torch.Tensor) -> torch.Tensor:
        """The queries in the dtype products run in: the stored one, unless a query is too long for float16."""
        if self.dtype == torch.float16 and float(queries.norm(dim=1).max()) <= FP16_MAX_NORM:
            return queries.half()
        return queries

    def _tiles(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first position, stored rows on the device, in the product dtype), `rows` at a time."""
        for start in range(0, self.count, rows):
            tile = self._data[start:start + rows]
            if not self.resident:  # pinned host memory: the copy runs ahead of the product on the stream
                tile = tile.to(self.device, non_blocking=True)
            yield start, tile

    def _rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Stored rows at `positions` (on the device), float32 on the device."""
        if self.resident:
            return self._data[positions].float()
        return self._data[positions.cpu()].to(self.device).float()

    def _sizes(self, queries: int) -> tuple[int, int]:
        """(queries per block, stored rows per tile): the block's scores fit the work budget."""
        rows = min(queries, self._query_rows or QUERY_ROWS)
        if self._tile_rows:
            return max(1, int(rows * self._scale)), max(1, int(self._tile_rows * self._scale))
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # Memory torch's allocator keeps cached from the blocks before is free to us too: without
            # it, each block would see less than the one before and the tiles would keep shrinking.
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            budget = free * WORK_FRACTION
        else:
            budget = CPU_WORK_BYTES
        budget *= self._scale
        if budget < rows * MIN_TILE * SCORE_BYTES:  # too many queries for a useful tile: fewer of them
            rows = max(1, int(budget // (MIN_TILE * SCORE_BYTES)))
        return rows, int(min(self.count, max(1, budget // (rows * SCORE_BYTES))))

    def _in_blocks(self, queries: np.ndarray, run: Callable[[torch.Tensor, int], tuple]) -> Iterator[tuple]:
        """(lo, hi, run(queries[lo:hi] on the device, tile rows)) block after block. Out of GPU
        memory (another process took some since the sizes were chosen), blocks are halved and the
        block is run again; down to one query and one row per tile, then the error stands."""
        lo = 0
        while lo < len(queries):
            rows, tile_rows = self._sizes(len(queries) - lo)
            try:
                with torch.no_grad():  # not inference_mode: the caller slices the results outside it
                    result = run(torch.from_numpy(queries[lo:lo + rows]).to(self.device), tile_rows)
            except torch.cuda.OutOfMemoryError:
                if rows == 1 and tile_rows == 1:
                    raise
                self._scale /= 2
                torch.cuda.empty_cache()
                log.info("out of GPU memory: searching in smaller blocks")
                continue
            yield lo, lo + rows, result
            lo += rows
