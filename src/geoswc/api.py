"""The Python API: ``Geolocator.load().locate(path)``. The CLI, the evaluation and the web service all
call :meth:`Geolocator.locate_batch`, the one prediction path."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import SearchConfig
from .data import ImageDataset, collate
from .errors import ArtifactError, GeoswcError, ImageError, InputError
from .geo import haversine_km
from .images import DEFAULT_LIMITS, ImageLimits, ImageSource, read_gps
from .index import Gallery
from .model import GeoModel
from .places import Place, nearest_places
from .swc import estimate_from_neighbors, neighborhood, select_cell

log = logging.getLogger(__name__)

Method = Literal["swc", "classification", "retrieval"]
METHODS: tuple[str, ...] = ("swc", "classification", "retrieval")
Runtime = Literal["torch", "onnx"]
RUNTIMES: tuple[str, ...] = ("torch", "onnx")


def default_model_dir() -> Path:
    """The embedded default model (or ``$GEOSWC_MODEL`` when set)."""
    env = os.environ.get("GEOSWC_MODEL")
    if env:
        return Path(env)
    return Path(str(resources.files("geoswc") / "assets" / "default"))


@dataclass
class CellProbability:
    """A cell and the classifier's probability for it."""

    token: str
    """S2 cell token."""
    lat: float
    lon: float
    """Centroid of the cell's photos (the vMF mean direction)."""
    probability: float
    polygon: list[tuple[float, float]]
    """The cell's outline as ``(lat, lon)`` points, counter-clockwise (for maps)."""


@dataclass
class Neighbor:
    """A retrieved gallery photo."""

    image: str
    lat: float
    lon: float
    similarity: float
    """Cosine similarity of the retrieval embeddings (higher is more alike)."""
    cluster: int
    """DBSCAN label among the retrieved neighbours (-1: noise)."""


@dataclass
class ExifPosition:
    """The position recorded in the photo's own GPS EXIF, and how far the estimate is from it."""

    lat: float
    lon: float
    distance_km: float


@dataclass
class Prediction:
    """Where a photo was taken, and why the model thinks so."""

    image: str
    lat: float
    lon: float
    confidence: float
    """Prediction density: probability mass of the cells within ``r_km`` of the chosen cell."""
    method: str
    cell: str
    """S2 token of the searched cell: the most probable one, or with ``select_km`` > 0 the cell whose
    ``select_km`` neighbourhood holds the most probability mass."""
    cell_probability: float
    top_cells: list[CellProbability]
    neighbors: list[Neighbor] = field(default_factory=list)
    cluster: int = -1
    """DBSCAN label of the cluster whose mean is the estimate (-1: none)."""
    fallback: bool = False
    """True when the estimate is the cell centroid because the cell holds no gallery photo."""
    place: Place | None = None
    exif: ExifPosition | None = None
    cell_polygon: list[tuple[float, float]] = field(default_factory=list)
    """The searched cell's outline as ``(lat, lon)`` points (for maps; it may not be among ``top_cells``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LocateFailure:
    """A photo that could not be located, and why (batch jobs report these and carry on)."""

    image: str
    error: str
    kind: str = "corrupt"


def _label(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<image>"


class Geolocator:
    """A loaded model, its gallery and search settings: photos in, :class:`Prediction` out.

    Args:
        model: the trained model (with a backbone to locate images; heads-only works on features).
        gallery: the background gallery; None limits the methods to ``classification``.
        search: search-within-cell settings (default: the model's).
        device: torch device for the networks.
        limits: image size limits.
    """

    def __init__(self, model: GeoModel, gallery: Gallery | None = None, search: SearchConfig | None = None,
                 device: str | torch.device = "cpu", limits: ImageLimits = DEFAULT_LIMITS) -> None:
        if gallery is not None:
            if gallery.model_fingerprint != model.fingerprint:
                raise ArtifactError(
                    f"the gallery was built with model {gallery.model_fingerprint}, not with this model "
                    f"({model.fingerprint}); rebuild it with `geoswc index`"
                )
            if gallery.cells_fingerprint != model.cells.fingerprint or gallery.num_cells != len(model.cells):
                raise ArtifactError(
                    f"the gallery's cell table ({gallery.cells_fingerprint}, {gallery.num_cells} cells) is not the "
                    f"model's ({model.cells.fingerprint}, {len(model.cells)} cells); rebuild it with `geoswc index`"
                )
        self.model = model.to(device).eval()
        self.gallery = gallery
        self.search = search or model.config.search
        self.device = torch.device(device)
        self.limits = limits
        self._hoods: dict[float, Any] = {}

    def _hood(self, r_km: float):
        """Cached cell neighbourhood matrix for a radius (prediction density, cell selection)."""
        if r_km not in self._hoods:
            self._hoods[r_km] = neighborhood(self.model.cells.xyz, r_km)
        return self._hoods[r_km]

    @classmethod
    def load(cls, model_dir: str | Path | None = None, index_dir: str | Path | None = None, *,
             search: SearchConfig | None = None, device: str | torch.device = "cpu",
             with_backbone: bool = True, limits: ImageLimits = DEFAULT_LIMITS,
             runtime: Runtime = "torch") -> Geolocator:
        """Load a model folder (default: the embedded model) and its gallery index.

        Args:
            model_dir: a folder written by ``geoswc train``; None for the embedded default.
            index_dir: a folder written by ``geoswc index``; None uses ``<model_dir>/index`` if present.
            search: override the model's search settings.
            with_backbone: False for a heads-only locator that works on cached features.
            runtime: ``torch`` (eager) or ``onnx`` (the backbone exported once and run by onnxruntime, several
                times faster on CPU; needs ``pip install 'geoswc[fast]'``). See :meth:`use_runtime`.
        """
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise ArtifactError(f"no geoswc model in {model_dir} (config.json missing)")
        model = GeoModel.load(model_dir, with_backbone=with_backbone, device=device)
        if index_dir is None and (model_dir / "index" / "index.json").is_file():
            index_dir = model_dir / "index"
        gallery = Gallery.load(index_dir, model.fingerprint) if index_dir is not None else None
        if gallery is None:
            log.warning("no gallery index: only the 'classification' method is available")
        geo = cls(model, gallery, search, device, limits)
        if with_backbone:
            geo.use_runtime(runtime)
        return geo

    _fast_backbone: Any = None
    """The backbone :meth:`use_runtime` installed (None: the model's own, eager PyTorch)."""

    def use_runtime(self, runtime: Runtime, cache_dir: str | Path | None = None) -> None:
        """Run the backbone with ``torch`` (eager) or ``onnx`` (onnxruntime, CPU only; the export is cached
        under ``cache_dir``, default ``~/.cache/geoswc/onnx``, keyed by the backbone fingerprint).

        Raises:
            InputError: an unknown runtime, or ``onnx`` on a non-CPU device.
            GeoswcError: ``onnx`` without the ``fast`` extra installed.
        """
        if runtime not in RUNTIMES:
            raise InputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if runtime == "torch":
            self._fast_backbone = None
            return
        if self.device.type != "cpu":
            raise InputError("the onnx runtime runs on the CPU; use runtime='torch' on other devices")
        if self.model.backbone is None:
            raise GeoswcError("this Geolocator was loaded without a backbone")
        from .onnx_runtime import OnnxBackbone

        self._fast_backbone = OnnxBackbone.from_backbone(
            self.model.backbone, self.model.backbone_fingerprint, self.model.config.backbone.preprocess.image_size,
            cache_dir)

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    # -- the prediction path -------------------------------------------------------------------------

    @torch.inference_mode()
    def heads(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``features (B, D)`` -> ``(cell probabilities (B, C), unit embeddings (B, D))`` as NumPy."""
        logits, emb = self.model.heads(features.to(self.device).float())
        return torch.softmax(logits, -1).double().cpu().numpy(), emb.float().cpu().numpy()

    def predict_features(
        self, features: torch.Tensor, method: Method = "swc", names: Sequence[str] | None = None,
        authors: Sequence[str] | None = None, exclude_same_author: bool = False,
    ) -> list[Prediction]:
        """Predictions for backbone features ``(B, D)``.

        Args:
            method: ``swc`` (search within the top cell), ``classification`` (top cell's centroid) or
                ``retrieval`` (clustering over the top-k of the whole gallery).
            names: the photos' ids; a gallery photo with the same id is never retrieved (leakage guard).
            authors: the photos' authors, used with ``exclude_same_author``.
        """
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method != "classification" and self.gallery is None:
            raise InputError(f"method {method!r} needs a gallery index; build one with `geoswc index`")
        probs, emb = self.heads(features)
        out = []
        for i in range(len(probs)):
            name = names[i] if names is not None else ""
            exclude = None
            if self.gallery is not None:
                ex_auth = [authors[i]] if (exclude_same_author and authors is not None and authors[i]) else []
                exclude = self.gallery.excluded_rows([name] if name else [], ex_auth)
            out.append(self._search_one(probs[i], emb[i], method, name, exclude))
        return out

    def _search_one(self, probs: np.ndarray, emb: np.ndarray, method: str, name: str,
                    exclude: np.ndarray | None) -> Prediction:
        cells, cfg = self.model.cells, self.search
        chosen = select_cell(probs, self._hood(cfg.select_km) if cfg.select_km > 0 else None)
        top = np.argsort(-probs)[: cfg.top_cells]
        pred = Prediction(
            image=name, lat=float(cells.lat[chosen]), lon=float(cells.lon[chosen]),
            confidence=float(np.clip(self._hood(cfg.r_km)[chosen].dot(probs)[0], 0.0, 1.0)), method=method,
            cell=cells.tokens[chosen], cell_probability=float(probs[chosen]),
            top_cells=[CellProbability(cells.tokens[c], float(cells.lat[c]), float(cells.lon[c]), float(probs[c]),
                                       cells.polygon(int(c))) for c in top],
            cell_polygon=cells.polygon(int(chosen)),
        )
        if method == "classification" or self.gallery is None:
            return pred
        g = self.gallery
        if method == "swc" and cfg.search_km > 0:
            idx, sim = g.search_cells(emb, cfg.k, self._hood(cfg.search_km)[chosen].indices, exclude=exclude)
        else:
            idx, sim = g.search(emb, cfg.k, rows=g.cell_rows(chosen) if method == "swc" else None, exclude=exclude)
        if idx.size == 0:
            pred.fallback = True
            return pred
        est = estimate_from_neighbors(g.lat[idx], g.lon[idx], sim, cfg.eps_km, cfg.min_samples)
        pred.lat, pred.lon, pred.cluster = est.lat, est.lon, est.cluster
        pred.neighbors = [Neighbor(g.names[j], float(g.lat[j]), float(g.lon[j]), float(s), int(lab))
                          for j, s, lab in zip(idx, sim, est.labels, strict=True)]
        return pred

    def locate_batch(
        self, sources: Sequence[ImageSource], *, names: Sequence[str] | None = None,
        authors: Sequence[str] | None = None, method: Method = "swc", exclude_same_author: bool = False,
        with_place: bool = True, with_exif: bool = True, batch_size: int = 16, num_workers: int = 0,
        progress: bool = False,
    ) -> Iterator[Prediction | LocateFailure]:
        """Locate many photos, in input order. A photo that cannot be decoded yields a
        :class:`LocateFailure` and the rest carry on.

        Args:
            sources: paths, encoded bytes, file objects or PIL images.
            names: ids of the photos (default: their paths); used in the output and the leakage guard.
            authors: with ``exclude_same_author``, gallery photos by the same author are never retrieved.
            with_place: add the nearest GeoNames place.
            with_exif: read the photo's own GPS EXIF and report the distance to it.
        """
        if names is not None and len(names) != len(sources):
            raise InputError("names must match sources one to one")
        labels = [_label(s, names[i] if names is not None else None) for i, s in enumerate(sources)]
        # File objects are read once, so decoding and the EXIF lookup both see the whole file.
        sources = [s.read() if hasattr(s, "read") and not isinstance(s, Image.Image) else s for s in sources]
        for rows, feats, bad in self.iter_features(sources, batch_size, num_workers, progress):
            results: dict[int, Prediction | LocateFailure] = {
                i: LocateFailure(labels[i], str(e), e.kind) for i, e in bad}
            if feats is not None:
                preds = self.predict_features(
                    feats, method, names=[labels[i] for i in rows],
                    authors=[authors[i] for i in rows] if authors is not None else None,
                    exclude_same_author=exclude_same_author)
                self._decorate([(sources[i], p) for i, p in zip(rows, preds, strict=True)], with_place, with_exif)
                results.update(zip(rows, preds, strict=True))
            for i in sorted(results):
                yield results[i]

    def _require_backbone(self) -> None:
        if self.model.backbone is None:
            raise GeoswcError("this Geolocator was loaded without a backbone; it can only use predict_features")

    @torch.inference_mode()
    def _backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(B, 3, S, S)`` -> backbone features ``(B, D)`` float32 on the CPU, with the
        runtime :meth:`use_runtime` installed (eager PyTorch by default)."""
        backbone = self._fast_backbone or self.model.backbone
        return backbone(x.to(self.device)).float().cpu()

    def iter_features(
        self, sources: Sequence[ImageSource], batch_size: int = 16, num_workers: int = 0, progress: bool = False,
    ) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, ImageError]]]]:
        """Decode, preprocess and run the backbone over photos, in order, batch by batch.

        Yields:
            ``(rows, features (b, D) or None, [(row, error)])`` for each batch.
        """
        self._require_backbone()
        ds = ImageDataset(sources, self.model.config.backbone.preprocess, limits=self.limits)
        dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        with tqdm(total=len(sources), desc="locate", unit="img", disable=not progress) as bar:
            for idx, x, bad in dl:
                yield idx.tolist(), None if x is None else self._backbone_features(x), bad
                bar.update(len(idx) + len(bad))

    def locate_shards(
        self, shards: str | Path | Sequence[str | Path], *, method: Method = "swc", with_place: bool = True,
        with_exif: bool = True, batch_size: int = 16, num_workers: int = 0, progress: bool = False,
    ) -> Iterator[Prediction | LocateFailure]:
        """Locate the photos of WebDataset shards (see :mod:`geoswc.shards`), streamed batch by batch.

        Photos are named by their JSON's ``image`` (which also guards against retrieving themselves from the
        gallery). With ``num_workers > 1`` the shards are split across the workers and results come in the
        order the workers deliver them. Unreadable samples yield a :class:`LocateFailure` and the rest carry on.
        """
        from .shards import ShardDataset, collate_samples, resolve_shards, shard_sizes

        self._require_backbone()
        urls = resolve_shards(shards)
        sizes = shard_sizes(urls)
        ds = ShardDataset(urls, self.model.config.backbone.preprocess, limits=self.limits, read_exif=with_exif,
                          split_ranks=False)
        dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_samples)
        total = None if None in sizes else sum(n or 0 for n in sizes)
        with tqdm(total=total, desc="locate", unit="img", disable=not progress) as bar:
            for _, x, metas, bad in dl:
                for _, meta, err in bad:
                    yield LocateFailure(meta.image, str(err), getattr(err, "kind", "corrupt"))
                if x is not None:
                    preds = self.predict_features(self._backbone_features(x), method, names=[m.image for m in metas])
                    self._decorate([(m.image, p) for m, p in zip(metas, preds, strict=True)], with_place, False)
                    for m, p in zip(metas, preds, strict=True):
                        if m.gps is not None:
                            p.exif = ExifPosition(m.gps[0], m.gps[1],
                                                  float(haversine_km(p.lat, p.lon, m.gps[0], m.gps[1])))
                    yield from preds
                bar.update(len(metas) + len(bad))

    def _decorate(self, items: list[tuple[ImageSource, Prediction]], with_place: bool, with_exif: bool) -> None:
        if with_place and items:
            for (_, p), place in zip(items, nearest_places([(p.lat, p.lon) for _, p in items]), strict=True):
                p.place = place
        if with_exif:
            for src, p in items:
                if isinstance(src, Image.Image):
                    continue
                try:
                    gps = read_gps(src, self.limits)
                except ImageError:
                    gps = None
                if gps is not None:
                    p.exif = ExifPosition(gps[0], gps[1], float(haversine_km(p.lat, p.lon, gps[0], gps[1])))

    def locate(self, source: ImageSource, *, name: str | None = None, method: Method = "swc",
               with_place: bool = True, with_exif: bool = True) -> Prediction:
        """Locate one photo.

        Raises:
            ImageError: the photo cannot be decoded or is too large.
        """
        result = next(self.locate_batch([source], names=[name] if name is not None else None, method=method,
                                        with_place=with_place, with_exif=with_exif, batch_size=1))
        if isinstance(result, LocateFailure):
            raise ImageError(result.error, kind=result.kind)
        return result


# -- batch output files -------------------------------------------------------------------------------

OUTPUT_FORMATS: dict[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".geojson": "geojson"}
"""File extension -> output format of :class:`PredictionWriter`."""

CSV_COLUMNS = ("image", "lat", "lon", "confidence", "method", "cell", "cell_probability", "fallback", "place",
               "country", "exif_lat", "exif_lon", "exif_distance_km", "error", "kind")


def output_format(path: str | Path | None, fmt: str | None = None) -> str:
    """``fmt`` when given, else the format of ``path``'s extension (``.jsonl``, ``.csv``, ``.geojson``)."""
    if fmt is not None:
        if fmt not in set(OUTPUT_FORMATS.values()):
            raise InputError(f"unknown output format {fmt!r}; choose jsonl, csv or geojson")
        return fmt
    suffix = Path(path).suffix.lower() if path is not None else ""
    if suffix not in OUTPUT_FORMATS:
        raise InputError(f"cannot tell the output format from {str(path)!r}: name it .jsonl, .csv or .geojson, "
                         "or give --format")
    return OUTPUT_FORMATS[suffix]


def prediction_row(result: Prediction | LocateFailure) -> dict[str, Any]:
    """A flat record of one result (the CSV row, the GeoJSON properties); failures fill ``error``/``kind``."""
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, "")
    row["image"] = result.image
    if isinstance(result, LocateFailure):
        row.update(error=result.error, kind=result.kind)
        return row
    row.update(lat=round(result.lat, 6), lon=round(result.lon, 6), confidence=round(result.confidence, 4),
               method=result.method, cell=result.cell, cell_probability=round(result.cell_probability, 4),
               fallback=result.fallback)
    if result.place is not None:
        row.update(place=result.place.label(), country=result.place.country)
    if result.exif is not None:
        row.update(exif_lat=result.exif.lat, exif_lon=result.exif.lon,
                   exif_distance_km=round(result.exif.distance_km, 3))
    return row


class PredictionWriter:
    """Streams results to a text file: JSON Lines (:meth:`Prediction.to_dict`, failures as
    ``{"image", "error", "kind"}``), CSV (:data:`CSV_COLUMNS`) or a GeoJSON FeatureCollection (points at
    the estimates, :func:`prediction_row` as properties; failures have a null geometry).

    Use as a context manager, or call :meth:`close` to finish the file (GeoJSON needs its closing brackets).
    """

    def __init__(self, stream: TextIO, fmt: str) -> None:
        self.stream, self.fmt = stream, output_format(None, fmt)
        self.located = self.failed = 0
        if fmt == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
            self._csv.writeheader()
        elif fmt == "geojson":
            stream.write('{"type": "FeatureCollection", "features": [\n')

    def write(self, result: Prediction | LocateFailure) -> None:
        ok = isinstance(result, Prediction)
        if self.fmt == "jsonl":
            data = result.to_dict() if ok else {"image": result.image, "error": result.error, "kind": result.kind}
            self.stream.write(json.dumps(data, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow(prediction_row(result))
        else:
            row = {k: v for k, v in prediction_row(result).items() if v != "" and k not in ("lat", "lon")}
            geometry = {"type": "Point", "coordinates": [round(result.lon, 6), round(result.lat, 6)]} if ok else None
            sep = ",\n" if self.located + self.failed else ""
            feature = {"type": "Feature", "geometry": geometry, "properties": row}
            self.stream.write(sep + json.dumps(feature, ensure_ascii=False))
        if ok:
            self.located += 1
        else:
            self.failed += 1

    def close(self) -> None:
        if self.fmt == "geojson":
            self.stream.write("\n]}\n")
        self.stream.flush()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
