"""Backbone features of a photo list, extracted once and cached, so heads train in minutes on a CPU.

On disk (a folder): ``features.json`` (format, resolved backbone config and fingerprint, digests),
``features.safetensors`` (float16 ``(N, V, D)``: V views per photo, the plain view first) and
``items.csv`` (image, author, lat, lon).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoswc.core import atomic_files, distributed, json_records, tensor_files
from geoswc.core.config import BackboneConfig, from_dict, to_dict
from geoswc.core.errors import ArtifactError, InputError, building
from geoswc.core.item_lines import ItemColumn, float_columns, row_offsets
from geoswc.core.progress import progress_bar
from geoswc.core.threads import ahead
from geoswc.data.images import DEFAULT_LIMITS, ImageLimits
from geoswc.data.records import Batch, LoadReport, Record, loader
from geoswc.data.shards import ShardDataset, Source, listed_total, photo_shards, resolve_shards
from geoswc.models.backbone import create_backbone
from geoswc.models.registry import backbone_fingerprint
from geoswc.training.feature_files import FEATURES_FORMAT, ITEMS_HEADER, CacheInfo, FeatureWriter, Part, write_cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extractor:
    """A backbone ``(B, 3, S, S) -> (B, D)`` with its resolved config (preprocessing) and fingerprint: what
    a feature cache records. A registry backbone (:meth:`from_config`) or a model's own (fine-tuned) one."""

    backbone: nn.Module
    config: BackboneConfig
    fingerprint: str

    @classmethod
    def from_config(cls, config: BackboneConfig) -> Extractor:
        backbone, resolved = create_backbone(config)
        return cls(backbone, resolved, backbone_fingerprint(resolved))


@dataclass(frozen=True)
class Extraction:
    """How features are extracted: views per photo, batching and decoding processes (the device and the precision
    are the engine's: :func:`geoswc.core.distributed.start`)."""

    views: int = 1
    """1 = the plain preprocessed image; more adds random augmented views (training)."""
    seed: int = 0
    """Seed of the augmented views."""
    batch_size: int = 32
    workers: int = 0
    """Decoding processes (0: in the calling process)."""
    limits: ImageLimits = DEFAULT_LIMITS
    progress: bool = True


@dataclass
class FeatureSet:
    """Cached features ``(N, V, D)`` with each photo's id, author and position ``(N,)``.

    Loaded caches are float16 and memory-mapped (MP-16 does not fit in memory as float32): cast the rows you
    use with ``.float()``."""

    features: torch.Tensor
    names: Sequence[str]
    authors: Sequence[str]
    lat: np.ndarray
    lon: np.ndarray
    backbone: BackboneConfig
    backbone_fingerprint: str
    seed: int = 0
    """Seed of the augmented views."""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    def subset(self, rows: Sequence[int] | np.ndarray) -> FeatureSet:
        rows = np.asarray(rows, np.int64)
        return FeatureSet(
            self.features[torch.from_numpy(rows)],
            [self.names[i] for i in rows],
            [self.authors[i] for i in rows],
            self.lat[rows],
            self.lon[rows],
            self.backbone,
            self.backbone_fingerprint,
            self.seed,
        )

    def save(self, folder: str | Path) -> None:
        """Write the cache (``features.json`` last, so that its presence marks a whole cache)."""
        with FeatureWriter(folder, self.views, int(self.features.shape[2])) as w:
            for s in range(0, len(self), 4096):
                e = min(len(self), s + 4096)
                w.add(
                    np.arange(s, e),
                    self.features[s:e],
                    self.names[s:e],
                    self.authors[s:e],
                    self.lat[s:e],
                    self.lon[s:e],
                )
            w.finish(
                CacheInfo(
                    to_dict(self.backbone),
                    self.backbone_fingerprint,
                    self.views,
                    int(self.features.shape[2]),
                    self.seed,
                ),
                progress=False,
            )

    @classmethod
    def load(cls, folder: str | Path) -> FeatureSet:
        folder = Path(folder)
        keys = ("backbone_fingerprint", "backbone", "size", "views", "seed", "dim", "tensors_sha256", "items_sha256")
        meta = json_records.read_record(
            folder / "features.json",
            "feature cache",
            FEATURES_FORMAT,
            keys,
            "re-extract features with `geoswc features`",
        )
        feats = tensor_files.map_tensor(
            folder / "features.safetensors", "features", "feature cache tensors", meta["tensors_sha256"]
        )
        names, authors, lat, lon = _read_items(folder / "items.csv", meta.get("items_sha256"))
        if (
            feats.ndim != 3
            or feats.shape[0] != len(names)
            or list(feats.shape) != [meta["size"], meta["views"], meta["dim"]]
        ):
            raise ArtifactError(f"feature cache {folder} is inconsistent; re-extract features")
        try:
            backbone = from_dict(BackboneConfig, meta["backbone"])
        except ArtifactError as e:
            raise ArtifactError(
                f"feature cache {folder / 'features.json'} is damaged ({e}); re-extract features"
            ) from e
        if backbone.feature_dim != meta["dim"]:
            raise ArtifactError(f"feature cache {folder / 'features.json'} is damaged; re-extract features")
        return cls(feats, names, authors, lat, lon, backbone, str(meta["backbone_fingerprint"]), int(meta["seed"]))


def _read_items(path: Path, sha256: object) -> tuple[ItemColumn, ItemColumn, np.ndarray, np.ndarray]:
    """A cache's photo list, checked against its digest and read in place: names and authors ``(N,)`` parsed on
    access (8 bytes a photo in memory), positions ``(N,)``."""
    if not path.is_file() or tensor_files.sha256_file(path) != sha256:
        raise ArtifactError(f"{path} is missing, damaged or was changed; re-extract features")
    data = np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    header = len(ITEMS_HEADER)
    if bytes(data[:header]) != ITEMS_HEADER:
        raise ArtifactError(f"{path} does not begin with {ITEMS_HEADER!r}; re-extract features")
    with building(f"the photo list of feature cache {path.parent}"):
        offsets = row_offsets(data, header)
        try:
            pos = float_columns(data, offsets, 2)
        except ValueError as e:
            raise ArtifactError(f"{path} is damaged ({e}); re-extract features") from e
    return ItemColumn(data, offsets, 0), ItemColumn(data, offsets, 1), pos[:, 0].copy(), pos[:, 1].copy()


def _shard_batches(shards: Sequence[Source], ex: Extractor, how: Extraction) -> Iterator[Batch]:
    yield from loader(
        ShardDataset(shards, ex.config.preprocess, views=how.views, seed=how.seed, limits=how.limits),
        how.batch_size,
        how.workers,
    )


class _Collected:
    """A sink keeping the features in memory (:func:`extract_features`): ``rows()`` sorts them by key."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.chunks: list[torch.Tensor] = []
        self.metas: list[Any] = []

    def add(self, keys: torch.Tensor, feats: torch.Tensor, metas: Sequence[Any]) -> None:
        self.keys.append(keys)
        self.chunks.append(feats)
        self.metas += metas

    def rows(self, views: int) -> tuple[torch.Tensor, list[Any]]:
        if not self.chunks:
            return torch.zeros(0, views, 0), []
        sort = np.argsort(torch.cat(self.keys).numpy(), kind="stable")
        return torch.cat(self.chunks)[torch.from_numpy(sort)], [self.metas[i] for i in sort]


class _Handed:
    """A sink handing each batch on as it comes (``add(keys, feats, metas)``); counts the rows."""

    def __init__(self, add: Callable[[torch.Tensor, torch.Tensor, Sequence[Any]], None]) -> None:
        self.hand, self.count = add, 0

    def add(self, keys: torch.Tensor, feats: torch.Tensor, metas: Sequence[Any]) -> None:
        self.hand(keys, feats, metas)
        self.count += len(metas)


@torch.inference_mode()
def _run_backbone(
    ex: Extractor,
    batches: Iterator[Batch],
    how: Extraction,
    report: LoadReport,
    total: int | None,
    sink: _Collected | _Handed,
) -> None:
    """Run the backbone over the batches (decoded in a background thread, a batch or two ahead): each good photo's
    features ``(V, D)`` go to ``sink`` with its key and meta, each bad one to ``report``."""
    device = next(ex.backbone.parameters()).device
    ex.backbone.eval()
    show = how.progress and distributed.is_main()
    done, last = 0, time.perf_counter()
    with progress_bar(total=total, desc="features", unit="img", show=show) as bar:
        for i, b in enumerate(ahead(batches, name="geoswc-decode")):
            for _, meta, err in b.bad:
                report.skip(meta.image, str(err))
            if b.images is not None:
                x = b.images
                with distributed.autocast():
                    f = ex.backbone(x.reshape(-1, *x.shape[-3:]).to(device))
                sink.add(b.keys, f.float().cpu().reshape(x.shape[0], how.views, -1), b.metas)
            bar.update(len(b.keys) + len(b.bad))
            n, now = len(b.keys) + len(b.bad), time.perf_counter()
            done += n
            if i == 1 and total and distributed.is_main():  # the first batch paid the start-up: time the second
                log.info("%s", cost_estimate(total - done, how.views, n, now - last))
            last = now


def cost_estimate(photos: int, views: int, batch: int, seconds: float) -> str:
    """What the rest of an extraction will take, from one batch of ``batch`` photos timed at ``seconds``."""
    rate = batch / max(seconds, 1e-9)
    left = photos / rate
    when = f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return f"features: about {when} more for {photos:,} photos x {views} view(s) ({rate:.1f} photos/s on this batch)"


def _feature_set(feats: torch.Tensor, metas: Sequence[Any], ex: Extractor, seed: int) -> FeatureSet:
    return FeatureSet(
        feats,
        [m.image for m in metas],
        [m.author for m in metas],
        np.array([m.lat for m in metas], np.float64),
        np.array([m.lon for m in metas], np.float64),
        ex.config,
        ex.fingerprint,
        seed,
    )


def _batches(
    ex: Extractor,
    how: Extraction,
    records: Sequence[Record] | None,
    shards: Sequence[str] | None,
    rank: int = 0,
    world: int = 1,
) -> tuple[Iterator[Batch], LoadReport, int | None]:
    """This process's batches, an empty report and the progress total. Photos of a list are read as photo shards
    (:func:`~geoswc.data.shards.photo_shards`, enough for every rank's decoding processes), so one dataset reads
    lists and shards alike; the shards are dealt to the ranks by the dataset."""
    if records is not None:
        if not records:
            raise InputError("no photos to extract features from")
        sources: list[Source] = list(photo_shards(records, parts=world * max(1, how.workers)))
        total: int | None = sum(len(s.records) for s in sources[rank::world])  # type: ignore[union-attr]
    else:
        assert shards is not None
        sources, total = list(shards), listed_total(shards[rank::world])
    if len(sources) < world:
        log.warning("%d shards for %d ranks: some ranks have nothing to do", len(sources), world)
    report = LoadReport("feature extraction" + (f", rank {rank}" if world > 1 else ""), total=total or 0)
    return _shard_batches(sources, ex, how), report, total


def extract_features(
    ex: Extractor, records: Sequence[Record], how: Extraction = Extraction()
) -> tuple[FeatureSet, LoadReport]:
    """Run the backbone over photos, features in memory. Undecodable photos are reported and left out.

    Returns:
        The features ``(N, V, D)`` of the photos that decoded, in ``records`` order, and the report of
        those that did not.
    """
    batches, report, total = _batches(ex, how, records, None)
    return _collect(ex, how, batches, report, total, f"none of the {len(records)} photos could be decoded")


def extract_shard_features(
    ex: Extractor, shards: str | Path | Sequence[str | Path], how: Extraction = Extraction()
) -> tuple[FeatureSet, LoadReport]:
    """:func:`extract_features` of the photos in WebDataset shards, streamed; the features come out in shard
    order (with shards written by ``geoswc shards`` they equal those of the source CSV's photos)."""
    batches, report, total = _batches(ex, how, None, resolve_shards(shards))
    return _collect(ex, how, batches, report, total, "no photo in the shards could be decoded")


def _collect(
    ex: Extractor, how: Extraction, batches: Iterator[Batch], report: LoadReport, total: int | None, none: str
) -> tuple[FeatureSet, LoadReport]:
    sink = _Collected()
    _run_backbone(ex, batches, how, report, total, sink)
    feats, metas = sink.rows(how.views)
    report.total = len(metas) + len(report.skipped)
    report.log()
    if not metas:
        raise InputError(f"{none}: {report.summary()}")
    return _feature_set(feats, metas, ex, how.seed), report


def stream_features(
    ex: Extractor,
    add: Callable[[torch.Tensor, torch.Tensor, Sequence[Any]], None],
    *,
    records: Sequence[Record] | None = None,
    shards: str | Path | Sequence[str | Path] | None = None,
    how: Extraction = Extraction(),
) -> LoadReport:
    """Run the backbone over ``records`` or ``shards`` and hand each batch on as it is computed, keeping nothing:
    ``add(keys (b,), features (b, V, D), metas)``, each meta with ``image``, ``author``, ``lat`` and ``lon``.

    Returns:
        The report of the photos that could not be read.

    Raises:
        InputError: no photo could be read.
    """
    if (records is None) == (shards is None):
        raise InputError("give records or shards")
    batches, report, total = _batches(ex, how, records, resolve_shards(shards) if shards is not None else None)
    sink = _Handed(add)
    _run_backbone(ex, batches, how, report, total, sink)
    report.total = sink.count + len(report.skipped)
    report.log()
    if not sink.count:
        raise InputError(f"no photo could be decoded: {report.summary()}")
    return report


def extract_and_save(
    out: str | Path,
    ex: Extractor,
    *,
    records: Sequence[Record] | None = None,
    shards: str | Path | Sequence[str | Path] | None = None,
    how: Extraction = Extraction(),
) -> tuple[FeatureSet | None, LoadReport]:
    """Extract the features of ``records`` or ``shards`` into the cache ``out``, streaming them to disk as they
    are computed (memory does not grow with the photos beyond 16 bytes each).

    Under torchrun each rank stages its share (every ``world_size``-th record, or its shards) in ``out/.parts``,
    and rank 0 writes the cache from the parts in input order and returns it; the other ranks return None. A
    multi-node job needs ``out`` on a shared filesystem.

    Returns:
        The feature set, memory-mapped (None on ranks other than 0), and the report of skipped photos (rank 0:
        all ranks').
    """
    if (records is None) == (shards is None):
        raise InputError("give records or shards")
    rank, world = distributed.rank(), distributed.world_size()
    urls = resolve_shards(shards) if shards is not None else None
    batches, report, total = _batches(ex, how, records, urls, rank, world)
    parts = Path(out) / ".parts"
    writer = FeatureWriter(parts / f"rank-{rank:05d}" if world > 1 else out, how.views, ex.config.feature_dim)
    sink = _Handed(
        lambda keys, feats, metas: writer.add(
            keys.numpy(),
            feats,
            [m.image for m in metas],
            [m.author for m in metas],
            [m.lat for m in metas],
            [m.lon for m in metas],
        )
    )
    try:
        _run_backbone(ex, batches, how, report, total, sink)
    except BaseException:
        writer.abort()
        raise
    report.total = sink.count + len(report.skipped)
    if world == 1:
        try:
            return _finish_cache(Path(out), [writer.part()], [report], ex, how)
        finally:
            writer.abort()
    writer.part().save_index()
    atomic_files.write_json(
        parts / f"rank-{rank:05d}.json",
        {"staging": writer.staging.name, "total": report.total, "skipped": report.skipped},
    )
    distributed.barrier()
    if rank != 0:
        return None, report
    try:  # rank 0: the ranks' staged parts written as one cache, in input order
        staged, reports = [], []
        for r in range(world):
            meta = json_records.read_json(parts / f"rank-{r:05d}.json", f"features of rank {r}")
            staged.append(Part.load(parts / f"rank-{r:05d}" / Path(str(meta["staging"])).name))
            reports.append(LoadReport(f"rank {r}", int(meta["total"]), [(str(a), str(b)) for a, b in meta["skipped"]]))
        return _finish_cache(Path(out), staged, reports, ex, how)
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def _finish_cache(
    out: Path, parts: Sequence[Part], reports: Sequence[LoadReport], ex: Extractor, how: Extraction
) -> tuple[FeatureSet, LoadReport]:
    """Write the cache ``out`` from staged parts; the processes' reports joined into one."""
    report = LoadReport("feature extraction", sum(r.total for r in reports), [s for r in reports for s in r.skipped])
    report.log()
    if not sum(len(p.keys) for p in parts):
        raise InputError(f"no photo could be decoded: {report.summary()}")
    info = CacheInfo(to_dict(ex.config), ex.fingerprint, how.views, int(ex.config.feature_dim), how.seed)
    write_cache(out, parts, info, how.progress)
    return FeatureSet.load(out), report
