"""Backbone features of a photo list, extracted once and cached, so heads train in minutes on a CPU.

On disk (a folder): ``features.json`` (format, resolved backbone config and fingerprint, digests),
``features.safetensors`` (float16 ``(N, V, D)``: V views per photo, the plain view first) and
``items.csv`` (image, author, lat, lon).
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed, storage
from .backbone import backbone_fingerprint
from .config import BackboneConfig, from_dict, to_dict
from .data import Batch, ImageDataset, LoadReport, Record, loader
from .errors import ArtifactError, InputError
from .images import DEFAULT_LIMITS, ImageLimits
from .progress import progress_bar

log = logging.getLogger(__name__)

FEATURES_FORMAT = "geoswc-features/1"


@dataclass(frozen=True)
class Extractor:
    """A backbone ``(B, 3, S, S) -> (B, D)`` with its resolved config (preprocessing) and fingerprint: what
    a feature cache records. A registry backbone (:meth:`from_config`) or a model's own (fine-tuned) one."""

    backbone: nn.Module
    config: BackboneConfig
    fingerprint: str

    @classmethod
    def from_config(cls, config: BackboneConfig) -> Extractor:
        from .backbone import create_backbone

        backbone, resolved = create_backbone(config)
        return cls(backbone, resolved, backbone_fingerprint(resolved))


@dataclass(frozen=True)
class Extraction:
    """How features are extracted: views per photo, batching, decoding processes and precision."""

    views: int = 1
    """1 = the plain preprocessed image; more adds random augmented views (training)."""
    seed: int = 0
    """Seed of the augmented views."""
    batch_size: int = 32
    workers: int = 0
    """Decoding processes (0: in the calling process)."""
    precision: str = "fp32"
    """``fp32``, or mixed precision on a GPU (``auto``, ``bf16``, ``fp16``; ignored on the CPU)."""
    limits: ImageLimits = DEFAULT_LIMITS
    progress: bool = True


@dataclass
class FeatureSet:
    """Cached features ``(N, V, D)`` with each photo's id, author and position ``(N,)``.

    Loaded caches are float16 and memory-mapped (MP-16 does not fit in memory as float32): cast the rows you
    use with ``.float()``."""

    features: torch.Tensor
    names: list[str]
    authors: list[str]
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
        return FeatureSet(self.features[torch.from_numpy(rows)], [self.names[i] for i in rows],
                          [self.authors[i] for i in rows], self.lat[rows], self.lon[rows], self.backbone,
                          self.backbone_fingerprint, self.seed)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        sha = storage.save_tensors(folder / "features.safetensors", {"features": self.features.half()})
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "author", "lat", "lon"])
        for row in zip(self.names, self.authors, self.lat, self.lon, strict=True):
            w.writerow([row[0], row[1], repr(float(row[2])), repr(float(row[3]))])
        items = buf.getvalue().encode()
        storage.write_bytes(folder / "items.csv", items)
        storage.write_json(folder / "features.json", storage.seal({
            "format": FEATURES_FORMAT,
            "backbone_fingerprint": self.backbone_fingerprint,
            "backbone": to_dict(self.backbone),
            "size": len(self), "views": self.views, "seed": self.seed, "dim": int(self.features.shape[2]),
            "tensors_sha256": sha, "items_sha256": storage.sha256_bytes(items),
        }))

    @classmethod
    def load(cls, folder: str | Path) -> FeatureSet:
        folder = Path(folder)
        keys = ("backbone_fingerprint", "backbone", "size", "views", "seed", "dim", "tensors_sha256", "items_sha256")
        meta = storage.read_record(folder / "features.json", "feature cache", FEATURES_FORMAT, keys,
                                   "re-extract features with `geoswc features`")
        feats = storage.map_tensor(folder / "features.safetensors", "features", "feature cache tensors",
                                   meta["tensors_sha256"])
        raw = (folder / "items.csv").read_bytes() if (folder / "items.csv").is_file() else b""
        if storage.sha256_bytes(raw) != meta.get("items_sha256"):
            raise ArtifactError(f"{folder / 'items.csv'} is missing, damaged or was changed; re-extract features")
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))[1:]
        if feats.ndim != 3 or feats.shape[0] != len(rows) or list(feats.shape) != [meta["size"], meta["views"],
                                                                                  meta["dim"]]:
            raise ArtifactError(f"feature cache {folder} is inconsistent; re-extract features")
        try:
            backbone = from_dict(BackboneConfig, meta["backbone"])
        except ArtifactError as e:
            raise ArtifactError(f"feature cache {folder / 'features.json'} is damaged ({e}); "
                                "re-extract features") from e
        if backbone.feature_dim != meta["dim"]:
            raise ArtifactError(f"feature cache {folder / 'features.json'} is damaged; re-extract features")
        return cls(feats, [r[0] for r in rows], [r[1] for r in rows],
                   np.array([float(r[2]) for r in rows]), np.array([float(r[3]) for r in rows]),
                   backbone, str(meta["backbone_fingerprint"]), int(meta["seed"]))


def _record_batches(records: Sequence[Record], ex: Extractor, how: Extraction,
                    indices: Sequence[int] | None = None) -> Iterator[Batch]:
    """Batches whose metas are the records (bad items named by their image id)."""
    ds: torch.utils.data.Dataset = ImageDataset([r.path for r in records], ex.config.preprocess, views=how.views,
                                                seed=how.seed, limits=how.limits)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, list(indices))  # items keep their index in ``records`` (augment seeds)
    for b in loader(ds, how.batch_size, how.workers):
        yield Batch(b.keys, b.images, [records[i] for i in b.keys.tolist()], [(k, records[k], e) for k, _, e in b.bad])


def _shard_batches(shards: Sequence[str], ex: Extractor, how: Extraction) -> Iterator[Batch]:
    from .shards import ShardDataset

    yield from loader(ShardDataset(shards, ex.config.preprocess, views=how.views, seed=how.seed, limits=how.limits),
                      how.batch_size, how.workers)


@torch.inference_mode()
def _run_backbone(ex: Extractor, batches: Iterator[Batch], how: Extraction, report: LoadReport,
                  total: int | None) -> tuple[np.ndarray, torch.Tensor, list[Any]]:
    """Features of every good photo, sorted by key: ``(keys (n,), features (n, V, D), metas [n])``."""
    device = next(ex.backbone.parameters()).device
    dtype = distributed.resolve_precision(device, how.precision)
    ex.backbone.eval()
    keys: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    metas: list[Any] = []
    show = how.progress and distributed.context().is_main
    with progress_bar(total=total, desc="features", unit="img", show=show) as bar:
        for b in batches:
            for _, meta, err in b.bad:
                report.skip(meta.image, str(err))
            if b.images is not None:
                x = b.images
                with distributed.autocast(device, dtype):
                    f = ex.backbone(x.reshape(-1, *x.shape[-3:]).to(device))
                chunks.append(f.float().cpu().reshape(x.shape[0], how.views, -1))
                keys.append(b.keys)
                metas += b.metas
            bar.update(len(b.keys) + len(b.bad))
    if not chunks:
        return np.zeros(0, np.int64), torch.zeros(0, how.views, 0), []
    order = torch.cat(keys).numpy()
    sort = np.argsort(order, kind="stable")
    return order[sort], torch.cat(chunks)[torch.from_numpy(sort)], [metas[i] for i in sort]


def _feature_set(feats: torch.Tensor, metas: Sequence[Any], ex: Extractor, seed: int) -> FeatureSet:
    return FeatureSet(feats, [m.image for m in metas], [m.author for m in metas],
                      np.array([m.lat for m in metas], np.float64), np.array([m.lon for m in metas], np.float64),
                      ex.config, ex.fingerprint, seed)


def extract_features(ex: Extractor, records: Sequence[Record], how: Extraction = Extraction()
                     ) -> tuple[FeatureSet, LoadReport]:
    """Run the backbone over photos. Undecodable photos are reported and left out, never fatal.

    Returns:
        The features ``(N, V, D)`` of the photos that decoded, in ``records`` order, and the report of
        those that did not.
    """
    if not records:
        raise InputError("no photos to extract features from")
    report = LoadReport("feature extraction", total=len(records))
    _, feats, metas = _run_backbone(ex, _record_batches(records, ex, how), how, report, len(records))
    report.log()
    if not metas:
        raise InputError(f"none of the {len(records)} photos could be decoded: {report.summary()}")
    return _feature_set(feats, metas, ex, how.seed), report


def extract_shard_features(ex: Extractor, shards: str | Path | Sequence[str | Path],
                           how: Extraction = Extraction()) -> tuple[FeatureSet, LoadReport]:
    """:func:`extract_features` of the photos in WebDataset shards, streamed (never all in memory).

    The features come out in shard order; with shards written by ``geoswc shards`` they equal those of
    the source CSV's photos (augmented views included).
    """
    from .shards import listed_total, resolve_shards

    urls = resolve_shards(shards)
    report = LoadReport("feature extraction (shards)")
    _, feats, metas = _run_backbone(ex, _shard_batches(urls, ex, how), how, report, listed_total(urls))
    report.total = len(metas) + len(report.skipped)
    report.log()
    if not metas:
        raise InputError(f"no photo in the shards could be decoded: {report.summary()}")
    return _feature_set(feats, metas, ex, how.seed), report


def extract_and_save(out: str | Path, ex: Extractor, *, records: Sequence[Record] | None = None,
                     shards: str | Path | Sequence[str | Path] | None = None, how: Extraction = Extraction()
                     ) -> tuple[FeatureSet | None, LoadReport]:
    """Extract the features of ``records`` or ``shards`` and save the cache to ``out``.

    Under torchrun each rank extracts its share (every ``world_size``-th record, or shard), writes it to
    ``out/.parts``, and rank 0 merges the parts in input order, saves the cache and returns it; the other
    ranks return None. A multi-node job needs ``out`` on a shared filesystem.

    Returns:
        The feature set (None on ranks other than 0) and the report of skipped photos (rank 0: all ranks').
    """
    if (records is None) == (shards is None):
        raise InputError("give records or shards")
    ctx = distributed.context()
    if not ctx.enabled:
        fs, report = (extract_features(ex, records, how) if records is not None
                      else extract_shard_features(ex, shards, how))  # type: ignore[arg-type]
        fs.save(out)
        return fs, report
    keys, feats, metas, report = _extract_share(ex, records, shards, how)
    parts = Path(out) / ".parts"
    storage.save_tensors(parts / f"rank-{ctx.rank:05d}.safetensors",
                         {"features": feats.half(), "order": torch.from_numpy(keys.astype(np.int64))})
    storage.write_json(parts / f"rank-{ctx.rank:05d}.json", {
        "names": [m.image for m in metas], "authors": [m.author for m in metas],
        "lat": [float(m.lat) for m in metas], "lon": [float(m.lon) for m in metas],
        "total": report.total, "skipped": report.skipped})
    distributed.barrier()
    if not ctx.is_main:
        return None, report
    fs, report = _merge_parts(parts, ctx.world_size, ex, how)
    fs.save(out)
    shutil.rmtree(parts, ignore_errors=True)
    return fs, report


def _extract_share(ex: Extractor, records: Sequence[Record] | None, shards: str | Path | Sequence[str | Path] | None,
                   how: Extraction) -> tuple[np.ndarray, torch.Tensor, list[Any], LoadReport]:
    """This rank's share of a torchrun extraction: every ``world_size``-th record, or shard."""
    from .shards import listed_total, resolve_shards

    ctx = distributed.context()
    if records is not None:
        if not records:
            raise InputError("no photos to extract features from")
        mine = range(ctx.rank, len(records), ctx.world_size)
        report = LoadReport(f"feature extraction, rank {ctx.rank}", total=len(mine))
        keys, feats, metas = _run_backbone(ex, _record_batches(records, ex, how, mine), how, report, len(mine))
        return keys, feats, metas, report
    urls = resolve_shards(shards)  # type: ignore[arg-type]
    if len(urls) < ctx.world_size:
        log.warning("%d shards for %d ranks: some ranks have nothing to do", len(urls), ctx.world_size)
    report = LoadReport(f"feature extraction (shards), rank {ctx.rank}")
    total = listed_total(urls[ctx.rank::ctx.world_size])  # the shards split_by_node deals to this rank
    keys, feats, metas = _run_backbone(ex, _shard_batches(urls, ex, how), how, report, total)
    report.total = len(metas) + len(report.skipped)
    return keys, feats, metas, report


def _merge_parts(parts: Path, world: int, ex: Extractor, how: Extraction) -> tuple[FeatureSet, LoadReport]:
    """Rank 0: the ranks' parts as one feature set, in input order."""
    report = LoadReport("feature extraction")
    keys, chunks, metas = [], [], []
    for r in range(world):
        t = storage.load_tensors(parts / f"rank-{r:05d}.safetensors", f"features of rank {r}")
        meta = storage.read_json(parts / f"rank-{r:05d}.json", f"features of rank {r}")
        if t["features"].shape[0]:
            chunks.append(t["features"].float())
        keys.append(t["order"])
        report.total += int(meta["total"])
        report.skipped += [(str(a), str(b)) for a, b in meta["skipped"]]
        metas += [Record(n, Path(n), la, lo, a) for n, a, la, lo in
                  zip(meta["names"], meta["authors"], meta["lat"], meta["lon"], strict=True)]
    report.log()
    if not metas:
        raise InputError(f"no photo could be decoded: {report.summary()}")
    sort = torch.from_numpy(np.argsort(torch.cat(keys).numpy(), kind="stable"))
    feats = torch.cat(chunks)[sort].reshape(len(metas), how.views, -1)
    return _feature_set(feats, [metas[i] for i in sort.tolist()], ex, how.seed), report
