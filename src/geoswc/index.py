"""The background gallery: L2-normalised retrieval embeddings of geotagged photos, grouped by cell.

On disk (a folder), format ``geoswc-index/2``:

* ``index.safetensors``: float16 embeddings ``(N, D)`` with rows grouped by cell (CSR: ``cell_offsets``),
  positions, cells, and lookup tables of the photos' ids and authors. It is memory-mapped, not read, so an
  index of millions of photos opens in well under a second; a query reads only its cell's rows.
* ``items.csv``: image id and author of each row, in row order (human-readable; rows read on demand).
* ``index.json``: format, model and cell-table fingerprints, and checksums: the sha256 of ``items.csv`` and
  of every 64 MiB block of ``index.safetensors``. Everything but the embeddings is verified at load (all of
  it for files up to 512 MiB); an embedding block is verified the first time a search reads it.
  ``index.json`` is written last: its presence marks a whole index.

Building streams: :class:`GalleryWriter` takes chunks, writes each sorted by cell, and compacts them into
the final layout at the end. Indexes written by earlier versions (``geoswc-index/1``) still load.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, overload

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from . import storage
from .errors import ArtifactError, InputError, ModelMismatchError

if TYPE_CHECKING:
    from .model import GeoModel

log = logging.getLogger(__name__)

INDEX_FORMAT = "geoswc-index/2"
LEGACY_FORMAT = "geoswc-index/1"
BLOCK_BYTES = 64 << 20
"""Checksum granularity of ``index.safetensors``."""
EAGER_VERIFY_BYTES = 512 << 20
"""Files up to this size are verified completely at load."""
_CHUNK_ROWS = 1 << 16
_MARGIN = 2.0**-8
"""Score margin (in units of ``|q| * max row norm``) that covers the float16 kernel's rounding."""
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64,
              "U64": np.uint64}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


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


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of ``index.json``'s fields (but this one), canonically serialised."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _csv_line(name: str, author: str) -> str:
    if any(c in s for s in (name, author) for c in ',"\n\r'):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([name, author])
        return buf.getvalue()
    return f"{name},{author}\n"


def _lookup_table(keys: NDArray[np.uint64], valid: NDArray[np.bool_] | None = None
                  ) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Sorted ``(keys, rows)`` for binary-search lookups; rows where ``valid`` is False are left out."""
    rows = np.arange(len(keys), dtype=np.int64) if valid is None else np.flatnonzero(valid).astype(np.int64)
    k = keys[rows]
    order = np.argsort(k, kind="stable")
    return k[order], rows[order]


class _ItemColumn(Sequence[str]):
    """One column (0: image id, 1: author) of a memory-mapped ``items.csv``, parsed a row at a time."""

    def __init__(self, data: NDArray[np.uint8], offsets: NDArray[np.int64], column: int) -> None:
        self._data, self._offsets, self._column = data, offsets, column

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        line = bytes(self._data[self._offsets[i]:self._offsets[i + 1]]).decode("utf-8")
        fields = next(csv.reader([line])) if '"' in line else line.rstrip("\n").split(",")
        return fields[self._column] if self._column < len(fields) else ""

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"<{len(self)} gallery {'authors' if self._column else 'image ids'}>"


class _BlockVerifier:
    """Checks blocks of a file against recorded sha256s, each block once (thread-safe)."""

    def __init__(self, path: Path, data: NDArray[np.uint8], block_bytes: int, digests: list[str]) -> None:
        self.path, self._data, self.block_bytes, self._digests = path, data, block_bytes, digests
        self._done = np.zeros(len(digests), dtype=bool)
        self._lock = threading.Lock()

    def check(self, start: int, stop: int) -> None:
        """Verify the blocks overlapping bytes ``[start, stop)``."""
        if stop <= start:
            return
        first, last = start // self.block_bytes, (stop - 1) // self.block_bytes
        todo = [b for b in range(first, last + 1) if not self._done[b]]
        if not todo:
            return
        with self._lock:
            for b in todo:
                if self._done[b]:
                    continue
                chunk = self._data[b * self.block_bytes:(b + 1) * self.block_bytes]
                if hashlib.sha256(memoryview(chunk)).hexdigest() != self._digests[b]:
                    raise ArtifactError(
                        f"gallery index tensors {self.path} are damaged or were changed (block {b} of "
                        f"{len(self._digests)} fails its checksum); rebuild the index or restore the original file"
                    )
                self._done[b] = True

    def check_all(self) -> None:
        self.check(0, len(self._data))


@dataclass
class Gallery:
    """Gallery embeddings ``(N, D)`` with their positions ``(N,)`` and cells ``(N,)`` (-1: no cell).

    Rows are kept grouped by cell (stably: a new gallery's rows are reordered by cell, keeping the given
    order within a cell), so a cell is a contiguous slice. Embeddings are float16 in memory as on disk;
    search scores them with a float16 kernel and re-ranks the survivors in float32, which gives the exact
    float32 top-k over the stored vectors.
    """

    embeddings: NDArray[np.float16]
    lat: NDArray[np.float64]
    lon: NDArray[np.float64]
    cell: NDArray[np.integer]
    names: Sequence[str]
    authors: Sequence[str]
    model_fingerprint: str
    cells_fingerprint: str
    num_cells: int
    _offsets: NDArray[np.int64] = field(init=False, repr=False)
    _name_lookup: tuple[NDArray[np.uint64], NDArray[np.int64]] = field(init=False, repr=False)
    _author_lookup: tuple[NDArray[np.uint64], NDArray[np.int64]] = field(init=False, repr=False)
    _max_norm: float = field(init=False, repr=False, default=1.0)
    _verifier: _BlockVerifier | None = field(init=False, repr=False, default=None)
    _row0: int = field(init=False, repr=False, default=0)
    """Byte offset of the embeddings in the verified file."""

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.embeddings) == len(self.lat) == len(self.lon) == len(self.cell) == n == len(self.authors)):
            raise ArtifactError("gallery arrays have different lengths")
        emb = np.asarray(self.embeddings)
        if emb.ndim != 2:
            raise InputError(f"gallery embeddings must be (N, D), got shape {emb.shape}")
        cell = np.asarray(self.cell, np.int64)
        if n and (cell.min() < -1 or cell.max() >= self.num_cells):
            raise ArtifactError(f"gallery cells must lie in [-1, {self.num_cells}); rebuild the index")
        order = np.argsort(cell, kind="stable")
        if n and not (order == np.arange(n)).all():
            emb, cell = emb[order], cell[order]
            self.lat, self.lon = np.asarray(self.lat)[order], np.asarray(self.lon)[order]
            self.names = [self.names[i] for i in order]
            self.authors = [self.authors[i] for i in order]
        self.embeddings = np.ascontiguousarray(emb, dtype=np.float16)
        self.lat, self.lon = np.asarray(self.lat, np.float64), np.asarray(self.lon, np.float64)
        self.cell = cell
        self.names, self.authors = list(self.names), list(self.authors)
        self._offsets = np.searchsorted(cell, np.arange(self.num_cells + 1)).astype(np.int64)
        self._name_lookup = _lookup_table(np.array([_key(s) for s in self.names], np.uint64))
        self._author_lookup = _lookup_table(np.array([_key(s) for s in self.authors], np.uint64),
                                            np.array([bool(a) for a in self.authors], bool))
        self._max_norm = float(np.linalg.norm(self.embeddings.astype(np.float32), axis=1).max()) if n else 1.0
        self._verifier, self._row0 = None, 0

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def cell_range(self, cell: int) -> tuple[int, int]:
        """``(start, stop)``: the rows of ``cell`` are ``start .. stop - 1`` (empty if unknown)."""
        if not 0 <= cell < self.num_cells:
            return 0, 0
        return int(self._offsets[cell]), int(self._offsets[cell + 1])

    def cell_rows(self, cell: int) -> NDArray[np.int64]:
        """Rows of the gallery photos inside ``cell``."""
        return np.arange(*self.cell_range(cell), dtype=np.int64)

    def cell_sizes(self) -> NDArray[np.int64]:
        return np.diff(self._offsets)

    def excluded_rows(self, names: Iterable[str] = (), authors: Iterable[str] = ()) -> NDArray[np.int64]:
        """Rows to hide from a query: the named photos and every photo of the named authors."""
        parts = [np.zeros(0, np.int64)]
        for values, (keys, rows), column in ((names, self._name_lookup, self.names),
                                             (authors, self._author_lookup, self.authors)):
            for v in values:
                if not v:
                    continue
                k = np.uint64(_key(v))
                hit = rows[np.searchsorted(keys, k, "left"):np.searchsorted(keys, k, "right")]
                parts.append(np.array([r for r in hit if column[int(r)] == v], np.int64))
        return np.unique(np.concatenate(parts))

    # -- search ---------------------------------------------------------------------------------------

    def _rows_view(self, start: int, stop: int) -> NDArray[np.float16]:
        if self._verifier is not None:
            row_bytes = self.dim * 2
            self._verifier.check(self._row0 + start * row_bytes, self._row0 + stop * row_bytes)
        return self.embeddings[start:stop]

    def _gather(self, rows: NDArray[np.int64]) -> NDArray[np.float16]:
        if self._verifier is not None and rows.size:
            row_bytes = self.dim * 2
            blocks = np.unique(np.concatenate([(self._row0 + rows * row_bytes) // BLOCK_BYTES,
                                               (self._row0 + (rows + 1) * row_bytes - 1) // BLOCK_BYTES]))
            for b in blocks:
                self._verifier.check(int(b) * BLOCK_BYTES, int(b) * BLOCK_BYTES + 1)
        return self.embeddings[rows]

    def _approx_scores(self, q16: torch.Tensor, start: int, stop: int) -> NDArray[np.float32]:
        """float16-kernel scores of rows ``[start, stop)`` (error well under ``_MARGIN``)."""
        out = np.empty(stop - start, np.float32)
        with _one_thread():
            for s in range(start, stop, _CHUNK_ROWS):
                e = min(stop, s + _CHUNK_ROWS)
                block = torch.from_numpy(self._rows_view(s, e))
                out[s - start:e - start] = torch.mv(block, q16).float().numpy()
        return out

    def _segments(self, rows: NDArray[np.int64] | None) -> list[tuple[int, int]] | None:
        """``rows`` as a list of row ranges when it is sorted and gap-free (cells), else None."""
        if rows is None:
            return [(0, len(self))]
        if rows.size == 0:
            return []
        start = int(rows[0])
        if int(rows[-1]) - start + 1 == rows.size and (rows.size == 1 or bool((np.diff(rows) == 1).all())):
            return [(start, start + rows.size)]
        return None

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
        rows = None if rows is None else np.asarray(rows, np.int64)
        return self._search(query, k, self._segments(rows), rows, exclude)

    def search_cells(self, query: ArrayLike, k: int, cells: Iterable[int],
                     exclude: NDArray[np.int64] | None = None) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Like :meth:`search` over the union of ``cells`` (e.g. the chosen cell and its neighbours)."""
        segs = sorted({self.cell_range(int(c)) for c in cells})
        return self._search(query, k, [s for s in segs if s[1] > s[0]], None, exclude)

    def _search(self, query: ArrayLike, k: int, segments: list[tuple[int, int]] | None,
                rows: NDArray[np.int64] | None, exclude: NDArray[np.int64] | None
                ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        q = np.asarray(query, np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise InputError(f"query has {q.shape[0]} dimensions, the gallery {self.dim}")
        empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
        qnorm = float(np.linalg.norm(q))
        if k <= 0 or len(self) == 0 or not np.isfinite(qnorm):
            return empty
        q16 = torch.from_numpy(q / qnorm if qnorm > 0 else q).half()
        if segments is None:  # scattered rows: gather them
            assert rows is not None
            cand = rows
            with _one_thread():
                approx = torch.mv(torch.from_numpy(self._gather(rows)), q16).float().numpy() if rows.size else \
                    np.zeros(0, np.float32)
        else:
            if not segments:
                return empty
            cand = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in segments])
            approx = np.concatenate([self._approx_scores(q16, a, b) for a, b in segments])
        if exclude is not None and exclude.size:
            approx[np.isin(cand, exclude)] = -np.inf
        valid = int(np.isfinite(approx).sum())
        if valid == 0:
            return empty
        if valid > k:
            kth = np.partition(approx, approx.size - k)[approx.size - k]
            keep = approx >= kth - _MARGIN * max(self._max_norm, 1.0)
        else:
            keep = np.isfinite(approx)
        cand = cand[keep]
        exact = self._gather(cand).astype(np.float32) @ q
        order = np.lexsort((cand, -exact))[:k]
        return cand[order], exact[order]

    # -- files ----------------------------------------------------------------------------------------

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """Write the index folder (streamed in chunks; ``extra`` goes into ``index.json``)."""
        w = GalleryWriter(folder, self.dim, self.num_cells, self.model_fingerprint, self.cells_fingerprint, extra)
        try:
            for s in range(0, len(self), _CHUNK_ROWS):
                e = min(len(self), s + _CHUNK_ROWS)
                w.add(self._rows_view(s, e), self.lat[s:e], self.lon[s:e], self.cell[s:e],
                      list(self.names[s:e]), list(self.authors[s:e]))
            w.finish()
        finally:
            w.abort()

    def verify(self) -> None:
        """Check every byte of a loaded index against its checksums (a search checks what it reads)."""
        if self._verifier is not None:
            self._verifier.check_all()

    @classmethod
    def load(cls, folder: str | Path, model_fingerprint: str | None = None, verify: bool = False) -> Gallery:
        """Open an index (memory-mapped), refusing one built by another model when ``model_fingerprint`` is
        given.

        Args:
            verify: check every embedding block now instead of on first use.

        Raises:
            ArtifactError: a missing, truncated or changed file, or an unknown format.
            ModelMismatchError: the index was built with another model.
        """
        folder = Path(folder)
        meta = storage.read_json(folder / "index.json", "gallery index")
        fmt = meta.get("format")
        if fmt not in (INDEX_FORMAT, LEGACY_FORMAT):
            raise ArtifactError(f"{folder} is not a geoswc gallery index (format {fmt!r})")
        if model_fingerprint is not None and meta.get("model_fingerprint") != model_fingerprint:
            raise ModelMismatchError(
                f"the gallery index {folder} was built with model {meta.get('model_fingerprint')}, but the "
                f"model in use is {model_fingerprint}; rebuild it with `geoswc index --model <model dir>`"
            )
        if fmt == LEGACY_FORMAT:
            return cls._load_legacy(folder, meta)
        try:
            return cls._load_v2(folder, meta, verify)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ArtifactError(f"gallery index {folder} is incomplete or inconsistent ({e}); rebuild it") from e

    @classmethod
    def _load_v2(cls, folder: Path, meta: dict[str, Any], verify: bool) -> Gallery:
        if meta.get("meta_sha256") != _meta_digest(meta):  # every field of index.json, extras included
            raise ArtifactError(f"gallery index {folder / 'index.json'} is damaged or was changed; rebuild the index "
                                "or restore the original file")
        path = folder / "index.safetensors"
        tinfo = meta["tensors"]
        if not path.is_file():
            raise ArtifactError(f"gallery index tensors not found: {path} is missing")
        size = path.stat().st_size
        if size != int(tinfo["bytes"]):
            raise ArtifactError(f"gallery index tensors {path} are truncated or were changed ({size} bytes, "
                                f"{tinfo['bytes']} expected); rebuild the index or restore the original file")
        data = np.memmap(path, np.uint8, mode="c") if size else np.zeros(0, np.uint8)
        verifier = _BlockVerifier(path, data, int(tinfo["block_bytes"]), list(tinfo["block_sha256"]))
        if len(verifier._digests) != -(-size // verifier.block_bytes):
            raise ArtifactError(f"gallery index {folder}/index.json does not match {path}; rebuild the index")
        header_len = int.from_bytes(bytes(data[:8]), "little")
        if not 0 < header_len <= size - 8:
            raise ArtifactError(f"gallery index tensors {path} are damaged (bad header); rebuild the index")
        verifier.check(0, 8 + header_len)
        header = json.loads(bytes(data[8:8 + header_len]).decode("utf-8"))
        header.pop("__metadata__", None)
        base = 8 + header_len
        t: dict[str, np.ndarray] = {}
        for name, spec in header.items():
            a, b = spec["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[spec["dtype"]])
            t[name] = data[base + a:base + b].view(dtype).reshape(spec["shape"])
        row0 = base + int(header["embeddings"]["data_offsets"][0])
        verifier.check(0, row0)  # everything but the embeddings
        if verify or size <= EAGER_VERIFY_BYTES:
            verifier.check_all()
        items_path = folder / "items.csv"
        if not items_path.is_file():
            raise ArtifactError(f"gallery index {folder} lacks items.csv; rebuild it")
        if storage.sha256_file(items_path) != meta["items_sha256"]:
            raise ArtifactError(f"gallery index {items_path} is damaged or was changed; rebuild the index")
        items = np.memmap(items_path, np.uint8, mode="r") if items_path.stat().st_size else np.zeros(0, np.uint8)
        emb, offsets, n = t["embeddings"], t["cell_offsets"], int(meta["size"])
        if emb.shape != (n, int(meta["dim"])) or len(offsets) != int(meta["num_cells"]) + 1 or \
                len(t["item_offsets"]) != n + 1 or (n and int(t["item_offsets"][-1]) != len(items)):
            raise ArtifactError(f"gallery index {folder} is inconsistent with its index.json; rebuild it")
        g = cls.__new__(cls)
        g.embeddings, g.lat, g.lon, g.cell = emb, t["lat"], t["lon"], t["cell"]
        g.names = _ItemColumn(items, t["item_offsets"], 0)
        g.authors = _ItemColumn(items, t["item_offsets"], 1)
        g.model_fingerprint = str(meta.get("model_fingerprint", ""))
        g.cells_fingerprint = str(meta.get("cells_fingerprint", ""))
        g.num_cells = int(meta["num_cells"])
        g._offsets = np.asarray(offsets, np.int64)
        g._name_lookup = (t["name_keys"], t["name_rows"])
        g._author_lookup = (t["author_keys"], t["author_rows"])
        g._max_norm = float(meta.get("max_norm", 1.0))
        g._verifier, g._row0 = verifier, row0
        return g

    @classmethod
    def _load_legacy(cls, folder: Path, meta: dict[str, Any]) -> Gallery:
        # every key is required: a damaged key name must not switch its check off
        storage.require_keys(meta, ("model_fingerprint", "cells_fingerprint", "num_cells", "size", "dim",
                                    "tensors_sha256", "items_sha256"), "gallery index", folder / "index.json")
        t = storage.load_tensors(folder / "index.safetensors", "gallery index tensors", meta["tensors_sha256"])
        items_path = folder / "items.csv"
        if not items_path.is_file():
            raise ArtifactError(f"gallery index {folder} lacks items.csv; rebuild it")
        raw = items_path.read_bytes()
        if storage.sha256_bytes(raw) != meta["items_sha256"]:
            raise ArtifactError(f"gallery index {items_path} is damaged or was changed; rebuild the index")
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))[1:]
        if t["embeddings"].shape != (meta["size"], meta["dim"]) or len(rows) != meta["size"]:
            raise ArtifactError(f"gallery index {folder / 'index.json'} does not match its tensors; rebuild it")
        try:
            return cls(
                embeddings=t["embeddings"].numpy(),
                lat=t["lat"].double().numpy(), lon=t["lon"].double().numpy(),
                cell=t["cell"].long().numpy(),
                names=[r[0] for r in rows], authors=[r[1] if len(r) > 1 else "" for r in rows],
                model_fingerprint=str(meta.get("model_fingerprint", "")),
                cells_fingerprint=str(meta.get("cells_fingerprint", "")),
                num_cells=int(meta["num_cells"]),
            )
        except (KeyError, ValueError, IndexError) as e:
            raise ArtifactError(f"gallery index {folder} is incomplete ({e}); rebuild it") from e


class _HashingFile:
    """Writes a file sequentially, keeping the sha256 of the whole and of every ``BLOCK_BYTES`` block."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.size = f, 0
        self.whole, self._block = hashlib.sha256(), hashlib.sha256()
        self.blocks: list[str] = []

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        mv = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        self.f.write(mv)
        self.whole.update(mv)
        while len(mv):
            room = BLOCK_BYTES - self.size % BLOCK_BYTES
            part, mv = mv[:room], mv[room:]
            self._block.update(part)
            self.size += len(part)
            if self.size % BLOCK_BYTES == 0:
                self.blocks.append(self._block.hexdigest())
                self._block = hashlib.sha256()

    def close_blocks(self) -> list[str]:
        if self.size % BLOCK_BYTES:
            self.blocks.append(self._block.hexdigest())
        return self.blocks


class GalleryWriter:
    """Streams a gallery into an index folder without holding its embeddings in memory.

    Each :meth:`add` appends a chunk, sorted by cell, to a staging folder inside ``folder``; :meth:`finish`
    compacts the chunks into the cell-grouped layout (sequential copies of contiguous slices), writes
    ``index.safetensors`` and ``items.csv`` atomically, then ``index.json``. Memory use is about 60 bytes
    per photo (positions, cells, id hashes) plus one chunk.

    Args:
        folder: the index folder to write.
        dim: embedding width D.
        num_cells: cells of the model's cell table.
        extra: more fields for ``index.json``.
    """

    def __init__(self, folder: str | Path, dim: int, num_cells: int, model_fingerprint: str,
                 cells_fingerprint: str, extra: dict | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim, self.num_cells = int(dim), int(num_cells)
        self.model_fingerprint, self.cells_fingerprint, self.extra = model_fingerprint, cells_fingerprint, extra
        self._staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.folder))
        self._emb = open(self._staging / "embeddings.bin", "wb")  # noqa: SIM115 - closed in finish/abort
        self._items = open(self._staging / "items.bin", "wb")  # noqa: SIM115
        self._cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                                   ("lat", "lon", "cell", "line_len", "name_key", "author_key")}
        self._max_norm = 0.0
        self.size = 0

    def add(self, embeddings: ArrayLike | torch.Tensor, lat: ArrayLike, lon: ArrayLike, cell: ArrayLike,
            names: Sequence[str], authors: Sequence[str]) -> None:
        """Append ``b`` photos: unit embeddings ``(b, D)``, positions and cells ``(b,)``, ids and authors."""
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().numpy()
        emb = np.asarray(embeddings)
        cell = np.asarray(cell, np.int64)
        b = len(names)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise InputError(f"gallery embeddings must be (b, {self.dim}), got {emb.shape}")
        if not (len(emb) == len(lat) == len(lon) == len(cell) == b == len(authors)):
            raise InputError("gallery chunk arrays have different lengths")
        if b and (cell.min() < -1 or cell.max() >= self.num_cells):
            raise InputError(f"gallery cells must lie in [-1, {self.num_cells})")
        order = np.argsort(cell, kind="stable")
        emb16 = np.ascontiguousarray(emb[order], dtype=np.float16)
        if b:
            norms = torch.linalg.vector_norm(torch.from_numpy(emb16), dim=1, dtype=torch.float32)
            self._max_norm = max(self._max_norm, float(norms.max()))
        self._emb.write(memoryview(emb16).cast("B"))
        lines = [_csv_line(names[i], authors[i]).encode("utf-8") for i in order]
        self._items.write(b"".join(lines))
        c = self._cols
        c["lat"].append(np.asarray(lat, np.float64)[order])
        c["lon"].append(np.asarray(lon, np.float64)[order])
        c["cell"].append(cell[order].astype(np.int32))
        c["line_len"].append(np.array([len(x) for x in lines], np.int64))
        c["name_key"].append(np.array([_key(names[i]) for i in order], np.uint64))
        c["author_key"].append(np.array([_key(authors[i]) if authors[i] else 0 for i in order], np.uint64))
        self.size += b

    def finish(self) -> None:
        """Compact the chunks and write the index folder."""
        self._emb.close()
        self._items.close()
        col = {k: (np.concatenate(v) if v else np.zeros(0, {"lat": np.float64, "lon": np.float64,
                                                               "cell": np.int32}.get(k, np.int64)))
               for k, v in self._cols.items()}
        n, d = self.size, self.dim
        perm = np.argsort(col["cell"], kind="stable")  # chunks are sorted: perm is a few long runs
        breaks = np.flatnonzero(np.diff(perm) != 1) + 1 if n else np.zeros(0, np.int64)
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(perm, breaks)] if n else []
        cell = col["cell"][perm]
        line_len = col["line_len"]
        line_start = np.concatenate([[0], np.cumsum(line_len)])
        header_line = b"image,author\n"
        item_offsets = len(header_line) + np.concatenate([[0], np.cumsum(line_len[perm])]).astype(np.int64)
        name_keys, name_rows = _lookup_table(col["name_key"][perm])
        akeys = col["author_key"][perm]
        author_keys, author_rows = _lookup_table(akeys, akeys != 0)
        small: dict[str, np.ndarray] = {
            "lat": col["lat"][perm], "lon": col["lon"][perm],
            "cell_offsets": np.searchsorted(cell, np.arange(self.num_cells + 1)).astype(np.int64),
            "item_offsets": item_offsets, "name_keys": name_keys, "name_rows": name_rows,
            "author_keys": author_keys, "author_rows": author_rows, "cell": cell.astype(np.int32),
        }
        # Safetensors layout: 8-byte types first, then int32, then the float16 embeddings (all aligned).
        specs: dict[str, Any] = {}
        pos = 0
        for name, arr in small.items():
            specs[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                           "data_offsets": [pos, pos + arr.nbytes]}
            pos += arr.nbytes
        specs["embeddings"] = {"dtype": "F16", "shape": [n, d], "data_offsets": [pos, pos + n * d * 2]}
        specs["__metadata__"] = {"format": INDEX_FORMAT}
        header = json.dumps(specs, separators=(",", ":")).encode("utf-8")
        header += b" " * (-(8 + len(header)) % 64)

        items_sha = hashlib.sha256()
        with storage.atomic_writer(self.folder / "index.safetensors") as raw:
            out = _HashingFile(raw)
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for arr in small.values():
                out.write(arr)
            src = np.memmap(self._staging / "embeddings.bin", np.float16, mode="r", shape=(n, d)) if n else None
            for a, b in runs:
                assert src is not None
                for s in range(a, b, _CHUNK_ROWS):
                    out.write(np.asarray(src[s:min(b, s + _CHUNK_ROWS)]))
            del src
            tensors_bytes, blocks, whole = out.size, out.close_blocks(), out.whole.hexdigest()
        with storage.atomic_writer(self.folder / "items.csv") as f:
            f.write(header_line)
            items_sha.update(header_line)
            src_items = np.memmap(self._staging / "items.bin", np.uint8, mode="r") if line_start[-1] else None
            for a, b in runs:
                assert src_items is not None
                chunk = memoryview(np.asarray(src_items[line_start[a]:line_start[b]]))
                f.write(chunk)
                items_sha.update(chunk)
            del src_items
        meta = {
            "format": INDEX_FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "cells_fingerprint": self.cells_fingerprint,
            "num_cells": self.num_cells,
            "size": n,
            "dim": d,
            "max_norm": self._max_norm or 1.0,
            "tensors": {"bytes": tensors_bytes, "sha256": whole, "block_bytes": BLOCK_BYTES, "block_sha256": blocks},
            "items_sha256": items_sha.hexdigest(),
            **(self.extra or {}),
        }
        meta["meta_sha256"] = _meta_digest(meta)
        storage.write_json(self.folder / "index.json", meta)  # written last: its presence marks a whole index
        self.abort()

    def abort(self) -> None:
        """Remove the staging files (after :meth:`finish`, or to give up)."""
        with contextlib.suppress(Exception):
            self._emb.close()
            self._items.close()
        shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def embed(model: GeoModel, features: torch.Tensor) -> NDArray[np.float32]:
    """Retrieval embeddings ``(B, D)`` (unit rows) of backbone features ``(B, D)``, the one path by which
    gallery entries are embedded."""
    with torch.inference_mode():
        return model.rrm(features.float()).numpy()


def build_gallery(model: GeoModel, features: torch.Tensor, lat: np.ndarray, lon: np.ndarray, names: list[str],
                  authors: list[str], batch_size: int = 4096) -> Gallery:
    """Embed backbone features ``(N, D)`` with the model's RRM and group them by the model's cells."""
    if features.ndim != 2 or features.shape[1] != model.config.backbone.feature_dim:
        raise InputError(f"gallery features must be (N, {model.config.backbone.feature_dim}), "
                         f"got {tuple(features.shape)}")
    model.eval()
    emb = np.concatenate([embed(model, features[s:s + batch_size]) for s in range(0, len(features), batch_size)]
                         or [np.zeros((0, model.config.backbone.feature_dim), np.float32)])
    cell = model.cells.assign(lat, lon)
    model.compute_fingerprints()  # the heads may have been trained since the last save
    return Gallery(emb, np.asarray(lat, np.float64), np.asarray(lon, np.float64), cell, list(names), list(authors),
                   model.fingerprint, model.cells.fingerprint, len(model.cells))


def write_gallery(model: GeoModel, chunks: Iterable[tuple[torch.Tensor, ArrayLike, ArrayLike, Sequence[str],
                                                          Sequence[str]]],
                  folder: str | Path, extra: dict | None = None) -> int:
    """Stream a gallery of any size to ``folder``: ``chunks`` yields ``(features (b, D), lat, lon, names,
    authors)``; each chunk is embedded with the model's RRM, assigned to cells and written. Returns N."""
    model.eval()
    model.compute_fingerprints()
    with GalleryWriter(folder, model.config.backbone.feature_dim, len(model.cells), model.fingerprint,
                       model.cells.fingerprint, extra) as w:
        for feats, lat, lon, names, authors in chunks:
            w.add(embed(model, feats), lat, lon, model.cells.assign(lat, lon), names, authors)
        w.finish()
        return w.size
