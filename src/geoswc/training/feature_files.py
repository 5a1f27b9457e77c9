"""Feature caches written as they are computed: rows go to disk as the backbone produces them, and the cache's
files are written from there in input order, chunk by chunk, so extracting MP-16 never holds its features in
memory. What stays in memory is 16 bytes a photo (its key and the length of its item line).

A writer's staging folder (``.staging.<pid>.*`` inside the cache folder) holds ``features.bin`` (float16 rows
``(V, D)`` in arrival order) and ``items.bin`` (CSV lines). Under torchrun each rank keeps its staging as a part
(with ``keys.npy`` and ``lines.npy``), and rank 0 merges the parts by key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoswc.core import atomic_files, json_records, tensor_files
from geoswc.core.item_lines import item_line
from geoswc.core.progress import progress_bar

FEATURES_FORMAT = "geoswc-features/1"
ITEMS_HEADER = b"image,author,lat,lon\n"
CHUNK_ROWS = 4096
"""Rows copied at a time when the cache's files are written."""


@dataclass(frozen=True)
class CacheInfo:
    """What a feature cache's ``features.json`` records besides its digests."""

    backbone: dict[str, Any]
    backbone_fingerprint: str
    views: int
    dim: int
    seed: int


@dataclass(frozen=True)
class Part:
    """Rows staged by one writer: ``features.bin`` and ``items.bin`` in ``folder``, the key of each row and the
    byte length of its item line ``(n,)``."""

    folder: Path
    keys: np.ndarray
    lines: np.ndarray

    def save_index(self) -> None:
        """Keep the keys and line lengths beside the staged rows (a torchrun rank's part, for rank 0)."""
        np.save(self.folder / "keys.npy", self.keys)
        np.save(self.folder / "lines.npy", self.lines)

    @classmethod
    def load(cls, folder: Path) -> Part:
        """A part another rank staged (plain ``.npy`` arrays: ``allow_pickle`` stays off)."""
        return cls(
            folder, np.load(folder / "keys.npy", allow_pickle=False), np.load(folder / "lines.npy", allow_pickle=False)
        )


class FeatureWriter:
    """Stages feature rows ``(b, V, D)`` with their keys and items; :meth:`finish` writes the cache.

    Args:
        folder: the cache folder (the staging folder goes inside it).
        views, dim: the rows' shape.
    """

    def __init__(self, folder: str | Path, views: int, dim: int) -> None:
        self.folder = atomic_files.ensure_dir(folder)
        self.views, self.dim = int(views), int(dim)
        self._stage = atomic_files.Staging(self.folder, "features.bin", "items.bin")
        self.staging = self._stage.path
        self._rows, self._items = self._stage.files["features.bin"], self._stage.files["items.bin"]
        self._keys: list[np.ndarray] = []
        self._lines: list[np.ndarray] = []

    def add(
        self,
        keys: Sequence[int] | np.ndarray,
        feats: torch.Tensor | np.ndarray,
        names: Sequence[str],
        authors: Sequence[str],
        lat: Sequence[float],
        lon: Sequence[float],
    ) -> None:
        """Append rows: ``keys (b,)`` order the cache (input order), ``feats (b, V, D)``."""
        f = feats.detach().cpu().half().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float16)
        if f.shape[1:] != (self.views, self.dim) or len(f) != len(keys):
            raise ValueError(f"rows of shape {f.shape} for keys {len(keys)}, expected (b, {self.views}, {self.dim})")
        if not len(f):
            return  # an empty chunk (every photo of a batch refused): nothing to stage
        self._rows.write(memoryview(np.ascontiguousarray(f)).cast("B"))
        lines = [item_line(row[:2], row[2:]) for row in zip(names, authors, lat, lon, strict=True)]
        self._items.write(b"".join(lines))
        self._keys.append(np.asarray(keys, np.int64))
        self._lines.append(np.array([len(x) for x in lines], np.int64))

    def part(self) -> Part:
        """Close the staged files: the rows so far, as a :class:`Part`."""
        self._stage.close()
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        return Part(self.staging, cat(self._keys), cat(self._lines))

    def finish(self, info: CacheInfo, progress: bool = True) -> int:
        """Write the cache from the staged rows (see :func:`write_cache`); returns the number of rows."""
        try:
            return write_cache(self.folder, [self.part()], info, progress)
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the staging folder."""
        self._stage.remove()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def write_cache(folder: Path, parts: Sequence[Part], info: CacheInfo, progress: bool = True) -> int:
    """Write ``features.safetensors`` and ``items.csv`` from staged parts, rows in key order, ``CHUNK_ROWS`` at a
    time, then ``features.json`` (sealed; last, so that its presence marks a whole cache). Returns the rows."""
    sizes = [len(p.keys) for p in parts]
    n = sum(sizes)
    order = np.argsort(np.concatenate([p.keys for p in parts]) if parts else np.zeros(0, np.int64), kind="stable")
    which = np.repeat(np.arange(len(parts), dtype=np.int32), sizes)[order]  # the part of each output row
    local = order - np.repeat(np.cumsum([0, *sizes[:-1]]), sizes)[order]  # and its row in that part
    del order
    sources = [_Source(p, info) for p in parts]
    header = json.dumps(
        {
            "features": {
                "dtype": "F16",
                "shape": [n, info.views, info.dim],
                "data_offsets": [0, n * info.views * info.dim * 2],
            },
            "__metadata__": {"format": FEATURES_FORMAT},
        },
        separators=(",", ":"),
    ).encode()
    header += b" " * (-(8 + len(header)) % 8)
    with (
        atomic_files.atomic_writer(folder / "features.safetensors") as raw_f,
        atomic_files.atomic_writer(folder / "items.csv") as raw_i,
        progress_bar(total=n, desc="writing features", unit="img", show=progress) as bar,
    ):
        out_f, out_i = tensor_files.HashingWriter(raw_f, 1 << 30), tensor_files.HashingWriter(raw_i, 1 << 30)
        out_f.write(len(header).to_bytes(8, "little"))
        out_f.write(header)
        out_i.write(ITEMS_HEADER)
        for s in range(0, n, CHUNK_ROWS):
            w, loc = which[s : s + CHUNK_ROWS], local[s : s + CHUNK_ROWS]
            chunk = np.empty((len(w), info.views, info.dim), np.float16)
            for k in np.unique(w):
                mask = w == k
                chunk[mask] = sources[k].rows[loc[mask]]
            out_f.write(chunk)
            out_i.write(b"".join(sources[k].item(j) for k, j in zip(w.tolist(), loc.tolist(), strict=True)))
            bar.update(len(w))
    atomic_files.write_json(
        folder / "features.json",
        json_records.seal(
            {
                "format": FEATURES_FORMAT,
                "backbone_fingerprint": info.backbone_fingerprint,
                "backbone": info.backbone,
                "size": n,
                "views": info.views,
                "seed": info.seed,
                "dim": info.dim,
                "tensors_sha256": out_f.whole.hexdigest(),
                "items_sha256": out_i.whole.hexdigest(),
            }
        ),
    )
    return n


class _Source:
    """A part's staged rows ``(n, V, D)`` and item lines, memory-mapped."""

    def __init__(self, part: Part, info: CacheInfo) -> None:
        n = len(part.keys)
        self.rows = (
            np.memmap(part.folder / "features.bin", np.float16, mode="r", shape=(n, info.views, info.dim))
            if n
            else np.zeros((0, info.views, info.dim), np.float16)
        )
        total = int(part.lines.sum())
        self.items = np.memmap(part.folder / "items.bin", np.uint8, mode="r", shape=(total,)) if total else b""
        self.ends = np.cumsum(part.lines)
        self.lines = part.lines

    def item(self, j: int) -> bytes:
        end = int(self.ends[j])
        return bytes(self.items[end - int(self.lines[j]) : end])
