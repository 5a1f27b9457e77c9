"""How a gallery's embeddings are coded for search, and the FAISS inverted-file index that holds them by cell.

The S2 cells are FAISS's inverted lists: searching within the chosen cell (or a few) is FAISS's own
preassigned-list search, and the leakage guard is a FAISS ID selector. The codes are one of

* ``flat``: the float16 vectors themselves (exact; 2 bytes a dimension),
* ``sq8``: one byte a dimension (FAISS's per-dimension 8-bit scalar quantiser),
* ``pq``: ``m`` bytes a vector (a product quantiser of ``m`` sub-vectors of 256 centroids each),
* ``opq``: ``pq`` after a learned rotation that balances the sub-vectors.

A quantiser's trained parameters are plain arrays (saved in safetensors by :mod:`geoswc.gallery.files`, never
as a FAISS file), rebuilt into FAISS objects in memory. Every code is encoded from the vector alone (no residual
against a cell centroid), so the lists need no coarse quantiser.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from geoswc.core import threads
from geoswc.core.errors import InputError, building

log = logging.getLogger(__name__)

CODE_KINDS = ("flat", "sq8", "pq", "opq")
PQ_CENTROIDS = 256
"""Centroids of each product-quantiser sub-vector (8-bit codes)."""
MIN_TRAIN_ROWS = PQ_CENTROIDS
"""Fewest rows a quantiser trains on: FAISS's k-means fails below one row a centroid (it advises 39 a centroid;
fewer gives our warning, not an error)."""
OPQ_MAX_TRAIN_ROWS = 256 * 256
"""Rows FAISS's OPQ trains its rotation on at most (``OPQMatrix.max_train_points``: it subsamples more)."""
PARAM_NAMES = {"flat": (), "sq8": ("sq_trained",), "pq": ("pq_centroids",), "opq": ("opq_matrix", "pq_centroids")}
"""The arrays each kind of codebook keeps."""
FAISS_FAST_SUB_DIM = 8
"""Sub-vectors this narrow FAISS codes fast itself (it has vectorised nearest-centroid routines for 2, 4 and 8
dimensions); wider ones are coded by :func:`pq_codes`."""
TABLE_ROWS = 4096
"""Rows whose distance tables to one sub-vector's centroids :func:`pq_codes` holds at a time (4 MiB)."""
ROUNDING_MARGIN = 8 * 2.0**-24
"""A product-quantiser code taken from the BLAS distance tables of :func:`pq_codes` must beat the runner-up by this
many float32 rounding units a sub-dimension (times the distances' scale), else FAISS's own coder settles it: four
times what both computations' rounding can move a distance, together."""


def _faiss() -> Any:
    loaded = "faiss" in sys.modules
    import faiss  # imported on use: loading it costs ~0.2 s

    if not loaded:  # its own OpenMP runtime: give it the thread count set before it was loaded (--run.threads)
        threads.in_this_thread()
    return faiss


@dataclass(frozen=True)
class Codebook:
    """A trained coder of ``dim``-wide unit vectors into ``code_size`` bytes.

    ``params`` by kind: ``sq8``: ``sq_trained (2 * dim,)`` (FAISS's per-dimension minimum and range);
    ``pq``: ``pq_centroids (m, 256, dim / m)``; ``opq``: also ``opq_matrix (dim, dim)``, the rotation applied
    before the product quantiser.
    """

    kind: str
    dim: int
    params: Mapping[str, NDArray[np.float32]]

    @property
    def m(self) -> int:
        """Sub-vectors (bytes) of a product-quantiser code; 0 for the other kinds."""
        return int(self.params["pq_centroids"].shape[0]) if "pq_centroids" in self.params else 0

    @property
    def code_size(self) -> int:
        return {"flat": 2 * self.dim, "sq8": self.dim}.get(self.kind, self.m)

    @property
    def exact(self) -> bool:
        """Whether the codes' scores are the stored vectors' own (no re-ranking needed)."""
        return self.kind == "flat"

    def rotate(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """``x (b, dim)`` in the quantiser's space (``opq``'s rotation; the others keep it)."""
        if self.kind != "opq":
            return np.ascontiguousarray(x, np.float32)
        return np.ascontiguousarray(x @ self.params["opq_matrix"].T, np.float32)

    def encode(self, x: NDArray[np.floating]) -> NDArray[np.uint8]:
        """Codes ``(b, code_size)`` of vectors ``x (b, dim)``: FAISS's, byte for byte (code many rows a call)."""
        if self.kind == "flat":
            return np.ascontiguousarray(x, np.float16).view(np.uint8).reshape(len(x), self.code_size)
        x32 = self.rotate(np.asarray(x, np.float32))
        if self.kind == "sq8" or self.dim // self.m <= FAISS_FAST_SUB_DIM:
            return self._coder.compute_codes(x32)  # type: ignore[no-any-return]
        return pq_codes(x32, self.params["pq_centroids"], self._sub_coders)

    @functools.cached_property
    def _coder(self) -> Any:
        """FAISS's scalar or product quantiser of these codes (built once)."""
        faiss = _faiss()
        if self.kind == "sq8":
            sq = faiss.ScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit)
            faiss.copy_array_to_vector(np.ascontiguousarray(self.params["sq_trained"].ravel()), sq.trained)
            return sq
        pq = faiss.ProductQuantizer(self.dim, self.m, 8)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.params["pq_centroids"].ravel()), pq.centroids)
        return pq

    @functools.cached_property
    def _sub_coders(self) -> list[Any]:
        """A one-sub-vector FAISS product quantiser per sub-vector ``j`` (its centroids ``pq_centroids[j]``): the
        same code FAISS's ``m``-byte quantiser computes for that byte, by the same routine (built once)."""
        faiss = _faiss()
        cents = np.ascontiguousarray(self.params["pq_centroids"], np.float32)
        coders = []
        for c in cents:
            pq = faiss.ProductQuantizer(c.shape[1], 1, 8)
            faiss.copy_array_to_vector(np.ascontiguousarray(c.ravel()), pq.centroids)
            coders.append(pq)
        return coders

    def empty_ivf(self, nlist: int) -> Any:
        """An empty FAISS inverted-file index of ``nlist`` lists for these codes (inner product, trained)."""
        faiss = _faiss()
        quantizer = faiss.IndexFlatIP(self.dim)  # never used: lists are preassigned (the cells)
        if self.kind in ("flat", "sq8"):
            qtype = faiss.ScalarQuantizer.QT_fp16 if self.kind == "flat" else faiss.ScalarQuantizer.QT_8bit
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT, False)
            if self.kind == "sq8":
                faiss.copy_array_to_vector(np.ascontiguousarray(self.params["sq_trained"].ravel()), ivf.sq.trained)
        else:
            ivf = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.m, 8, faiss.METRIC_INNER_PRODUCT)
            ivf.by_residual = False
            faiss.copy_array_to_vector(np.ascontiguousarray(self.params["pq_centroids"].ravel()), ivf.pq.centroids)
        ivf.is_trained = True  # the FAISS wrapper keeps a reference to the quantizer
        return ivf


def check_codes(kind: str, dim: int, m: int, train_rows: int | None = None) -> None:
    """Refuse a kind of codes, or a ``pq``/``opq`` size, that cannot code ``dim``-wide vectors, or (given
    ``train_rows``, ``--codes.train_rows``) a training sample that could never be large enough for them.

    Raises:
        InputError: naming the flag.
    """
    if kind not in CODE_KINDS:
        raise InputError(f"--codes.kind must be one of {', '.join(CODE_KINDS)}, got {kind!r}")
    if dim < 1:
        raise InputError(f"cannot code embeddings of width {dim}; the model's features are damaged")
    if kind in ("pq", "opq") and not (1 <= m <= dim and dim % m == 0):
        raise InputError(
            f"--codes.pq_bytes must divide the embedding width {dim} (e.g. {_divisor_near(dim, m)}), got {m}"
        )
    if kind == "opq" and dim > OPQ_MAX_TRAIN_ROWS:  # FAISS would subsample below `dim` rows (see rows_needed)
        raise InputError(
            f"--codes.kind opq codes embeddings of at most {OPQ_MAX_TRAIN_ROWS} dimensions, these have {dim}; "
            "use --codes.kind pq"
        )
    if train_rows is not None and train_rows < rows_needed(kind, dim):
        _refuse_rows(kind, dim, train_rows, None, flag=True)


def _divisor_near(dim: int, m: int) -> int:
    """The divisor of ``dim`` nearest ``m`` (the smaller on a tie), in ``O(sqrt(dim))`` steps."""
    small = [d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0]
    return min({*small, *(dim // d for d in small)}, key=lambda d: (abs(d - m), d))


def rows_needed(kind: str, dim: int) -> int:
    """Fewest training rows FAISS trains ``kind`` codes of ``dim``-wide vectors on without failing or crashing.

    ``flat``: none. ``sq8`` and ``pq``: :data:`MIN_TRAIN_ROWS` (k-means needs a row a centroid; FAISS raises
    below). ``opq``: also ``dim``: FAISS's rotation update sizes a buffer by ``rows x dim`` and writes ``dim x
    dim`` into it, so fewer rows than dimensions overrun it and kill the process (a segmentation fault or an
    abort, not an exception).
    """
    if kind == "flat":
        return 0
    return max(MIN_TRAIN_ROWS, dim) if kind == "opq" else MIN_TRAIN_ROWS


def check_training(kind: str, dim: int, m: int, rows: int, gallery_rows: int | None = None) -> None:
    """Refuse, before FAISS sees them, ``rows`` training rows that are too few for ``kind`` codes of ``dim``-wide
    vectors (:func:`rows_needed`), naming the flags that help.

    Args:
        rows: the training sample's rows (the gallery's photos, at most ``--codes.train_rows``).
        gallery_rows: the gallery's photos, when known (says whether ``--codes.train_rows`` or the gallery is short).

    Raises:
        InputError: naming ``--codes.kind`` and the numbers.
    """
    check_codes(kind, dim, m)
    if rows < rows_needed(kind, dim):
        _refuse_rows(kind, dim, rows, gallery_rows)


def _refuse_rows(kind: str, dim: int, rows: int, gallery_rows: int | None, flag: bool = False) -> None:
    """Raise the InputError of :func:`check_training` (``flag``: ``rows`` is ``--codes.train_rows`` itself)."""
    need = rows_needed(kind, dim)
    usable = [k for k in CODE_KINDS if k != kind and rows_needed(k, dim) <= max(rows, gallery_rows or 0)]
    kinds = " or ".join(filter(None, (", ".join(usable[:-1]), usable[-1])))
    why = f" for {dim}-dimensional embeddings" if need > MIN_TRAIN_ROWS else ""
    if flag or (gallery_rows is not None and gallery_rows >= need):
        got, fix = f"--codes.train_rows gives it {rows}", f"raise --codes.train_rows to {need} or more"
    elif gallery_rows is not None or need <= MIN_TRAIN_ROWS:  # --codes.train_rows is >= MIN_TRAIN_ROWS
        got, fix = f"this gallery has {rows if gallery_rows is None else gallery_rows}", "index more photos"
    else:
        got, fix = f"it has {rows}", f"raise --codes.train_rows to {need} or more (on a gallery of as many)"
    raise InputError(
        f"--codes.kind {kind} needs at least {need} photos to train its quantiser{why}; {got}: use --codes.kind "
        f"{kinds}, or {fix}"
    )


def train_codebook(
    kind: str, sample: NDArray[np.floating], m: int = 0, seed: int = 0, gallery_rows: int | None = None
) -> Codebook:
    """Train a codebook of ``kind`` on ``sample (n, dim)`` unit vectors (deterministic for a seed).

    Args:
        m: bytes of a ``pq``/``opq`` code (must divide ``dim``).
        gallery_rows: the gallery's photos the sample was drawn from, for the message of a too small sample.

    Raises:
        InputError: a sample FAISS cannot train on (:func:`check_training`), checked before FAISS sees it.
    """
    x = np.ascontiguousarray(sample, np.float32)
    if x.ndim != 2:
        raise InputError(f"a codebook trains on a (rows, dim) sample, got shape {x.shape}")
    dim = int(x.shape[1])
    check_training(kind, dim, m, len(x), gallery_rows)
    if kind == "flat":
        return Codebook(kind, dim, {})
    if not np.isfinite(x).all():
        raise InputError("the gallery's embeddings hold NaN or infinite values; re-extract the features")
    faiss = _faiss()
    if kind == "sq8":
        sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)
        sq.train(x)
        return Codebook(kind, dim, {"sq_trained": faiss.vector_to_array(sq.trained).astype(np.float32)})
    params: dict[str, NDArray[np.float32]] = {}
    if kind == "opq":
        opq, inner = faiss.OPQMatrix(dim, m), faiss.ProductQuantizer(dim, m, 8)
        inner.cp.seed, inner.cp.min_points_per_centroid = seed, 1
        opq.niter, opq.verbose, opq.pq = 25, False, inner
        opq.train(x)
        params["opq_matrix"] = faiss.vector_to_array(opq.A).astype(np.float32).reshape(dim, dim)
        x = np.ascontiguousarray(x @ params["opq_matrix"].T, np.float32)
    pq = faiss.ProductQuantizer(dim, m, 8)
    pq.cp.seed, pq.cp.min_points_per_centroid = seed, 1  # small samples: our own warning below, not FAISS's
    if len(x) < 39 * PQ_CENTROIDS:
        log.warning(
            "training a %d-byte product quantiser on %d vectors; %d or more give better codes",
            m,
            len(x),
            39 * PQ_CENTROIDS,
        )
    pq.train(x)
    params["pq_centroids"] = faiss.vector_to_array(pq.centroids).astype(np.float32).reshape(m, PQ_CENTROIDS, dim // m)
    return Codebook(kind, dim, params)


def pq_codes(x: NDArray[np.float32], centroids: NDArray[np.float32], sub_coders: list[Any]) -> NDArray[np.uint8]:
    """FAISS's product-quantiser codes ``(b, m)`` of ``x (b, m * s)`` (centroids ``(m, 256, s)``), fast.

    FAISS's coder computes each of the ``256 m`` distances of a row one by one (about 150 us a row at
    1280 x 128 bytes). Here one BLAS product a sub-vector gives each row's distances to its 256 centroids up to
    the row's own squared norm (``|c|^2 - 2 x.c``, :func:`_two_nearest`; :data:`TABLE_ROWS` rows at a time), and
    with them the two nearest centroids. The nearest is FAISS's code wherever it beats the runner-up by more than
    both computations' rounding can move a distance (:data:`ROUNDING_MARGIN`): then the two cannot disagree. The
    few sub-vectors closer to a tie than that (and any with NaN or infinite values) are coded by ``sub_coders[j]``,
    FAISS's own routine, so every code is FAISS's ``ProductQuantizer.compute_codes`` byte for byte. The
    blocks of rows are coded by the process's compute threads (:func:`geoswc.core.threads.each`).
    """
    b, (m, _, s) = len(x), centroids.shape
    if b == 0:
        return np.zeros((0, m), np.uint8)
    x = np.ascontiguousarray(x, np.float32)
    cents = np.ascontiguousarray(centroids, np.float32)
    cnorm = np.sqrt(np.square(cents, dtype=np.float64).sum(-1).max(-1))  # (m,) largest centroid norm
    xsq = np.einsum("bms,bms->bm", x.reshape(b, m, s), x.reshape(b, m, s)).astype(np.float64)
    bound = ROUNDING_MARGIN * (s + 3) * (np.sqrt(xsq) + cnorm) ** 2  # (b, m); the scale bounds |x|^2, |c|^2, 2|x.c|
    weights = np.concatenate([-2 * cents, np.square(cents).sum(-1, keepdims=True)], -1).transpose(0, 2, 1).copy()
    codes = np.empty((b, m), np.uint8)

    def code(a: int) -> None:  # rows a .. a + TABLE_ROWS
        r = min(TABLE_ROWS, b - a)
        ext = np.ones((r, m, s + 1), np.float32)  # each sub-vector and a 1 that picks up |c|^2
        ext[:, :, :s] = x[a : a + r].reshape(r, m, s)
        near, gap = _two_nearest(ext, weights)
        codes[a : a + r] = near
        for j in np.flatnonzero(~(gap > bound[a : a + r]).all(0)):  # NaN: not sure either
            tie = a + np.flatnonzero(~(gap[:, j] > bound[a : a + r, j]))
            codes[tie, j] = sub_coders[j].compute_codes(np.ascontiguousarray(x[tie, j * s : (j + 1) * s]))[:, 0]

    threads.each(code, range(0, b, TABLE_ROWS))
    return codes


def _two_nearest(
    ext: NDArray[np.float32], weights: NDArray[np.float32]
) -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
    """Each sub-vector's nearest centroid and by how much the runner-up is farther (squared L2), ``(r, m)`` each.

    Args:
        ext: ``(r, m, s + 1)``: the rows' sub-vectors, each followed by a 1.
        weights: ``(m, s + 1, 256)``: sub-vector ``j``'s centroids times -2, with their squared norms below, so that
            ``ext[:, j] @ weights[j]`` is ``|c|^2 - 2 x.c``, the squared distance less ``|x|^2``.
    """
    r, m, _ = ext.shape
    at = np.arange(r)
    dist = np.empty((r, weights.shape[2]), np.float32)
    near = np.empty((r, m), np.uint8)
    gap = np.empty((r, m), np.float64)
    for j in range(m):
        np.matmul(ext[:, j], weights[j], out=dist)  # one BLAS call on the strided rows, no copy
        first = dist.argmin(1)
        best = dist[at, first]
        dist[at, first] = np.inf
        gap[:, j] = dist[at, dist.argmin(1)] - best.astype(np.float64)  # argmin twice: faster than min here
        near[:, j] = first
    return near, gap


class CellLists:
    """The gallery's codes in a FAISS inverted-file index whose lists are the cells.

    Rows are grouped by cell: list ``c < num_cells`` holds rows ``offsets[c] .. offsets[c + 1] - 1``, and list
    ``num_cells`` the rows before ``offsets[0]`` (photos in no cell). A label is the row number.

    Args:
        codebook: the codes' coder.
        offsets: ``(num_cells + 1,)`` row offsets of the cells.
        codes: ``codes(start, stop)`` returns the codes ``(stop - start, code_size)`` of rows ``[start, stop)``.
    """

    def __init__(
        self, codebook: Codebook, offsets: NDArray[np.int64], codes: Callable[[int, int], NDArray[np.uint8]]
    ) -> None:
        self.codebook = codebook
        self.num_cells = len(offsets) - 1
        self.ivf = codebook.empty_ivf(self.num_cells + 1)
        faiss = _faiss()
        spans = [(int(offsets[c]), int(offsets[c + 1])) for c in range(self.num_cells)] + [(0, int(offsets[0]))]
        self.sizes = np.array([max(b - a, 0) for a, b in spans], np.int64)
        """Rows of each list."""
        total = int(self.sizes.sum())
        with building(f"FAISS lists of {total:,} {codebook.kind} codes ({codebook.code_size} bytes each)"):
            for c, (a, b) in enumerate(spans):
                if b > a:
                    block = np.ascontiguousarray(codes(a, b), np.uint8)
                    if block.shape != (b - a, codebook.code_size):
                        raise ValueError(f"codes of rows {a}..{b} have shape {block.shape}")
                    ids = np.arange(a, b, dtype=np.int64)
                    self.ivf.invlists.add_entries(c, b - a, faiss.swig_ptr(ids), faiss.swig_ptr(block))
        self.ivf.ntotal = total

    def lists_of(self, cells: NDArray[np.int64] | None) -> NDArray[np.int64]:
        """The lists to search: ``cells`` (unknown ones dropped), or every list (None: the whole gallery)."""
        if cells is None:
            return np.arange(self.num_cells + 1, dtype=np.int64)
        cells = np.unique(np.asarray(cells, np.int64))
        return cells[(cells >= 0) & (cells < self.num_cells)]

    def rows_in(self, lists: NDArray[np.int64]) -> int:
        """Rows held by ``lists`` (as :meth:`lists_of` gives them)."""
        return int(self.sizes[lists].sum()) if lists.size else 0

    def search(
        self, query: NDArray[np.float32], k: int, lists: NDArray[np.int64], exclude: NDArray[np.int64] | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """The ``k`` best rows of ``lists`` by the codes' inner product with ``query (dim,)``, best first.

        Returns:
            ``(rows (k',), scores (k',))``, ``k' <= k``; rows in ``exclude`` are never returned.
        """
        faiss = _faiss()
        k = min(int(k), self.rows_in(lists))  # the buffers below are sized for the rows that exist, not for `k`
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = self.codebook.rotate(query.reshape(1, -1))
        assign = np.ascontiguousarray(lists.reshape(1, -1), np.int64)
        params = faiss.SearchParametersIVF()
        params.nprobe = int(assign.shape[1])
        if exclude is not None and exclude.size:
            ex = np.ascontiguousarray(exclude, np.int64)
            batch = faiss.IDSelectorBatch(len(ex), faiss.swig_ptr(ex))
            params.sel = faiss.IDSelectorNot(batch)
        scores, rows = np.empty((1, k), np.float32), np.empty((1, k), np.int64)
        self.ivf.search_preassigned_c(
            1,
            faiss.swig_ptr(q),
            k,
            faiss.swig_ptr(assign),
            faiss.swig_ptr(np.zeros(assign.shape, np.float32)),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(rows),
            False,
            params,
        )
        found = rows[0] >= 0
        return rows[0][found], scores[0][found]
