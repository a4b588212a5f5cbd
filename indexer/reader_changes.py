"""A reader's changes to an index whose lists live on disk, kept in memory beside it.

A reader that finds the catalog ahead of an on-disk IVF index (a run is writing, or was killed)
must bring it in line without writing in the library folder: the lists file is a checkpoint, and
the next generation's name may be the very file the writer has mapped (a reader's copy there once
overwrote it under the writer). So rows added since the checkpoint go into an in-memory IVF index
with the same trained quantizer and codec, and rows removed are hidden from the mapped one by an id
selector. Searches ask both with the same nprobe and merge: the results are those the reconciled
index would give. Memory: the added rows' codes, a copy of the quantizer and, once a row is
removed or ids() asked, the stored ids (8 bytes a row: 40 MB per kind at 5M).
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from . import ondisk


class ReaderChanges:
    """Rows added to and removed from a mapped IVF index `ivf` that must stay unwritten."""

    def __init__(self, ivf: faiss.IndexIVF, stored_ids: Callable[[], np.ndarray]) -> None:
        if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("reader changes merge inner-product results only")  # best = largest score
        self.added = ondisk.deserialize(faiss.serialize_index(ivf).tobytes(), skip_lists=True)
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        self.added.replace_invlists(lists, True)
        lists.this.disown()  # the index owns it now
        self.added.ntotal = 0
        self._read_stored = stored_ids  # the ids in the mapped lists (they never change)...
        self._stored: np.ndarray | None = None  # ...read on first need: ids() or a remove
        self.hidden = np.zeros(0, np.int64)  # of those, the ones removed

    @property
    def delta(self) -> int:
        """Rows the reader's view holds beyond the mapped index's."""
        return self.added.ntotal - len(self.hidden)

    def ids(self) -> np.ndarray:
        stored = self._stored_ids()
        parts = [np.setdiff1d(stored, self.hidden, assume_unique=True) if len(self.hidden) else stored]
        lists = self.added.invlists
        parts += [faiss.rev_swig_ptr(lists.get_ids(no), lists.list_size(no)).copy()
                  for no in range(lists.nlist) if lists.list_size(no)]
        return np.concatenate(parts).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.added.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        removed = int(self.added.remove_ids(faiss.IDSelectorBatch(ids)))
        stored = np.intersect1d(ids, self._stored_ids())
        newly = np.setdiff1d(stored, self.hidden, assume_unique=True)
        self.hidden = np.union1d(self.hidden, newly)
        return removed + len(newly)

    def _stored_ids(self) -> np.ndarray:
        if self._stored is None:
            self._stored = self._read_stored()
        return self._stored

    def search(self, mapped: faiss.IndexIVF, queries: np.ndarray, k: int, nprobe: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's (scores, ids) over both parts, best first (-1 pads), among `allowed` if given."""
        scores, ids = zip(*(index.search(queries, k, params=params) for index, params in
                            self._parts(mapped, nprobe, allowed)))
        scores, ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def range_search(self, mapped: faiss.IndexIVF, queries: np.ndarray, threshold: float,
                     nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FAISS's (lims, scores, ids) over both parts: each query's hits from the mapped index, then
        from the added rows."""
        parts = [index.range_search(queries, threshold, params=params)
                 for index, params in self._parts(mapped, nprobe, None)]
        owner = np.concatenate([np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
                                for lims, _, _ in parts])
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=len(queries))
        lims = np.concatenate([[0], np.cumsum(counts)]).astype(parts[0][0].dtype)
        return (lims, np.concatenate([d for _, d, _ in parts])[order], np.concatenate([i for _, _, i in parts])[order])

    def _parts(self, mapped: faiss.IndexIVF, nprobe: int, allowed: np.ndarray | None):
        """(index, search parameters) of the mapped part (removed rows hidden) and the added part."""
        visible = None if allowed is None else np.asarray(allowed, dtype=np.int64)
        if visible is not None:
            mapped_selector = faiss.IDSelectorBatch(np.setdiff1d(visible, self.hidden) if len(self.hidden) else visible)
        elif len(self.hidden):
            mapped_selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.hidden))
        else:
            mapped_selector = None
        added_selector = None if visible is None else faiss.IDSelectorBatch(visible)
        return [(mapped, _params(nprobe, mapped_selector)), (self.added, _params(nprobe, added_selector))]


def _params(nprobe: int, selector) -> faiss.SearchParametersIVF:
    # Passed to the constructor, the selector is kept alive by the parameters (faiss's wrapper keeps
    # a reference; assigned afterwards it would be a bare pointer).
    return faiss.SearchParametersIVF(nprobe=nprobe) if selector is None else \
        faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
