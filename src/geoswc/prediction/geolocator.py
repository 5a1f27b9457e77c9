"""The Python API: ``Geolocator.load().locate(path)``. The CLI, the evaluation and the web service all
call :meth:`Geolocator.locate_batch` (or its shard twin), the one prediction path."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from geoswc.core import artifact_folders
from geoswc.core.config import METHODS, Method, Runtime, SearchChanges, SearchConfig, to_dict
from geoswc.core.errors import ArtifactError, GeoswcError, ImageError, InputError, SettingError
from geoswc.core.progress import progress_bar
from geoswc.core.stage_clock import OFF, StageClock
from geoswc.core.threads import ahead, in_this_thread
from geoswc.data.images import DEFAULT_LIMITS, ImageLimits, ImageSource, source_name
from geoswc.data.records import Batch, loader
from geoswc.data.shards import ShardDataset, input_position, listed_total, photo_dataset, resolve_shards
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
from geoswc.prediction.swc import (
    PriorRule,
    cell_prior,
    cells_within,
    estimate_from_neighbors,
    prediction_density,
    prior_divergence,
    select_cell,
)

log = logging.getLogger(__name__)

RUNTIMES: tuple[str, ...] = typing.get_args(Runtime)

__all__ = ["Geolocator", "LocateFailure", "Prediction", "default_model_dir", "resolve_model_dir"]


def default_model_dir() -> Path:
    """The embedded default model (or ``$GEOSWC_MODEL`` when set)."""
    env = os.environ.get("GEOSWC_MODEL")
    if env:
        return Path(env)
    return Path(str(resources.files("geoswc") / "assets" / "default"))


def resolve_model_dir(model: str | Path | None) -> Path:
    """A model folder: ``model`` as given, or the embedded model for None or the name ``default`` (unless a
    folder of that name is there)."""
    if model is None or (str(model) == "default" and not Path(model).exists()):
        return default_model_dir()
    return Path(model)


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


def _changed_search(base: SearchConfig, changes: Any) -> SearchConfig:
    """``base`` with ``changes`` (a mapping of :class:`SearchConfig` fields) applied, each checked.

    Raises:
        TypeError: ``changes`` is not a mapping.
        SettingError: an unknown field, or a value of the wrong type or out of range (naming the field).
    """
    if not isinstance(changes, Mapping):
        raise TypeError(f"search must be a SearchConfig or a dict of its fields, e.g. {{'k': 5}}; got {changes!r}")
    known = [f.name for f in dataclasses.fields(SearchConfig)]
    unknown = [str(k) for k in changes if k not in known]
    if unknown:
        raise SettingError(
            f"search has no setting {unknown[0]!r}; the settings are {', '.join(known)}", SearchConfig, unknown[0]
        )
    return dataclasses.replace(base, **changes)


def _warn_of_other_search(calibrator: Calibrator | None, search: SearchConfig) -> None:
    """Warn, naming each setting and its two values, when ``calibrator`` was fitted with other search settings."""
    fitted = calibrator.search if calibrator is not None else None
    if not fitted:
        return
    now = to_dict(search)
    changed = [f"{k} {fitted[k]} -> {now.get(k)}" for k in sorted(fitted) if fitted[k] != now.get(k)]
    if changed:
        log.warning(
            "the calibrator was fitted with other search settings (%s): within_km may be off", ", ".join(changed)
        )


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
        self._prior = cell_prior(np.diff(gallery.offsets)) if gallery is not None else None
        self._prior_rule = PriorRule()
        self._clock: StageClock | Any = OFF  # a StageClock while profiled()

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
            model_dir: a folder written by ``geoswc train``; None (or ``"default"``) for the embedded model.
            index_dir: a folder written by ``geoswc index``; None uses ``<model_dir>/index`` if present.
            search: the search settings, whole, or the fields to change from the model's (``{"k": 5}``).
            with_backbone: False for a heads-only locator that works on cached features.
            runtime: ``torch`` (eager) or ``onnx`` (see :meth:`use_runtime`).
            rule: which predictions are localizable (default: the rule saved with the calibrator).
        """
        model_dir = resolve_model_dir(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ArtifactError(f"no geoswc model in {model_dir} (config.json missing)")
        if search is not None and not isinstance(search, SearchConfig):  # checked before the weights are loaded
            search = _changed_search(GeoModel.read_config(model_dir).search, search)
        model = GeoModel.load(model_dir, with_backbone=with_backbone, device=device)
        artifact_folders.recover_folder(model_dir / "index")  # an index a killed rebuild left renamed aside comes back
        if index_dir is None and (model_dir / "index" / "index.json").is_file():
            index_dir = model_dir / "index"
        gallery = load_gallery(index_dir) if index_dir is not None else None
        if gallery is None:
            log.warning("no gallery index: only the 'classification' method is available")
        geo = cls(model, gallery, search, device, limits, load_calibrator(model_dir), rule)
        _warn_of_other_search(geo.calibrator, geo.search)
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
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
            raise TypeError(f"row must be a gallery row number (a neighbour's row), got {row!r}")
        return self.gallery.thumbnail(int(row)) if self.gallery is not None else None

    @contextlib.contextmanager
    def profiled(self) -> Iterator[StageClock]:
        """Time the stages of every photo located in the block (``decode``, ``backbone``, ``heads``, ``search``,
        ``calibrate``, ``place``, and ``wait``: the caller waiting for the next batch); the clock sums each
        stage's seconds across the threads it runs in. For one caller at a time (a benchmark, not a service)."""
        clock = StageClock()
        self._clock = clock
        try:
            yield clock
        finally:
            self._clock = OFF

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
        with self._clock.stage("heads"):
            probs, emb = self.heads(features)
        out = []
        for i in range(len(probs)):
            name = names[i] if names is not None else ""
            exclude = None
            if self.gallery is not None:
                author = exclude_authors[i] if exclude_authors is not None else ""
                exclude = self.gallery.excluded_rows([name] if name else [], [author] if author else [])
            with self._clock.stage("search"):
                out.append(self._search_one(probs[i], emb[i], method, name, exclude))
        with self._clock.stage("calibrate"):
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
        if self._prior is not None:
            pred.prior_kl = prior_divergence(probs, self._prior)
        if method == "classification" or self.gallery is None:
            pred.signals |= retrieval_signals([], [], -1, cfg.k)
            return self._judge(pred)
        g = self.gallery
        within = None
        if method == "swc":
            within = cells_within(cells.xyz, chosen, cfg.search_km) if cfg.search_km > 0 else [chosen]
        idx, sim = g.search(emb, cfg.k, cells=within, exclude=exclude)
        if idx.size == 0:
            pred.fallback = True
            pred.signals |= retrieval_signals([], [], -1, cfg.k, fallback=True)
            return self._judge(pred)
        est = estimate_from_neighbors(g.lat[idx], g.lon[idx], sim, cfg.eps_km, cfg.min_samples)
        pred.lat, pred.lon, pred.cluster = est.lat, est.lon, est.cluster
        pred.signals |= retrieval_signals(sim, est.labels, est.cluster, cfg.k)
        pred.neighbors = [
            Neighbor(g.names[j], float(g.lat[j]), float(g.lon[j]), float(s), int(lab), int(j), g.has_thumbnail(int(j)))
            for j, s, lab in zip(idx, sim, est.labels, strict=True)
        ]
        return self._judge(pred)

    def _judge(self, pred: Prediction) -> Prediction:
        """Say whether ``pred`` is no better than the model's prior (left None without a gallery)."""
        if pred.prior_kl is not None:
            pred.prior_like = self._prior_rule.prior_like(pred.prior_kl, pred.signals)
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

    def _stream(
        self, ds: ShardDataset, total: int | None, batch_size: int, num_workers: int, progress: bool
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """The one reader: the dataset's photos decoded and preprocessed (:class:`~geoswc.data.shards.ShardDataset`)
        and run through the backbone, batch by batch, in the order the decoding workers deliver them.

        Three stages overlap: decoding (a background thread, or ``num_workers`` processes behind it), the backbone
        (a second thread) and the caller's work on the features (search, output), each up to two batches ahead.
        """
        in_this_thread()  # the caller may be a thread of its own (a web server's): it searches with FAISS
        clock = self._clock
        batches = ahead(clock.timed("decode", loader(ds, batch_size, num_workers)), name="geoswc-decode")
        features = ahead(self._backbone_stream(batches), name="geoswc-backbone")
        with progress_bar(total=total, desc="locate", unit="img", show=progress) as bar:
            for b, feats in clock.timed("wait", features):
                yield b, feats
                bar.update(len(b.keys) + len(b.bad))

    def _backbone_stream(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """Each batch with its backbone features ``(b, D)`` (None: no photo of the batch could be decoded)."""
        with contextlib.closing(batches):  # type: ignore[type-var]
            for b in batches:
                with self._clock.stage("backbone"):
                    feats = None if b.images is None else self.backbone_features(b.images)
                yield b, feats

    def _photos(
        self, sources: Sequence[ImageSource | ImageError], labels: Sequence[str], batch_size: int, read_exif: bool
    ) -> ShardDataset:
        """The dataset of photos handed over (checked: a backbone, a batch size)."""
        self._require_backbone()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        pre = self.model.config.backbone.preprocess
        return photo_dataset(sources, pre, labels, batch_size, self.limits, read_exif)

    def iter_features(
        self,
        sources: Sequence[ImageSource],
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = False,
        names: Sequence[str] | None = None,
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """Decode, preprocess and run the backbone over photos, batch by batch (the reader of
        :meth:`locate_batch`).

        Yields:
            ``(batch, features (b, D) or None)``: the batch's keys are indices into ``sources``; its bad items
            carry their :class:`~geoswc.core.errors.ImageError`, named by ``names`` (default: the paths).
        """
        labels = [names[i] if names is not None else source_name(s) for i, s in enumerate(sources)]
        ds = self._photos(list(sources), labels, batch_size, read_exif=False)
        shards = ds.shards  # memory shards: keys map to input positions
        for b, feats in self._stream(ds, len(labels), batch_size, num_workers, progress):
            keys = torch.tensor([input_position(shards, int(k)) for k in b.keys], dtype=torch.long)  # type: ignore[arg-type]
            yield b._replace(keys=keys, bad=[(input_position(shards, k), m, e) for k, m, e in b.bad]), feats  # type: ignore[arg-type]

    def _results(self, b: Batch, feats: torch.Tensor | None, method: Method, with_place: bool) -> Iterator[Result]:
        """A batch's results, failures first: each with the photo's own GPS position (when its EXIF has one)."""
        yield from (LocateFailure(m.image, str(err), getattr(err, "kind", "corrupt")) for _, m, err in b.bad)
        if feats is not None:
            preds = self.predict_features(feats, method, names=[m.image for m in b.metas])
            yield from self._finish(preds, [m.gps for m in b.metas], with_place)

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
        if names is not None and (isinstance(names, str) or len(names) != len(sources)):
            raise InputError("names must match sources one to one")
        if names is not None and not all(isinstance(n, str) for n in names):
            raise TypeError(f"names must be strings, got {next(n for n in names if not isinstance(n, str))!r}")
        labels = [names[i] if names is not None else source_name(s) for i, s in enumerate(sources)]
        # File objects are read once, so decoding and the EXIF lookup both see the whole file.
        sources = [_read_file_object(s, label, self.limits) for s, label in zip(sources, labels, strict=True)]
        ds = self._photos(sources, labels, batch_size, read_exif=True)
        shards = ds.shards
        done: dict[int, Result] = {}  # results that came before an earlier photo's (another decoding worker's)
        nxt = 0
        for b, feats in self._stream(ds, len(labels), batch_size, num_workers, progress):
            keys = [k for k, _, _ in b.bad] + b.keys.tolist()  # the order _results yields them in
            positions = (input_position(shards, k) for k in keys)  # type: ignore[arg-type]
            done.update(zip(positions, self._results(b, feats, method, with_place), strict=True))
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1

    def _finish(
        self, preds: list[Prediction], gps: Sequence[tuple[float, float] | None], with_place: bool
    ) -> list[Prediction]:
        """Add each photo's own GPS position and, with ``with_place``, the nearest place to the estimate."""
        for p, g in zip(preds, gps, strict=True):
            p.with_gps(g)
        if with_place and preds:
            with self._clock.stage("place"):
                places = nearest_places([(p.lat, p.lon) for p in preds])
            for p, place in zip(preds, places, strict=True):
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
        self._require_backbone()  # before the shards are looked for
        urls = resolve_shards(shards)
        pre = self.model.config.backbone.preprocess
        ds = ShardDataset(urls, pre, limits=self.limits, read_exif=True, split_ranks=False)
        for b, feats in self._stream(ds, listed_total(urls), batch_size, num_workers, progress):
            yield from self._results(b, feats, method, with_place)

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
