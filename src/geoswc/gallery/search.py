"""The background gallery: L2-normalised retrieval embeddings of geotagged photos, grouped by cell, and the
search within cells over them (FAISS's inverted lists, :mod:`geoswc.gallery.codes`). The files are
:mod:`geoswc.gallery.files`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from geoswc.core.errors import InputError
from geoswc.gallery.codes import CellLists

if TYPE_CHECKING:
    from geoswc.gallery.thumbnails import Thumbnails

CHUNK_ROWS = 1 << 16
"""Rows written (and coded) at a time."""


@dataclass(frozen=True)
class GalleryIdentity:
    """What a gallery was built with: the model that embedded it and the cell table that groups it."""

    model_fingerprint: str
    cells_fingerprint: str
    num_cells: int


class RowChecker(Protocol):
    """Verifies embedding rows against their checksums before a search reads them (memory-mapped indexes)."""

    def span(self, start: int, stop: int) -> None: ...

    def gather(self, rows: NDArray[np.int64]) -> NDArray[np.float16]:
        """The embeddings of ``rows`` ``(len(rows), D)``, checked."""
        ...


def item_key(text: str) -> int:
    """64-bit hash of an image id or author name, for the sorted lookup tables."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def item_keys(texts: Sequence[str], empty_is_zero: bool = False) -> NDArray[np.uint64]:
    """:func:`item_key` of each text ``(b,)`` in one pass (with ``empty_is_zero``, 0 for ""; an author's)."""
    blake2b, zero = hashlib.blake2b, bytes(8)
    keys = [zero if empty_is_zero and not t else blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts]
    return np.frombuffer(b"".join(keys), "<u8").astype(np.uint64)


def lookup_table(
    keys: NDArray[np.uint64], valid: NDArray[np.bool_] | None = None
) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Sorted ``(keys, rows)`` for binary-search lookups; rows where ``valid`` is False are left out."""
    rows = np.arange(len(keys), dtype=np.int64) if valid is None else np.flatnonzero(valid).astype(np.int64)
    k = keys[rows]
    order = np.argsort(k, kind="stable")
    return k[order], rows[order]


@dataclass
class Gallery:
    """Embeddings ``(N, D)`` float16 with positions ``(N,)``, cells ``(N,)`` (-1: no cell), ids and authors.

    Rows are grouped by cell, so a cell is the contiguous slice :meth:`cell_range`, and FAISS's inverted list
    of the same number (:class:`~geoswc.gallery.codes.CellLists`). A search scores the codes in FAISS, then
    re-scores the best ``rerank`` candidates exactly (float32 over the stored float16 vectors): with ``flat``
    codes the result is the exact top-k. Make one with :meth:`build` (or load one with
    :func:`geoswc.gallery.files.load_gallery`).
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
    lists: CellLists
    rerank: int = 100
    """Candidates of coded (non-flat) searches re-scored exactly."""
    checker: RowChecker | None = field(default=None, repr=False)
    source: str = ""
    """The index folder it was loaded from ("" for one built in memory), for messages."""
    thumbnails: Thumbnails | None = field(default=None, repr=False)
    """The photos' thumbnails (an index built with ``--thumbnails``), else None."""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def codes(self) -> str:
        """The kind of codes FAISS searches (``flat``, ``sq8``, ``pq`` or ``opq``)."""
        return self.lists.codebook.kind

    @property
    def model_fingerprint(self) -> str:
        return self.identity.model_fingerprint

    def has_thumbnail(self, row: int) -> bool:
        """Whether gallery row ``row`` has a thumbnail."""
        return self.thumbnails is not None and self.thumbnails.has(row)

    def thumbnail(self, row: int) -> bytes | None:
        """The JPEG bytes of gallery row ``row``'s thumbnail, checked against its digest; None when the index has
        none for it.

        Raises:
            InputError: ``row`` is not a row of the gallery.
            ArtifactError: the stored thumbnail was damaged or changed.
        """
        if not 0 <= row < len(self):
            raise InputError(f"gallery row {row} is out of range (the gallery has {len(self)} rows)")
        return self.thumbnails.get(row) if self.thumbnails is not None else None

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
        for values, (keys, rows), column in (
            (names, self.name_lookup, self.names),
            (authors, self.author_lookup, self.authors),
        ):
            for v in values:
                if not v:
                    continue
                k = np.uint64(item_key(v))
                hit = rows[np.searchsorted(keys, k, "left") : np.searchsorted(keys, k, "right")]
                parts.append(np.array([r for r in hit if column[int(r)] == v], np.int64))
        return np.unique(np.concatenate(parts))

    def search(
        self, query: ArrayLike, k: int, cells: Iterable[int] | None = None, exclude: NDArray[np.int64] | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Top-``k`` rows by cosine similarity (higher is better), most similar first, ties by row.

        Args:
            query: ``(D,)`` vector (normalised here).
            cells: search these cells (e.g. the chosen one, or it and its neighbours); None: the whole gallery.
            exclude: rows never returned (leakage guard; a FAISS ID selector).

        Returns:
            ``(rows (k',), similarities (k',))`` with ``k' <= k``: exact similarities of the stored vectors.

        Raises:
            TypeError: ``k`` is not a whole number (a bool, a float, a string).
            InputError: ``k`` is below 1, or the query is not ``(D,)``.
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, (bool, np.bool_)):
            raise TypeError(f"k must be a whole number of neighbours, got {k!r} ({type(k).__name__})")
        if k < 1:
            raise InputError(f"k must be at least 1 (the neighbours to return), got {k}")
        q = np.asarray(query, np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise InputError(f"query has {q.shape[0]} dimensions, the gallery {self.dim}")
        empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
        qnorm = float(np.linalg.norm(q))
        if len(self) == 0 or not np.isfinite(qnorm):
            return empty
        q = q / qnorm if qnorm > 0 else q
        lists = self.lists.lists_of(None if cells is None else np.fromiter(cells, np.int64))
        k = min(int(k), self.lists.rows_in(lists))  # allocate for the rows searched, never for a huge k
        if k == 0:
            return empty
        short = 2 * k if self.lists.codebook.exact else max(2 * k, self.rerank)  # 2k: ties and summation order
        cand, _ = self.lists.search(q, short, lists, exclude)
        if cand.size == 0:
            return empty
        exact = (torch.from_numpy(self._gather(cand)).float() @ torch.from_numpy(q)).numpy()  # torch: fast fp16
        order = np.lexsort((cand, -exact))[:k]
        return cand[order], exact[order]

    def _gather(self, rows: NDArray[np.int64]) -> NDArray[np.float16]:
        return self.checker.gather(rows) if self.checker is not None and rows.size else self.embeddings[rows]
