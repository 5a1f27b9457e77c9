"""The Python API: ``Geolocator.load().locate(path)``. The CLI, the evaluation and the web service all
call :meth:`Geolocator.locate_batch` (or its shard twin), the one prediction path."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
import typing
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from geoswc.core.config import METHODS, Method, Runtime, SearchChanges, SearchConfig, to_dict
from geoswc.core.errors import ArtifactError, GeoswcError, ImageError, InputError
from geoswc.core.progress import progress_bar
from geoswc.data.images import DEFAULT_LIMITS, ImageLimits, ImageSource, read_gps
from geoswc.data.records import Batch, ImageDataset, loader
from geoswc.data.shards import ShardDataset, listed_total, resolve_shards
from geoswc.gallery.files import load_gallery
from geoswc.gallery.search import Gallery
from geoswc.geo.places import nearest_places
from geoswc.models import compat
from geoswc.models.geomodel import GeoModel
from geoswc.models.onnx_runtime import OnnxBackbone
from geoswc.prediction.calibration import (
    Calibrator,
    LocalizableRule,
    density_signals,
    load_calibrator,
    retrieval_signals,
)
from geoswc.prediction.results import CellProbability, LocateFailure, Neighbor, Prediction, Result
from geoswc.prediction.swc import cells_within, estimate_from_neighbors, prediction_density, select_cell

log = logging.getLogger(__name__)

RUNTIMES: tuple[str, ...] = typing.get_args(Runtime)

__all__ = ["Geolocator", "LocateFailure", "Prediction", "default_model_dir"]


def default_model_dir() -> Path:
    """The embedded default model (or ``$GEOSWC_MODEL`` when set)."""
    env = os.environ.get("GEOSWC_MODEL")
    if env:
        return Path(env)
    return Path(str(resources.files("geoswc") / "assets" / "default"))


def _read_file_object(source: Any, label: str, limits: ImageLimits) -> ImageSource | ImageError:
    """A file object's bytes, at most ``limits.max_bytes`` (other sources as they are); one that cannot be
    read becomes its error."""
    if isinstance(source, Image.Image) or not hasattr(source, "read"):
        return source
    if isinstance(source, io.TextIOBase):
        return ImageError(f"{label} is a text-mode file: open the photo with mode 'rb'", kind="unsupported")
    try:
        data = source.read(limits.max_bytes + 1)
    except (OSError, ValueError) as e:  # a closed file, a socket gone away
        return ImageError(f"{label} cannot be read ({e})", kind="unreadable")
    if not isinstance(data, (bytes, bytearray)):
        return ImageError(f"{label} is a text-mode file: open the photo with mode 'rb'", kind="unsupported")
    if len(data) > limits.max_bytes:
        return ImageError(f"{label} is larger than the limit of {limits.max_bytes / 2**20:.0f} MiB", kind="too_large")
    return bytes(data)


def _label(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    return str(source) if isinstance(source, (str, os.PathLike)) else "<image>"


class Geolocator:
    """A loaded model, its gallery and search settings: photos in, :class:`Prediction` out. Its settings are
    given when it is made and read-only afterwards; :meth:`with_settings` makes one with others.

    Args:
        model: the trained model (with a backbone to locate images; heads-only works on features).
        gallery: the background gallery (checked against the model); None limits the methods to
            ``classification``.
        search: search-within-cell settings (default: the model's).
        device: torch device for the networks.
        limits: image size limits.
        calibrator: turns each prediction's signals into ``within_km`` (checked against the model); None: no
            ``within_km`` or ``localizable``.
        rule: which predictions are localizable (default: the rule saved with the calibrator).
    """

    def __init__(
        self,
        model: GeoModel,
        gallery: Gallery | None = None,
        search: SearchConfig | None = None,
        device: str | torch.device = "cpu",
        limits: ImageLimits = DEFAULT_LIMITS,
        calibrator: Calibrator | None = None,
        rule: LocalizableRule | None = None,
    ) -> None:
        if gallery is not None:
            compat.check(model, gallery=gallery)
        if calibrator is not None:
            compat.check(model, calibrator=calibrator)
        self._model = model.to(device).eval()
        self._gallery = gallery
        self._search = search or model.config.search
        self._calibrator = calibrator
        self._rule = rule or (calibrator.rule if calibrator is not None else LocalizableRule())
        self._device = torch.device(device)
        self._limits = limits
        self._fast_backbone: Any = None  # set by use_runtime("onnx")

    @property
    def model(self) -> GeoModel:
        """The trained model."""
        return self._model

    @property
    def gallery(self) -> Gallery | None:
        """The background gallery (None: classification only)."""
        return self._gallery

    @property
    def search(self) -> SearchConfig:
        """The search-within-cell settings."""
        return self._search

    @property
    def calibrator(self) -> Calibrator | None:
        """The calibrator (None: no ``within_km``)."""
        return self._calibrator

    @property
    def rule(self) -> LocalizableRule:
        """Which predictions are localizable."""
        return self._rule

    @property
    def device(self) -> torch.device:
        """The torch device of the networks."""
        return self._device

    @property
    def limits(self) -> ImageLimits:
        """The image size limits."""
        return self._limits

    def with_settings(
        self,
        *,
        search: SearchConfig | None = None,
        rule: LocalizableRule | None = None,
        limits: ImageLimits | None = None,
    ) -> Geolocator:
        """A locator sharing this one's model, gallery, calibrator and runtime, with other settings (None: this
        one's); this one is left as it is."""
        other = copy.copy(self)
        other._search = search or self._search
        other._rule = rule or self._rule
        other._limits = limits or self._limits
        return other

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        index_dir: str | Path | None = None,
        *,
        search: SearchConfig | SearchChanges | None = None,
        device: str | torch.device = "cpu",
        with_backbone: bool = True,
        limits: ImageLimits = DEFAULT_LIMITS,
        runtime: Runtime = "torch",
        rule: LocalizableRule | None = None,
    ) -> Geolocator:
        """Load a model folder (default: the embedded model) and its gallery index.

        Args:
            model_dir: a folder written by ``geoswc train``; None for the embedded default.
            index_dir: a folder written by ``geoswc index``; None uses ``<model_dir>/index`` if present.
            search: the search settings, whole, or the fields to change from the model's (``{"k": 5}``).
            with_backbone: False for a heads-only locator that works on cached features.
            runtime: ``torch`` (eager) or ``onnx`` (see :meth:`use_runtime`).
            rule: which predictions are localizable (default: the rule saved with the calibrator).
        """
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise ArtifactError(f"no geoswc model in {model_dir} (config.json missing)")
        if isinstance(search, dict):  # settings checked before the weights are loaded
            search = dataclasses.replace(GeoModel.read_config(model_dir).search, **search)
        model = GeoModel.load(model_dir, with_backbone=with_backbone, device=device)
        if index_dir is None and (model_dir / "index" / "index.json").is_file():
            index_dir = model_dir / "index"
        gallery = load_gallery(index_dir) if index_dir is not None else None
        if gallery is None:
            log.warning("no gallery index: only the 'classification' method is available")
        geo = cls(model, gallery, search, device, limits, load_calibrator(model_dir), rule)
        if geo.calibrator is not None and geo.calibrator.search and geo.calibrator.search != to_dict(geo.search):
            log.warning(
                "the calibrator was fitted with other search settings (%s): within_km may be off", geo.calibrator.search
            )
        if with_backbone:
            geo.use_runtime(runtime)
        return geo

    def use_runtime(self, runtime: Runtime, cache_dir: str | Path | None = None) -> None:
        """Run the backbone with ``torch`` (eager) or ``onnx`` (onnxruntime, CPU only, several times faster; needs
        ``pip install 'geoswc[fast]'``; the export is cached under ``cache_dir``, default ``~/.cache/geoswc/onnx``,
        keyed by the backbone fingerprint).

        Raises:
            InputError: an unknown runtime, or ``onnx`` on a non-CPU device.
            GeoswcError: ``onnx`` without the ``fast`` extra installed, or without a backbone.
        """
        if runtime not in RUNTIMES:
            raise InputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if runtime == "torch":
            self._fast_backbone = None
            return
        if self.device.type != "cpu":
            raise InputError("the onnx runtime runs on the CPU; use runtime='torch' on other devices")
        self._require_backbone()

        self._fast_backbone = OnnxBackbone.from_backbone(
            self.model.backbone,
            self.model.backbone_fingerprint,
            self.model.config.backbone.preprocess.image_size,
            cache_dir,
        )

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def runtime(self) -> Runtime:
        """The backbone's runtime (:meth:`use_runtime`)."""
        return "torch" if self._fast_backbone is None else "onnx"

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this locator can use (without a gallery, only ``classification``)."""
        return METHODS if self.gallery is not None else ("classification",)

    def thumbnail(self, row: int) -> bytes | None:
        """The JPEG thumbnail of gallery row ``row`` (a neighbour's ``row``), checked against its digest; None when
        the index holds none for it (or there is no gallery).

        Raises:
            InputError: ``row`` is not a row of the gallery.
            ArtifactError: the stored thumbnail was damaged or changed (it is never returned then).
        """
        return self.gallery.thumbnail(row) if self.gallery is not None else None

    # -- the prediction path -------------------------------------------------------------------------

    @torch.inference_mode()
    def heads(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``features (B, D)`` -> ``(cell probabilities (B, C), unit embeddings (B, D))`` as NumPy."""
        logits, emb = self.model.heads(features.to(self.device).float())
        return torch.softmax(logits, -1).double().cpu().numpy(), emb.float().cpu().numpy()

    def predict_features(
        self,
        features: torch.Tensor,
        method: Method = "swc",
        names: Sequence[str] | None = None,
        exclude_authors: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """Predictions for backbone features ``(B, D)``.

        Args:
            method: ``swc`` (search within the chosen cell), ``classification`` (the chosen cell's centroid) or
                ``retrieval`` (clustering over the top-k of the whole gallery).
            names: the photos' ids; a gallery photo with the same id is never retrieved (leakage guard).
            exclude_authors: for each photo, an author whose gallery photos are never retrieved (its own, to
                evaluate on photographers the gallery does not know; "" excludes none).
        """
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method not in self.methods:
            raise InputError(f"method {method!r} needs a gallery index; build one with `geoswc index`")
        probs, emb = self.heads(features)
        out = []
        for i in range(len(probs)):
            name = names[i] if names is not None else ""
            exclude = None
            if self.gallery is not None:
                author = exclude_authors[i] if exclude_authors is not None else ""
                exclude = self.gallery.excluded_rows([name] if name else [], [author] if author else [])
            out.append(self._search_one(probs[i], emb[i], method, name, exclude))
        self._calibrate(out, method)
        return out

    def _calibrate(self, preds: list[Prediction], method: str) -> None:
        """Fill ``within_km`` and ``localizable`` (left None without a calibrator for ``method``)."""
        within = self.calibrator.within_km(method, [p.signals for p in preds]) if self.calibrator else None
        if within is None:
            return
        for p, w in zip(preds, within, strict=True):
            p.within_km, p.localizable = w, w[self.rule.key] >= self.rule.p

    def _search_one(
        self, probs: np.ndarray, emb: np.ndarray, method: str, name: str, exclude: np.ndarray | None
    ) -> Prediction:
        cells, cfg = self.model.cells, self.search
        chosen = select_cell(probs, cells.xyz, cfg.select_km)
        top = np.argsort(-probs)[: cfg.top_cells]
        pred = Prediction(
            image=name,
            lat=float(cells.lat[chosen]),
            lon=float(cells.lon[chosen]),
            confidence=prediction_density(probs, cells.xyz, chosen, cfg.r_km),
            method=method,
            cell=cells.tokens[chosen],
            cell_probability=float(probs[chosen]),
            top_cells=[
                CellProbability(
                    cells.tokens[c], float(cells.lat[c]), float(cells.lon[c]), float(probs[c]), cells.polygon(int(c))
                )
                for c in top
            ],
            cell_polygon=cells.polygon(int(chosen)),
            signals=density_signals(probs, cells.xyz, chosen),
        )
        if method == "classification" or self.gallery is None:
            pred.signals |= retrieval_signals([], [], -1, cfg.k)
            return pred
        g = self.gallery
        within = None
        if method == "swc":
            within = cells_within(cells.xyz, chosen, cfg.search_km) if cfg.search_km > 0 else [chosen]
        idx, sim = g.search(emb, cfg.k, cells=within, exclude=exclude)
        if idx.size == 0:
            pred.fallback = True
            pred.signals |= retrieval_signals([], [], -1, cfg.k, fallback=True)
            return pred
        est = estimate_from_neighbors(g.lat[idx], g.lon[idx], sim, cfg.eps_km, cfg.min_samples)
        pred.lat, pred.lon, pred.cluster = est.lat, est.lon, est.cluster
        pred.signals |= retrieval_signals(sim, est.labels, est.cluster, cfg.k)
        pred.neighbors = [
            Neighbor(g.names[j], float(g.lat[j]), float(g.lon[j]), float(s), int(lab), int(j), g.has_thumbnail(int(j)))
            for j, s, lab in zip(idx, sim, est.labels, strict=True)
        ]
        return pred

    def _require_backbone(self) -> None:
        if self.model.backbone is None:
            raise GeoswcError("this Geolocator was loaded without a backbone; it can only use predict_features")

    @torch.inference_mode()
    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(B, 3, S, S)`` -> backbone features ``(B, D)`` float32 on the CPU, with the
        runtime :meth:`use_runtime` installed (eager PyTorch by default)."""
        self._require_backbone()
        backbone = self._fast_backbone or self.model.backbone
        return backbone(images.to(self.device)).float().cpu()

    def iter_features(
        self,
        sources: Sequence[ImageSource],
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = False,
        names: Sequence[str] | None = None,
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """Decode, preprocess and run the backbone over photos, in order, batch by batch.

        Yields:
            ``(batch, features (b, D) or None)``: the batch's keys are indices into ``sources``; its bad items
            carry their :class:`~geoswc.core.errors.ImageError`, named by ``names`` (default: the paths).
        """
        self._require_backbone()
        ds = ImageDataset(sources, self.model.config.backbone.preprocess, limits=self.limits, names=names)
        with progress_bar(total=len(sources), desc="locate", unit="img", show=progress) as bar:
            for b in loader(ds, batch_size, num_workers):
                yield b, None if b.images is None else self.backbone_features(b.images)
                bar.update(len(b.keys) + len(b.bad))

    def locate_batch(
        self,
        sources: Iterable[ImageSource] | ImageSource,
        *,
        names: Sequence[str] | None = None,
        method: Method = "swc",
        with_place: bool = True,
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = False,
    ) -> Iterator[Result]:
        """Locate many photos, in input order. A photo that cannot be decoded yields a
        :class:`LocateFailure` and the rest carry on. A photo's own GPS EXIF, when it has one, is reported
        with the estimate's distance to it.

        Args:
            sources: paths, encoded bytes, binary file objects or PIL images (any iterable of them, or one).
            names: ids of the photos (default: their paths); used in the output, in error messages and by the
                leakage guard.
            with_place: add the nearest GeoNames place.
        """
        if isinstance(sources, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(sources, "read"):
            sources = [sources]  # one photo, not a sequence of characters or bytes
        sources = list(sources)  # a generator is read once, here
        if names is not None and len(names) != len(sources):
            raise InputError("names must match sources one to one")
        labels = [_label(s, names[i] if names is not None else None) for i, s in enumerate(sources)]
        # File objects are read once, so decoding and the EXIF lookup both see the whole file.
        sources = [_read_file_object(s, label, self.limits) for s, label in zip(sources, labels, strict=True)]
        for b, feats in self.iter_features(sources, batch_size, num_workers, progress, labels):
            rows = b.keys.tolist()
            results: dict[int, Result] = {
                k: LocateFailure(labels[k], str(e), getattr(e, "kind", "corrupt")) for k, _, e in b.bad
            }
            if feats is not None:
                preds = self.predict_features(feats, method, names=[labels[i] for i in rows])
                gps = [self._gps(sources[i], labels[i]) for i in rows]
                results.update(zip(rows, self._finish(preds, gps, with_place), strict=True))
            yield from (results[i] for i in sorted(results))

    def _gps(self, source: ImageSource, name: str) -> tuple[float, float] | None:
        if isinstance(source, (Image.Image, ImageError)):
            return None
        try:
            return read_gps(source, self.limits, name)
        except Exception:  # noqa: BLE001 - the photo's own position is a courtesy: never worth failing it
            return None

    @staticmethod
    def _finish(
        preds: list[Prediction], gps: Sequence[tuple[float, float] | None], with_place: bool
    ) -> list[Prediction]:
        """Add each photo's own GPS position and, with ``with_place``, the nearest place to the estimate."""
        for p, g in zip(preds, gps, strict=True):
            p.with_gps(g)
        if with_place and preds:
            for p, place in zip(preds, nearest_places([(p.lat, p.lon) for p in preds]), strict=True):
                p.place = place
        return preds

    def locate_shards(
        self,
        shards: str | Path | Sequence[str | Path],
        *,
        method: Method = "swc",
        with_place: bool = True,
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = False,
    ) -> Iterator[Result]:
        """Locate the photos of WebDataset shards (see :mod:`geoswc.data.shards`), streamed batch by batch.

        Photos are named by their JSON's ``image`` (which also guards against retrieving themselves from the
        gallery). With ``num_workers > 1`` the shards are split across the workers and results come in the
        order the workers deliver them. Unreadable samples yield a :class:`LocateFailure` and the rest carry on.
        """
        self._require_backbone()
        urls = resolve_shards(shards)
        ds = ShardDataset(
            urls, self.model.config.backbone.preprocess, limits=self.limits, read_exif=True, split_ranks=False
        )
        with progress_bar(total=listed_total(urls), desc="locate", unit="img", show=progress) as bar:
            for b in loader(ds, batch_size, num_workers):
                yield from (
                    LocateFailure(meta.image, str(err), getattr(err, "kind", "corrupt")) for _, meta, err in b.bad
                )
                if b.images is not None:
                    preds = self.predict_features(
                        self.backbone_features(b.images), method, names=[m.image for m in b.metas]
                    )
                    yield from self._finish(preds, [m.gps for m in b.metas], with_place)
                bar.update(len(b.keys) + len(b.bad))

    def locate(
        self, source: ImageSource, *, name: str | None = None, method: Method = "swc", with_place: bool = True
    ) -> Prediction:
        """Locate one photo.

        Raises:
            ImageError: the photo cannot be decoded or is too large.
        """
        result = next(
            self.locate_batch(
                [source], names=[name] if name is not None else None, method=method, with_place=with_place, batch_size=1
            )
        )
        if isinstance(result, LocateFailure):
            raise ImageError(result.error, kind=result.kind)
        return result
