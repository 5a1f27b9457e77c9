"""The background gallery: L2-normalised retrieval embeddings of geotagged photos, grouped by cell.

On disk (a folder): ``index.json`` (format, model and cell-table fingerprints, sha256 of the tensors),
``index.safetensors`` (float16 embeddings, positions, cells) and ``items.csv`` (image id, author).
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray

from . import storage
from .errors import ArtifactError, InputError, ModelMismatchError

if TYPE_CHECKING:
    from .model import GeoModel

log = logging.getLogger(__name__)

INDEX_FORMAT = "geoswc-index/1"


@dataclass
class Gallery:
    """Gallery embeddings ``(N, D)`` with their positions ``(N,)`` and cells ``(N,)`` (-1: no cell).

    Embeddings are kept float16 on disk and float32 in memory (CPU matmuls on float16 are slow).
    """

    embeddings: NDArray[np.float32]
    lat: NDArray[np.float64]
    lon: NDArray[np.float64]
    cell: NDArray[np.int64]
    names: list[str]
    authors: list[str]
    model_fingerprint: str
    cells_fingerprint: str
    num_cells: int
    _by_cell: tuple[NDArray[np.int64], NDArray[np.int64]] = field(init=False, repr=False)
    _name_to_row: dict[str, int] = field(init=False, repr=False)
    _author_rows: dict[str, NDArray[np.int64]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (self.embeddings.shape[0] == len(self.lat) == len(self.lon) == len(self.cell) == n == len(self.authors)):
            raise ArtifactError("gallery arrays have different lengths")
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        order = np.argsort(self.cell, kind="stable")
        starts = np.searchsorted(self.cell[order], np.arange(self.num_cells + 1))
        self._by_cell = (order.astype(np.int64), starts.astype(np.int64))
        self._name_to_row = {name: i for i, name in enumerate(self.names)}
        rows: dict[str, list[int]] = defaultdict(list)
        for i, a in enumerate(self.authors):
            if a:
                rows[a].append(i)
        self._author_rows = {a: np.array(r, np.int64) for a, r in rows.items()}

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def cell_rows(self, cell: int) -> NDArray[np.int64]:
        """Rows of the gallery photos inside ``cell``."""
        order, starts = self._by_cell
        if not 0 <= cell < self.num_cells:
            return np.zeros(0, np.int64)
        return order[starts[cell]:starts[cell + 1]]

    def cell_sizes(self) -> NDArray[np.int64]:
        return np.diff(self._by_cell[1])

    def excluded_rows(self, names: Iterable[str] = (), authors: Iterable[str] = ()) -> NDArray[np.int64]:
        """Rows to hide from a query: the named photos and every photo of the named authors."""
        rows = [self._name_to_row[n] for n in names if n in self._name_to_row]
        parts = [np.array(rows, np.int64)] + [self._author_rows[a] for a in authors if a in self._author_rows]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def search(self, query: NDArray, k: int, rows: NDArray[np.int64] | None = None,
               exclude: NDArray[np.int64] | None = None) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Top-``k`` rows by cosine similarity (higher is better), most similar first.

        Args:
            query: ``(D,)`` unit vector.
            rows: candidate rows (e.g. :meth:`cell_rows`); None searches the whole gallery.
            exclude: rows never returned (leakage guard).
        """
        cand = np.arange(len(self)) if rows is None else rows
        if exclude is not None and exclude.size:
            cand = cand[~np.isin(cand, exclude)]
        if cand.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        sim = self.embeddings[cand] @ np.asarray(query, np.float32)
        if cand.size > k:
            top = np.argpartition(-sim, k - 1)[:k]
        else:
            top = np.arange(cand.size)
        top = top[np.argsort(-sim[top], kind="stable")]
        return cand[top], sim[top]

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        sha = storage.save_tensors(folder / "index.safetensors", {
            "embeddings": self.embeddings.astype(np.float16),
            "lat": self.lat.astype(np.float64),
            "lon": self.lon.astype(np.float64),
            "cell": self.cell.astype(np.int64),
        })
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "author"])
        w.writerows(zip(self.names, self.authors, strict=True))
        items = buf.getvalue()
        storage.write_text(folder / "items.csv", items)
        meta = {
            "format": INDEX_FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "cells_fingerprint": self.cells_fingerprint,
            "num_cells": self.num_cells,
            "size": len(self),
            "dim": self.dim,
            "tensors_sha256": sha,
            "items_sha256": storage.sha256_bytes(items.encode()),
            **(extra or {}),
        }
        storage.write_json(folder / "index.json", meta)  # written last: its presence marks a whole index

    @classmethod
    def load(cls, folder: str | Path, model_fingerprint: str | None = None) -> Gallery:
        """Load an index, refusing one built by another model when ``model_fingerprint`` is given."""
        folder = Path(folder)
        meta = storage.read_json(folder / "index.json", "gallery index")
        if meta.get("format") != INDEX_FORMAT:
            raise ArtifactError(f"{folder} is not a geoswc gallery index (format {meta.get('format')!r})")
        if model_fingerprint is not None and meta.get("model_fingerprint") != model_fingerprint:
            raise ModelMismatchError(
                f"the gallery index {folder} was built with model {meta.get('model_fingerprint')}, but the "
                f"model in use is {model_fingerprint}; rebuild it with `geoswc index --model <model dir>`"
            )
        t = storage.load_tensors(folder / "index.safetensors", "gallery index tensors", meta.get("tensors_sha256"))
        items_path = folder / "items.csv"
        if not items_path.is_file():
            raise ArtifactError(f"gallery index {folder} lacks items.csv; rebuild it")
        raw = items_path.read_bytes()
        if meta.get("items_sha256") and storage.sha256_bytes(raw) != meta["items_sha256"]:
            raise ArtifactError(f"gallery index {items_path} is damaged or was changed; rebuild the index")
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))[1:]
        try:
            return cls(
                embeddings=t["embeddings"].float().numpy(),
                lat=t["lat"].double().numpy(), lon=t["lon"].double().numpy(),
                cell=t["cell"].long().numpy(),
                names=[r[0] for r in rows], authors=[r[1] if len(r) > 1 else "" for r in rows],
                model_fingerprint=str(meta.get("model_fingerprint", "")),
                cells_fingerprint=str(meta.get("cells_fingerprint", "")),
                num_cells=int(meta["num_cells"]),
            )
        except (KeyError, ValueError, IndexError) as e:
            raise ArtifactError(f"gallery index {folder} is incomplete ({e}); rebuild it") from e


def build_gallery(model: GeoModel, features: torch.Tensor, lat: np.ndarray, lon: np.ndarray, names: list[str],
                  authors: list[str], batch_size: int = 4096) -> Gallery:
    """Embed backbone features ``(N, D)`` with the model's RRM and group them by the model's cells."""
    if features.ndim != 2 or features.shape[1] != model.config.backbone.feature_dim:
        raise InputError(f"gallery features must be (N, {model.config.backbone.feature_dim}), "
                         f"got {tuple(features.shape)}")
    model.eval()
    with torch.inference_mode():
        emb = torch.cat([model.rrm(features[s:s + batch_size].float())
                         for s in range(0, len(features), batch_size)]).numpy()
    cell = model.cells.assign(lat, lon)
    model.compute_fingerprints()  # the heads may have been trained since the last save
    return Gallery(emb, np.asarray(lat, np.float64), np.asarray(lon, np.float64), cell, list(names), list(authors),
                   model.fingerprint, model.cells.fingerprint, len(model.cells))
