"""The background gallery in memory: L2-normalised retrieval embeddings of geotagged photos, grouped by
cell, and the exact within-cell search over them. The files are :mod:`geoswc.gallery_files`."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from .errors import ArtifactError, InputError

CHUNK_ROWS = 1 << 16
"""Rows scored (and written) at a time."""
_MARGIN = 2.0**-8
"""Score margin (in units of ``|q| * max row norm``) that covers the float16 kernel's rounding."""


@dataclass(frozen=True)
class GalleryIdentity:
    """What a gallery was built with: the model that embedded it and the cell table that groups it."""

    model_fingerprint: str
    cells_fingerprint: str
    num_cells: int


class RowChecker(Protocol):
    """Verifies embedding rows against their checksums before a search reads them (memory-mapped indexes)."""

    def span(self, start: int, stop: int) -> None: ...

    def rows(self, rows: NDArray[np.int64]) -> None: ...


def item_key(text: str) -> int:
    """64-bit hash of an image id or author name, for the sorted lookup tables."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def lookup_table(keys: NDArray[np.uint64], valid: NDArray[np.bool_] | None = None
                 ) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Sorted ``(keys, rows)`` for binary-search lookups; rows where ``valid`` is False are left out."""
    rows = np.arange(len(keys), dtype=np.int64) if valid is None else np.flatnonzero(valid).astype(np.int64)
    k = keys[rows]
    order = np.argsort(k, kind="stable")
    return k[order], rows[order]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on the calling thread only (torch's thread count is per thread with OpenMP).

    A query's matrix-vector product is memory-bound and small; waking a second thread costs more than it
    saves, up to a whole scheduler slice (~8 ms) on a busy machine. Concurrent queries give the parallelism.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class Gallery:
    """Embeddings ``(N, D)`` float16 with positions ``(N,)``, cells ``(N,)`` (-1: no cell), ids and authors.

    Rows are grouped by cell, so a cell is the contiguous slice :meth:`cell_range`. Search scores rows with a
    float16 kernel and re-ranks the survivors in float32: the exact float32 top-k over the stored vectors.
    Make one with :meth:`build` (or load one with :func:`geoswc.gallery_files.load_gallery`).
    """

    embeddings: NDArray[np.float16]
    lat: NDArray[np.float64]
    lon: NDArray[np.float64]
    cell: NDArray[np.integer]
    names: Sequence[str]
    authors: Sequence[str]
    identity: GalleryIdentity
    offsets: NDArray[np.int64]
    """``(num_cells + 1,)``: cell ``c`` holds rows ``offsets[c] .. offsets[c + 1] - 1``."""
    name_lookup: tuple[NDArray[np.uint64], NDArray[np.int64]]
    author_lookup: tuple[NDArray[np.uint64], NDArray[np.int64]]
    max_norm: float = 1.0
    checker: RowChecker | None = field(default=None, repr=False)
    source: str = ""
    """The index folder it was loaded from ("" for one built in memory), for messages."""

    @classmethod
    def build(cls, embeddings: ArrayLike, lat: ArrayLike, lon: ArrayLike, cell: ArrayLike, names: Sequence[str],
              authors: Sequence[str], identity: GalleryIdentity) -> Gallery:
        """A gallery of ``N`` photos in any order: rows are regrouped by cell (stably)."""
        emb, cell = np.asarray(embeddings), np.asarray(cell, np.int64)
        n = len(names)
        if emb.ndim != 2:
            raise InputError(f"gallery embeddings must be (N, D), got shape {emb.shape}")
        if not len(emb) == len(lat) == len(lon) == len(cell) == n == len(authors):
            raise InputError("gallery arrays have different lengths")
        if n and (cell.min() < -1 or cell.max() >= identity.num_cells):
            raise ArtifactError(f"gallery cells must lie in [-1, {identity.num_cells}); rebuild the index")
        order = np.argsort(cell, kind="stable")
        emb16 = np.ascontiguousarray(emb[order], dtype=np.float16)
        names, authors = [names[i] for i in order], [authors[i] for i in order]
        norms = np.linalg.norm(emb16.astype(np.float32), axis=1)
        return cls(emb16, np.asarray(lat, np.float64)[order], np.asarray(lon, np.float64)[order], cell[order],
                   names, authors, identity,
                   offsets=np.searchsorted(cell[order], np.arange(identity.num_cells + 1)).astype(np.int64),
                   name_lookup=lookup_table(np.array([item_key(s) for s in names], np.uint64)),
                   author_lookup=lookup_table(np.array([item_key(s) for s in authors], np.uint64),
                                              np.array([bool(a) for a in authors], bool)),
                   max_norm=float(norms.max()) if n else 1.0)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def model_fingerprint(self) -> str:
        return self.identity.model_fingerprint

    def cell_range(self, cell: int) -> tuple[int, int]:
        """``(start, stop)``: the rows of ``cell`` are ``start .. stop - 1`` (empty if unknown)."""
        if not 0 <= cell < self.identity.num_cells:
            return 0, 0
        return int(self.offsets[cell]), int(self.offsets[cell + 1])

    def cell_rows(self, cell: int) -> NDArray[np.int64]:
        """Rows of the gallery photos inside ``cell``."""
        return np.arange(*self.cell_range(cell), dtype=np.int64)

    def cell_sizes(self) -> NDArray[np.int64]:
        return np.diff(self.offsets)

    def rows_view(self, start: int, stop: int) -> NDArray[np.float16]:
        """Embedding rows ``[start, stop)``, verified against their checksums on first read."""
        if self.checker is not None:
            self.checker.span(start, stop)
        return self.embeddings[start:stop]

    def excluded_rows(self, names: Iterable[str] = (), authors: Iterable[str] = ()) -> NDArray[np.int64]:
        """Rows to hide from a query: the named photos and every photo of the named authors."""
        parts = [np.zeros(0, np.int64)]
        for values, (keys, rows), column in ((names, self.name_lookup, self.names),
                                             (authors, self.author_lookup, self.authors)):
            for v in values:
                if not v:
                    continue
                k = np.uint64(item_key(v))
                hit = rows[np.searchsorted(keys, k, "left"):np.searchsorted(keys, k, "right")]
                parts.append(np.array([r for r in hit if column[int(r)] == v], np.int64))
        return np.unique(np.concatenate(parts))

    # -- search ---------------------------------------------------------------------------------------

    def search(self, query: ArrayLike, k: int, rows: NDArray[np.int64] | None = None,
               exclude: NDArray[np.int64] | None = None) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Top-``k`` rows by cosine similarity (higher is better), most similar first; exact.

        Args:
            query: ``(D,)`` unit vector.
            rows: candidate rows (e.g. :meth:`cell_rows`); None searches the whole gallery.
            exclude: rows never returned (leakage guard).

        Returns:
            ``(rows (k',), similarities (k',))`` with ``k' <= k``.
        """
        if rows is None:
            return self._search(query, k, [(0, len(self))], None, exclude)
        rows = np.asarray(rows, np.int64)
        contiguous = rows.size == 0 or int(rows[-1]) - int(rows[0]) + 1 == rows.size and bool(
            (np.diff(rows) == 1).all())
        segments = ([(int(rows[0]), int(rows[-1]) + 1)] if rows.size else []) if contiguous else None
        return self._search(query, k, segments, rows, exclude)

    def search_cells(self, query: ArrayLike, k: int, cells: Iterable[int],
                     exclude: NDArray[np.int64] | None = None) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Like :meth:`search` over the union of ``cells`` (e.g. the chosen cell and its neighbours)."""
        segments = sorted({self.cell_range(int(c)) for c in cells})
        return self._search(query, k, [s for s in segments if s[1] > s[0]], None, exclude)

    def _approx_scores(self, q16: torch.Tensor, start: int, stop: int) -> NDArray[np.float32]:
        """float16-kernel scores of rows ``[start, stop)`` (error well under ``_MARGIN``)."""
        out = np.empty(stop - start, np.float32)
        for s in range(start, stop, CHUNK_ROWS):
            e = min(stop, s + CHUNK_ROWS)
            out[s - start:e - start] = torch.mv(torch.from_numpy(self.rows_view(s, e)), q16).float().numpy()
        return out

    def _gather(self, rows: NDArray[np.int64]) -> NDArray[np.float16]:
        if self.checker is not None and rows.size:
            self.checker.rows(rows)
        return self.embeddings[rows]

    def _search(self, query: ArrayLike, k: int, segments: list[tuple[int, int]] | None,
                rows: NDArray[np.int64] | None, exclude: NDArray[np.int64] | None
                ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Search ``segments`` (row ranges), or the scattered ``rows`` when ``segments`` is None."""
        q = np.asarray(query, np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise InputError(f"query has {q.shape[0]} dimensions, the gallery {self.dim}")
        empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
        qnorm = float(np.linalg.norm(q))
        if k <= 0 or len(self) == 0 or not np.isfinite(qnorm) or segments == []:
            return empty
        q16 = torch.from_numpy(q / qnorm if qnorm > 0 else q).half()
        with _one_thread():
            if segments is None:
                cand = np.asarray(rows, np.int64)
                approx = torch.mv(torch.from_numpy(self._gather(cand)), q16).float().numpy() if cand.size else \
                    np.zeros(0, np.float32)
            else:
                cand = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in segments])
                approx = np.concatenate([self._approx_scores(q16, a, b) for a, b in segments])
        if exclude is not None and exclude.size:
            approx[np.isin(cand, exclude)] = -np.inf
        valid = int(np.isfinite(approx).sum())
        if valid == 0:
            return empty
        keep = np.isfinite(approx)
        if valid > k:
            kth = np.partition(approx, approx.size - k)[approx.size - k]
            keep = approx >= kth - _MARGIN * max(self.max_norm, 1.0)
        cand = cand[keep]
        exact = self._gather(cand).astype(np.float32) @ q
        order = np.lexsort((cand, -exact))[:k]
        return cand[order], exact[order]
