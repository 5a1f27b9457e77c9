"""The gallery index on disk (a folder), format ``geoswc-index/2``:

* ``index.safetensors``: float16 embeddings ``(N, D)`` with rows grouped by cell (CSR: ``cell_offsets``),
  positions, cells, and lookup tables of the photos' ids and authors. It is memory-mapped, not read, so an
  index of millions of photos opens in well under a second; a query reads only its cell's rows.
* ``items.csv``: image id and author of each row, in row order (human-readable; rows read on demand).
* ``codes.safetensors`` (coded indexes: ``sq8``, ``pq``, ``opq``): the FAISS codes ``(N, code_size)`` in row order,
  the quantiser's trained arrays, and a 64-bit BLAKE2b digest of each embedding row.
* ``thumbnails.bin`` and ``thumbnails.safetensors`` (``geoswc index --thumbnails N``): a small JPEG per photo,
  each checked against its own digest when read (:mod:`geoswc.gallery.thumbnails`).
* ``index.json``: format, the gallery's identity (model and cell-table fingerprints), the codes' and thumbnails'
  settings, and checksums: the sha256 of ``items.csv``, of ``codes.safetensors``, of ``thumbnails.safetensors``
  and of every 64 MiB block of ``index.safetensors``, and a seal over its own fields. ``index.json`` is written
  last: its presence marks a whole index.

Rebuilding an index over an earlier one (``geoswc index --out EXISTING``) writes the new one into a staging folder
beside it and swaps it in whole once it is complete (:class:`~geoswc.core.artifact_folders.FolderSwap`): a build
killed at any point leaves the earlier index as it was, loadable (or, on a system without an atomic exchange,
renamed aside and put back by the next load or build).

Every file is verified before FAISS or a search reads it. At load: everything but the embeddings, and the whole
of ``codes.safetensors`` (FAISS copies the codes into its inverted lists). A ``flat`` index copies the
embeddings themselves into FAISS, so they are verified at load too; a coded index re-scores a few rows a
query from the memory-mapped embeddings, each verified against its row digest the first time it is read.
An index written before codes existed has no ``codes`` entry and is ``flat``.

:class:`GalleryWriter` streams: it takes chunks, stages each sorted by cell, and compacts them into the final
layout at the end, so a gallery is never whole in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from geoswc.core import artifact_folders, atomic_files, json_records, tensor_files
from geoswc.core.config import GalleryCodes, to_dict
from geoswc.core.errors import ArtifactError, InputError, building
from geoswc.core.item_lines import ItemColumn, item_line
from geoswc.core.progress import progress_bar
from geoswc.gallery.codes import PARAM_NAMES, CellLists, Codebook, check_codes, train_codebook
from geoswc.gallery.search import CHUNK_ROWS, Gallery, GalleryIdentity, item_keys, lookup_table
from geoswc.gallery.thumbnails import BIN_FILE, TABLE_FILE, Thumbnails, ThumbnailSettings, ThumbnailWriter, remove_files

log = logging.getLogger(__name__)

INDEX_FORMAT = "geoswc-index/2"
BLOCK_BYTES = 64 << 20
"""Checksum granularity of ``index.safetensors``."""
BATCH_ROWS = 1 << 15
"""Rows :class:`GalleryWriter` reads, codes, digests and writes at a time when it compacts the staged rows (80 MiB
of float16 at D = 1280): FAISS codes them at full speed, and two batches fit in memory."""
EAGER_VERIFY_BYTES = 512 << 20
"""Files up to this size are verified completely at load."""
PREFETCH_GAP_BYTES = 64 << 10
"""Rows to re-score that lie this close in the file are prefetched in one request (with the rows between)."""
CODES_FILE = "codes.safetensors"
INDEX_FILES = ("index.json", "index.safetensors", "items.csv", CODES_FILE, BIN_FILE, TABLE_FILE)
"""The files of an index folder (a rebuild keeps any other entry of the folder)."""
_ITEMS_HEADER = b"image,author\n"
_META_KEYS = (
    "model_fingerprint",
    "cells_fingerprint",
    "num_cells",
    "size",
    "dim",
    "max_norm",
    "tensors",
    "items_sha256",
    json_records.SEAL_KEY,
)


def _ceil6(x: float) -> float:
    """``x`` rounded up to 6 decimals: a short number in ``index.json`` (every digit matters to its seal), and
    never below the true value (the search margin scales with it)."""
    return math.ceil(x * 1e6) / 1e6


class _BlockRows:
    """Checks embedding rows through the file's block checksums (the gallery's :class:`RowChecker`)."""

    def __init__(self, embeddings: NDArray[np.float16], blocks: tensor_files.BlockChecksums, row0: int) -> None:
        self.embeddings, self.blocks, self.row0 = embeddings, blocks, row0
        self.row_bytes = embeddings.shape[1] * embeddings.itemsize

    def span(self, start: int, stop: int) -> None:
        self.blocks.check(self.row0 + start * self.row_bytes, self.row0 + stop * self.row_bytes)

    def gather(self, rows: NDArray[np.int64]) -> NDArray[np.float16]:
        size = self.blocks.block_bytes
        first = (self.row0 + rows * self.row_bytes) // size
        last = (self.row0 + (rows + 1) * self.row_bytes - 1) // size
        for b in np.unique(np.concatenate([first, last])):
            self.blocks.check(int(b) * size, int(b) * size + 1)
        return self.embeddings[rows]


def load_gallery(folder: str | Path, verify: bool = False) -> Gallery:
    """Open an index folder (memory-mapped). Whether it fits a model is :func:`geoswc.models.compat.check` 's call.

    Args:
        verify: check every embedding block now instead of on first use.

    Raises:
        ArtifactError: a missing, truncated or changed file, or an unknown format.
    """
    folder = Path(folder)
    if not (folder / "index.json").is_file() and artifact_folders.recover_folder(folder):
        log.warning("%s: put back the index a rebuild that was killed had set aside", folder)
    meta = json_records.read_record(
        folder / "index.json", "gallery index", INDEX_FORMAT, _META_KEYS, "rebuild it with `geoswc index`"
    )
    try:
        return _open(folder, meta, verify)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ArtifactError(f"gallery index {folder} is incomplete or inconsistent ({e}); rebuild it") from e


def _open(folder: Path, meta: dict[str, Any], verify: bool) -> Gallery:
    path, tinfo = folder / "index.safetensors", meta["tensors"]
    if not path.is_file():
        raise ArtifactError(f"gallery index tensors not found: {path} is missing")
    size = path.stat().st_size
    if size != int(tinfo["bytes"]):
        raise ArtifactError(
            f"gallery index tensors {path} are truncated or were changed ({size} bytes, "
            f"{tinfo['bytes']} expected); rebuild the index or restore the original file"
        )
    data = np.memmap(path, np.uint8, mode="c") if size else np.zeros(0, np.uint8)
    blocks = tensor_files.BlockChecksums(path, data, int(tinfo["block_bytes"]), list(tinfo["block_sha256"]))
    n_head = tensor_files.header_length(data)
    blocks.check(0, 8 + n_head)
    header, base = tensor_files.safetensors_header(bytes(data[: 8 + n_head]), size)
    t = {name: tensor_files.tensor_view(data, spec, base) for name, spec in header.items()}
    row0 = base + int(header["embeddings"]["data_offsets"][0])
    blocks.check(0, row0)  # everything but the embeddings
    codes = dict(meta.get("codes", {"kind": "flat"}))
    if verify or size <= EAGER_VERIFY_BYTES or codes["kind"] == "flat":  # flat: FAISS copies the embeddings
        blocks.check_all()
    items = _items(folder, meta)
    n, dim = int(meta["size"]), int(meta["dim"])
    if (
        t["embeddings"].shape != (n, dim)
        or len(t["cell_offsets"]) != int(meta["num_cells"]) + 1
        or len(t["item_offsets"]) != n + 1
        or (n and int(t["item_offsets"][-1]) != len(items))
    ):
        raise ArtifactError(f"gallery index {folder} is inconsistent with its index.json; rebuild it")
    identity = GalleryIdentity(str(meta["model_fingerprint"]), str(meta["cells_fingerprint"]), int(meta["num_cells"]))
    thumbs = Thumbnails.open(folder, meta["thumbnails"], n) if "thumbnails" in meta else None
    offsets = np.asarray(t["cell_offsets"], np.int64)
    if codes["kind"] == "flat":  # the codes are the embeddings: read (verified above), not mapped
        lists = CellLists(Codebook("flat", dim, {}), offsets, lambda a, b: _read_rows(path, row0, 2 * dim, a, b))
        checker: _BlockRows | _RowDigests = _BlockRows(t["embeddings"], blocks, row0)
    else:
        codebook, code0, digests = _read_codes(folder, codes, n, dim)
        size = codebook.code_size
        lists = CellLists(codebook, offsets, lambda a, b: _read_rows(folder / CODES_FILE, code0, size, a, b))
        checker = (
            _BlockRows(t["embeddings"], blocks, row0)
            if blocks.verified
            else _RowDigests(t["embeddings"], digests, path, row0)
        )
    return Gallery(
        t["embeddings"],
        t["lat"],
        t["lon"],
        t["cell"],
        ItemColumn(items, t["item_offsets"], 0),
        ItemColumn(items, t["item_offsets"], 1),
        identity,
        offsets,
        (t["name_keys"], t["name_rows"]),
        (t["author_keys"], t["author_rows"]),
        lists,
        int(codes.get("rerank", GalleryCodes().rerank)),
        checker,
        str(folder),
        thumbs,
    )


def _read_rows(path: Path, row0: int, row_bytes: int, a: int, b: int) -> NDArray[np.uint8]:
    """Rows ``[a, b)`` of a table of ``row_bytes``-byte rows starting at byte ``row0`` of a file, as ``(b - a,
    row_bytes)`` bytes."""
    return np.frombuffer(tensor_files.read_span(path, row0 + a * row_bytes, row0 + b * row_bytes), np.uint8).reshape(
        b - a, row_bytes
    )


def _read_codes(folder: Path, codes: dict[str, Any], n: int, dim: int) -> tuple[Codebook, int, NDArray[np.uint64]]:
    """The codebook, the byte offset of the codes ``(n, code_size)`` and the row digests ``(n,)`` of a coded
    index, after checking the whole of ``codes.safetensors`` against its recorded sha256 (before FAISS reads a
    byte of it)."""
    path = folder / CODES_FILE
    if not path.is_file():
        raise ArtifactError(f"gallery index {folder} lacks {CODES_FILE}; rebuild it")
    if path.stat().st_size != int(codes["bytes"]) or tensor_files.sha256_file(path) != codes["sha256"]:
        raise ArtifactError(
            f"gallery index {path} is damaged or was changed; rebuild the index or restore the original file"
        )
    check_codes(str(codes["kind"]), dim, int(codes.get("pq_bytes", 0)))
    data = np.memmap(path, np.uint8, mode="r")
    header, base = tensor_files.safetensors_header(bytes(data[: 8 + tensor_files.header_length(data)]), len(data))
    t = {name: tensor_files.tensor_view(data, spec, base) for name, spec in header.items()}
    codebook = Codebook(str(codes["kind"]), dim, {k: np.array(t[k], np.float32) for k in PARAM_NAMES[codes["kind"]]})
    shapes = {
        "sq_trained": (2 * dim,),
        "opq_matrix": (dim, dim),
        "pq_centroids": (codebook.m, 256, dim // max(codebook.m, 1)),
    }
    if (
        any(v.shape != shapes[k] for k, v in codebook.params.items())
        or t["codes"].shape != (n, codebook.code_size)
        or t["row_blake2b"].shape != (n,)
    ):
        raise ArtifactError(f"gallery index {path} does not fit its index.json; rebuild the index")
    return codebook, base + int(header["codes"]["data_offsets"][0]), t["row_blake2b"]


def row_digests(rows: NDArray[np.float16]) -> NDArray[np.uint64]:
    """Each embedding row's digest, ``(b,)`` of ``rows (b, D)``: the 64-bit BLAKE2b of the row's bytes, read
    little-endian (what :class:`_RowDigests` checks), in one tight loop over the rows."""
    blake2b = hashlib.blake2b
    if not rows.size:  # no rows, or rows of no bytes
        return np.full(len(rows), int.from_bytes(blake2b(b"", digest_size=8).digest(), "little"), np.uint64)
    data, width = memoryview(np.ascontiguousarray(rows)).cast("B"), rows.shape[1] * rows.itemsize
    digests = b"".join([blake2b(data[i : i + width], digest_size=8).digest() for i in range(0, len(data), width)])
    return np.frombuffer(digests, "<u8").astype(np.uint64)


class _RowDigests:
    """Checks embedding rows against their row digests, each row once (a coded index's :class:`RowChecker`).

    Rows not yet checked are also the ones whose pages this process has not read: their span of the file is
    prefetched in one request before they are gathered (see :func:`geoswc.core.tensor_files.prefetch`).

    Args:
        embeddings: ``(N, D)`` float16, memory-mapped from ``path``, row ``r`` at byte ``row0 + r * 2 * D``.
        digests: ``(N,)`` each row's digest (:func:`row_digests`).
    """

    def __init__(self, embeddings: NDArray[np.float16], digests: NDArray[np.uint64], path: Path, row0: int) -> None:
        self.embeddings, self.digests, self.path, self.row0 = embeddings, digests, path, row0
        self.row_bytes = embeddings.shape[1] * embeddings.itemsize
        self._done = np.zeros(len(digests), bool)
        self._lock = threading.Lock()

    def span(self, start: int, stop: int) -> None:
        self.gather(np.arange(start, stop, dtype=np.int64))

    def _runs(self, rows: NDArray[np.int64]) -> list[tuple[int, int]]:
        """The byte spans of the runs of sorted ``rows`` that lie within :data:`PREFETCH_GAP_BYTES` of each other
        (the rows of a cell: one span; rows spread over the file: many), runs of one row left to the page fault."""
        gap = max(1, PREFETCH_GAP_BYTES // self.row_bytes)
        cut = np.flatnonzero(np.diff(rows) > gap) + 1
        first, last = rows[np.r_[0, cut]], rows[np.r_[cut - 1, len(rows) - 1]]
        return [
            (self.row0 + int(a) * self.row_bytes, self.row0 + (int(b) + 1) * self.row_bytes)
            for a, b in zip(first, last, strict=True)
            if b > a
        ]

    def gather(self, rows: NDArray[np.int64]) -> NDArray[np.float16]:
        """The rows, gathered once; those not checked before are checked on that copy (the bytes used are the
        bytes checked), after their file spans are prefetched."""
        new = ~self._done[rows]
        if new.any():
            tensor_files.prefetch(self.path, self._runs(np.sort(rows[new])))
        block = np.ascontiguousarray(self.embeddings[rows]).view(np.ndarray)  # one gather, not a memmap lookup a row
        if not new.any():
            return block
        todo = rows[new]
        got = row_digests(block[new])
        bad = np.flatnonzero(got != np.asarray(self.digests[todo], np.uint64))
        if bad.size:
            raise ArtifactError(
                f"a gallery index's embeddings are damaged or were changed (row {int(todo[bad[0]])} "
                "fails its digest); rebuild the index or restore the original file"
            )
        with self._lock:
            self._done[todo] = True
        return block


def _items(folder: Path, meta: dict[str, Any]) -> NDArray[np.uint8]:
    path = folder / "items.csv"
    if not path.is_file():
        raise ArtifactError(f"gallery index {folder} lacks items.csv; rebuild it")
    if tensor_files.sha256_file(path) != meta["items_sha256"]:
        raise ArtifactError(f"gallery index {path} is damaged or was changed; rebuild the index")
    return np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)


GalleryChunk = tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike, Sequence[str], Sequence[str]]
"""Photos to add to a gallery: unit embeddings ``(b, D)``, latitudes, longitudes and cells ``(b,)``, ids, authors."""


def temporary_gallery(
    chunks: Iterable[GalleryChunk], dim: int, identity: GalleryIdentity, codes: GalleryCodes = GalleryCodes()
) -> Gallery:
    """A gallery that lives as long as the object: written by :class:`GalleryWriter` (the one gallery builder) into
    a temporary folder, which is removed when the gallery is garbage-collected."""
    folder = Path(tempfile.mkdtemp(prefix="geoswc-gallery-"))
    try:
        with GalleryWriter(folder, dim, identity, codes) as w:
            for chunk in chunks:
                w.add(*chunk)
            w.finish()
        gallery = load_gallery(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(gallery, shutil.rmtree, folder, True)
    return gallery


def save_gallery(gallery: Gallery, folder: str | Path, codes: GalleryCodes = GalleryCodes()) -> None:
    """Write a gallery (in memory or loaded) as an index folder, streamed in chunks (its thumbnails too)."""
    t = gallery.thumbnails
    with GalleryWriter(folder, gallery.dim, gallery.identity, codes, t.settings if t is not None else None) as w:
        for s in range(0, len(gallery), CHUNK_ROWS):
            e = min(len(gallery), s + CHUNK_ROWS)
            w.add(
                gallery.rows_view(s, e),
                gallery.lat[s:e],
                gallery.lon[s:e],
                gallery.cell[s:e],
                list(gallery.names[s:e]),
                list(gallery.authors[s:e]),
                [t.get(r) for r in range(s, e)] if t is not None else None,
            )
        w.finish()


class GalleryWriter:
    """Streams a gallery into an index folder without holding its embeddings in memory.

    Each :meth:`add` appends a chunk, sorted by cell, to a staging folder inside ``folder``; :meth:`finish`
    compacts the chunks into the cell-grouped layout (sequential copies of contiguous slices), writes
    ``index.safetensors`` and ``items.csv`` atomically, then ``index.json``. A ``folder`` that already holds an
    index keeps it until the new one is complete: the new one is written into a folder beside it and swapped in
    whole by :meth:`finish` (:class:`~geoswc.core.artifact_folders.FolderSwap`); until then the earlier index loads
    as it was, whatever happens to this process. Coded indexes first train their
    quantiser on a sample of the staged rows, then code the rows as they are compacted (``codes.safetensors``).
    Memory use is about 70 bytes per photo (positions, cells, id hashes, row digests) plus one chunk and the
    training sample.

    Args:
        folder: the index folder to write.
        dim: embedding width D.
        identity: the model and cell table of the gallery.
        codes: how FAISS codes the embeddings.
        thumbnails: store a thumbnail per photo (each :meth:`add` then gives them), made with these settings.
    """

    def __init__(
        self,
        folder: str | Path,
        dim: int,
        identity: GalleryIdentity,
        codes: GalleryCodes = GalleryCodes(),
        thumbnails: ThumbnailSettings | None = None,
    ) -> None:
        check_codes(codes.kind, int(dim), codes.pq_bytes, codes.train_rows)
        artifact_folders.recover_folder(folder)  # an index a killed rebuild set aside comes back first
        self.target = atomic_files.ensure_dir(folder)
        earlier = (self.target / "index.json").exists() and artifact_folders.swappable(self.target)
        self._swap = artifact_folders.FolderSwap(self.target, INDEX_FILES) if earlier else None
        self.folder = self._swap.path if self._swap is not None else self.target
        self.dim, self.identity, self.codes = int(dim), identity, codes
        self._stage = atomic_files.Staging(
            self.folder, "embeddings.bin", "items.bin", *(["thumbnails.bin"] if thumbnails is not None else [])
        )
        self._staging = self._stage.path
        self._emb, self._items = self._stage.files["embeddings.bin"], self._stage.files["items.bin"]
        self._cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("lat", "lon", "cell", "line_len", "name_key", "author_key")
        }
        self._max_norm = 0.0
        self.size = 0
        self._thumbs = None if thumbnails is None else ThumbnailWriter(self._stage.files["thumbnails.bin"], thumbnails)

    def add(
        self,
        embeddings: ArrayLike | torch.Tensor,
        lat: ArrayLike,
        lon: ArrayLike,
        cell: ArrayLike,
        names: Sequence[str],
        authors: Sequence[str],
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> None:
        """Append ``b`` photos: unit embeddings ``(b, D)``, positions and cells ``(b,)``, ids and authors, and
        (a writer with thumbnails) their JPEG thumbnails (None: that photo has none)."""
        emb = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
        cell = np.asarray(cell, np.int64)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise InputError(f"gallery embeddings must be (b, {self.dim}), got {emb.shape}")
        if not len(emb) == len(lat) == len(lon) == len(cell) == len(names) == len(authors):
            raise InputError("gallery chunk arrays have different lengths")
        if (self._thumbs is not None) != (thumbnails is not None) or (
            thumbnails is not None and len(thumbnails) != len(cell)
        ):
            raise InputError("give a thumbnail (or None) for each photo exactly when the writer stores thumbnails")
        if len(cell) and (cell.min() < -1 or cell.max() >= self.identity.num_cells):
            raise InputError(f"gallery cells must lie in [-1, {self.identity.num_cells})")
        order = np.argsort(cell, kind="stable")
        emb16 = np.ascontiguousarray(emb[order], dtype=np.float16)
        if len(cell):
            norms = torch.linalg.vector_norm(torch.from_numpy(emb16), dim=1, dtype=torch.float32)
            self._max_norm = max(self._max_norm, float(norms.max()))
        self._emb.write(memoryview(emb16).cast("B"))
        if self._thumbs is not None:
            self._thumbs.add([thumbnails[i] for i in order])  # type: ignore[index]
        lines, line_len, name_key, author_key = _item_rows(names, authors, order)
        self._items.write(lines)
        c = self._cols
        c["lat"].append(np.asarray(lat, np.float64)[order])
        c["lon"].append(np.asarray(lon, np.float64)[order])
        c["cell"].append(cell[order].astype(np.int32))
        c["line_len"].append(line_len)
        c["name_key"].append(name_key)
        c["author_key"].append(author_key)
        self.size += len(cell)

    def _columns(self) -> dict[str, np.ndarray]:
        dtypes = {"lat": np.float64, "lon": np.float64, "cell": np.int32}
        return {k: np.concatenate(v) if v else np.zeros(0, dtypes.get(k, np.int64)) for k, v in self._cols.items()}

    def finish(self) -> None:
        """Compact the chunks and write the index folder."""
        with building(f"the gallery index of {self.size:,} photos"):
            self._finish()

    def _finish(self) -> None:
        self._stage.close()
        col = self._columns()
        perm = np.argsort(col["cell"], kind="stable")  # the chunks are sorted: perm is runs of staged rows
        cut = np.flatnonzero(np.diff(perm) != 1) + 1
        first, last = (np.r_[0, cut], np.r_[cut - 1, self.size - 1]) if self.size else (cut, cut)
        run_start, run_stop = perm[first], perm[last] + 1  # the runs' staged rows
        cell = col["cell"][perm]
        akeys = col["author_key"][perm]
        name_keys, name_rows = lookup_table(col["name_key"][perm])
        author_keys, author_rows = lookup_table(akeys, akeys != 0)
        small = {  # 8-byte types first, then int32, then the float16 embeddings: every tensor aligned
            "lat": col["lat"][perm],
            "lon": col["lon"][perm],
            "cell_offsets": np.searchsorted(cell, np.arange(self.identity.num_cells + 1)).astype(np.int64),
            "item_offsets": len(_ITEMS_HEADER)
            + np.concatenate([[0], np.cumsum(col["line_len"][perm])]).astype(np.int64),
            "name_keys": name_keys,
            "name_rows": name_rows,
            "author_keys": author_keys,
            "author_rows": author_rows,
            "cell": cell,
        }
        with contextlib.ExitStack() as stack:
            sink = None
            if self.codes.kind != "flat":
                sink = stack.enter_context(_CodesWriter(self.folder / CODES_FILE, self._train(perm), self.size))
            tensors = self._write_tensors(small, perm, sink)
        line_start = np.concatenate([[0], np.cumsum(col["line_len"])]).astype(np.int64)
        items_sha = self._write_items(line_start[run_start], line_start[run_stop])
        meta = {
            "format": INDEX_FORMAT,
            "model_fingerprint": self.identity.model_fingerprint,
            "cells_fingerprint": self.identity.cells_fingerprint,
            "num_cells": self.identity.num_cells,
            "size": self.size,
            "dim": self.dim,
            "max_norm": _ceil6(self._max_norm or 1.0),
            "tensors": tensors,
            "items_sha256": items_sha,
            "codes": {**to_dict(self.codes), **(sink.record if sink else {})},
        }
        if sink is None:
            (self.folder / CODES_FILE).unlink(missing_ok=True)  # a coded index's, rebuilt flat
        if self._thumbs is not None:
            meta["thumbnails"] = self._thumbs.finish(self.folder, perm)
        else:
            remove_files(self.folder)  # an earlier build's, rebuilt without
        atomic_files.write_json(
            self.folder / "index.json", json_records.seal(meta)
        )  # last: its presence marks a whole index
        self._stage.remove()
        if self._swap is not None:  # the new index is whole: it takes the earlier one's place
            self._swap.commit()
            self.folder = self.target

    def _train(self, perm: NDArray[np.int64]) -> Codebook:
        """The quantiser, trained on up to ``codes.train_rows`` rows drawn at random (seeded) from the final row
        order (``perm``: final row -> staged row), so that how the rows were chunked does not matter."""
        rng = np.random.default_rng(self.codes.seed)
        n = self.size
        pick = (
            perm[np.sort(rng.choice(n, size=min(n, self.codes.train_rows), replace=False))]
            if n
            else np.zeros(0, np.int64)
        )
        src = np.memmap(self._staging / "embeddings.bin", np.float16, mode="r", shape=(n, self.dim)) if n else None
        sample = _as_float32(_gather(src, pick)) if src is not None else np.zeros((0, self.dim), np.float32)
        del src
        log.info("training %s codes on %d of %d rows", self.codes.kind, len(sample), n)
        return train_codebook(self.codes.kind, sample, self.codes.pq_bytes, self.codes.seed, gallery_rows=n)

    def _write_tensors(
        self, small: dict[str, np.ndarray], perm: NDArray[np.int64], sink: _CodesWriter | None
    ) -> dict[str, Any]:
        """``index.safetensors``: the small tensors, then the embeddings copied from staging in final row order
        (``perm``: final row -> staged row), each coded by ``sink`` on the way."""
        specs: dict[str, Any] = {}
        pos = 0
        for name, arr in small.items():
            specs[name] = {
                "dtype": tensor_files.safetensors_dtype(arr.dtype),
                "shape": list(arr.shape),
                "data_offsets": [pos, pos + arr.nbytes],
            }
            pos += arr.nbytes
        n, d = self.size, self.dim
        specs["embeddings"] = {"dtype": "F16", "shape": [n, d], "data_offsets": [pos, pos + n * d * 2]}
        specs["__metadata__"] = {"format": INDEX_FORMAT}
        header = json.dumps(specs, separators=(",", ":")).encode("utf-8")
        header += b" " * (-(8 + len(header)) % 64)
        with atomic_files.atomic_writer(self.folder / "index.safetensors") as raw:
            out = tensor_files.HashingWriter(raw, BLOCK_BYTES)
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for arr in small.values():
                out.write(arr)
            if n:
                self._copy_rows(perm, out, sink)
        return {
            "bytes": out.size,
            "sha256": out.whole.hexdigest(),
            "block_bytes": BLOCK_BYTES,
            "block_sha256": out.block_digests(),
        }

    def _copy_rows(self, perm: NDArray[np.int64], out: tensor_files.HashingWriter, sink: _CodesWriter | None) -> None:
        """The staged embeddings in final row order (``perm``), read once, :data:`BATCH_ROWS` at a time, written to
        ``out`` and coded and digested by ``sink``. A batch is written, hashed and digested by a helper thread
        while the next one is coded (hashlib and FAISS release the GIL), so the disk and the coder work together."""
        n, d = self.size, self.dim
        src = np.memmap(self._staging / "embeddings.bin", np.float16, mode="r", shape=(n, d))
        desc = f"coding index ({self.codes.kind})" if sink is not None else "writing index"
        with (
            ThreadPoolExecutor(1, thread_name_prefix="geoswc-index") as pool,
            progress_bar(total=n, desc=desc, unit="photo", unit_scale=True, show=n > BATCH_ROWS) as bar,
        ):
            pending: Future[None] | None = None
            for s in range(0, n, BATCH_ROWS):
                rows = _gather(src, perm[s : s + BATCH_ROWS])
                codes = sink.encode(rows) if sink is not None else None
                if pending is not None:
                    pending.result()  # at most one batch waits for the disk
                pending = pool.submit(_emit, out, sink, rows, codes)
                bar.update(len(rows))
            if pending is not None:
                pending.result()
        del src

    def _write_items(self, starts: NDArray[np.int64], stops: NDArray[np.int64]) -> str:
        """``items.csv`` in row order, from the byte runs ``[starts[i], stops[i])`` of the staged lines, gathered
        16 MiB at a time; returns its sha256."""
        with atomic_files.atomic_writer(self.folder / "items.csv") as raw:
            out = tensor_files.HashingWriter(raw, BLOCK_BYTES)
            out.write(_ITEMS_HEADER)
            if len(starts):
                src = np.memmap(self._staging / "items.bin", np.uint8, mode="r")
                data = memoryview(src)
                parts: list[memoryview] = []
                size = 0
                for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                    parts.append(data[a:b])
                    size += b - a
                    if size >= 16 << 20:
                        out.write(b"".join(parts))
                        parts, size = [], 0
                out.write(b"".join(parts))
                del data, src
        return out.whole.hexdigest()

    def abort(self) -> None:
        """Remove the staging files (after :meth:`finish`, or to give up: an earlier index then stays as it was)."""
        self._stage.remove()
        if self._swap is not None:
            self._swap.discard()

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _CodesWriter:
    """Writes ``codes.safetensors`` as rows stream in (final row order): the quantiser's arrays, the codes and
    the row digests (kept in memory, 8 bytes a row, and written last)."""

    def __init__(self, path: Path, codebook: Codebook, n: int) -> None:
        self.path, self.codebook, self.n = path, codebook, n
        self.digests = np.zeros(n, np.uint64)
        self.done = 0
        self.record: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _CodesWriter:
        specs: dict[str, Any] = {}
        pos = 0
        parts = [(k, v.dtype, v.shape) for k, v in self.codebook.params.items()]
        parts += [
            ("codes", np.dtype(np.uint8), (self.n, self.codebook.code_size)),
            ("row_blake2b", np.dtype(np.uint64), (self.n,)),
        ]
        for name, dtype, shape in parts:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            specs[name] = {
                "dtype": tensor_files.safetensors_dtype(dtype),
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            pos += nbytes
        header = json.dumps(specs, separators=(",", ":")).encode("utf-8")
        header += b" " * (-(8 + len(header)) % 64)
        self.out = tensor_files.HashingWriter(
            self._stack.enter_context(atomic_files.atomic_writer(self.path)), BLOCK_BYTES
        )
        self.out.write(len(header).to_bytes(8, "little"))
        self.out.write(header)
        for v in self.codebook.params.values():
            self.out.write(np.ascontiguousarray(v))
        return self

    def encode(self, rows: NDArray[np.float16]) -> NDArray[np.uint8]:
        """The codes ``(b, code_size)`` of rows ``(b, D)`` (thread-safe: writes nothing)."""
        return self.codebook.encode(_as_float32(rows))

    def add(self, rows: NDArray[np.float16], codes: NDArray[np.uint8]) -> None:
        """Write the codes of the next rows ``(b, D)`` (from :meth:`encode`) and keep the rows' digests."""
        self.out.write(codes)
        self.digests[self.done : self.done + len(rows)] = row_digests(rows)
        self.done += len(rows)

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                if self.done != self.n:
                    raise ArtifactError(f"coded {self.done} of {self.n} gallery rows")
                self.out.write(self.digests)
                self.record = {"bytes": self.out.size, "sha256": self.out.whole.hexdigest()}
        finally:
            self._stack.__exit__(*exc)  # type: ignore[arg-type]


def _item_rows(
    names: Sequence[str], authors: Sequence[str], order: NDArray[np.int64]
) -> tuple[bytes, NDArray[np.int64], NDArray[np.uint64], NDArray[np.uint64]]:
    """The ``items.csv`` lines of photos ``order`` (:func:`~geoswc.core.item_lines.item_line`, joined), their
    lengths, and the :func:`~geoswc.gallery.search.item_key` of their ids and authors (0: no author), each ``(b,)``."""
    idx = order.tolist()
    names_in, authors_in = [names[i] for i in idx], [authors[i] for i in idx]
    lines = [item_line(pair) for pair in zip(names_in, authors_in, strict=True)]
    return (
        b"".join(lines),
        np.fromiter(map(len, lines), np.int64, len(lines)),
        item_keys(names_in),
        item_keys(authors_in, empty_is_zero=True),
    )


def _gather(src: NDArray[np.float16], rows: NDArray[np.int64]) -> NDArray[np.float16]:
    """``src[rows]`` ``(len(rows), D)`` of a memory-mapped ``src``, read in file order (the rows sorted) and put
    back in the order asked for."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), src.shape[1]), src.dtype)
    out[order] = src[rows[order]]
    return out


def _as_float32(rows: NDArray[np.float16]) -> NDArray[np.float32]:
    """``rows`` as float32 (exact; torch converts float16 several times faster than numpy)."""
    return torch.from_numpy(np.ascontiguousarray(rows)).float().numpy()


def _emit(
    out: tensor_files.HashingWriter,
    sink: _CodesWriter | None,
    rows: NDArray[np.float16],
    codes: NDArray[np.uint8] | None,
) -> None:
    """Write a batch of rows ``(b, D)`` to ``index.safetensors`` and, for a coded index, their codes and digests."""
    out.write(rows)
    if sink is not None and codes is not None:
        sink.add(rows, codes)
