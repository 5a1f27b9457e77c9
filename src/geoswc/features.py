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
from tqdm.auto import tqdm

from . import distributed, storage
from .backbone import Backbone, backbone_fingerprint
from .config import BackboneConfig, Preprocess, from_dict, to_dict
from .data import ImageDataset, LoadReport, Record, collate
from .errors import ArtifactError, InputError
from .images import DEFAULT_LIMITS, ImageLimits

log = logging.getLogger(__name__)

FEATURES_FORMAT = "geoswc-features/1"

_Batch = tuple[torch.Tensor, torch.Tensor | None, list[Any], list[tuple[int, str, Exception]]]
"""``(order keys (b,), images (b, [V,] 3, S, S) or None, metas [b], bad [(order, label, error)])``."""


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
        meta = storage.read_json(folder / "features.json", "feature cache")
        if meta.get("format") != FEATURES_FORMAT:
            raise ArtifactError(f"{folder} is not a geoswc feature cache (format {meta.get('format')!r}); "
                                "re-extract features with `geoswc features`")
        keys = ("format", "backbone_fingerprint", "backbone", "size", "views", "seed", "dim", "tensors_sha256",
                "items_sha256")
        storage.require_keys(meta, keys, "feature cache", folder / "features.json")
        storage.check_seal(meta, keys, "feature cache", folder / "features.json")
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


def _record_batches(records: Sequence[Record], pre: Preprocess, views: int, seed: int, limits: ImageLimits,
                    batch_size: int, num_workers: int, indices: Sequence[int] | None = None) -> Iterator[_Batch]:
    ds: torch.utils.data.Dataset = ImageDataset([r.path for r in records], pre, views=views, seed=seed, limits=limits)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, list(indices))  # items keep their index in ``records`` (augment seeds)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    for idx, x, bad in dl:
        yield idx, x, [records[i] for i in idx.tolist()], [(i, records[i].image, e) for i, e in bad]


def _shard_batches(shards: Sequence[str], pre: Preprocess, views: int, seed: int, limits: ImageLimits,
                   batch_size: int, num_workers: int) -> Iterator[_Batch]:
    from .shards import ShardDataset, collate_samples

    ds = ShardDataset(shards, pre, views=views, seed=seed, limits=limits)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
    for orders, x, metas, bad in dl:
        yield orders, x, metas, [(o, m.image, e) for o, m, e in bad]


@torch.inference_mode()
def _run_backbone(backbone: Backbone, batches: Iterator[_Batch], views: int, report: LoadReport, progress: bool,
                  total: int | None, precision: str) -> tuple[np.ndarray, torch.Tensor, list[Any]]:
    """Features of every good photo, sorted by order key: ``(orders (n,), features (n, V, D), metas [n])``."""
    device = next(backbone.parameters()).device
    dtype = distributed.resolve_precision(device, precision)
    backbone.eval()
    orders: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    metas: list[Any] = []
    disable = not progress or not distributed.context().is_main
    with tqdm(total=total, desc="features", unit="img", disable=disable) as bar:
        for order, x, meta, bad in batches:
            for _, label, err in bad:
                report.skip(label, str(err))
            if x is not None:
                b = x.shape[0]
                with distributed.autocast(device, dtype):
                    f = backbone(x.reshape(-1, *x.shape[-3:]).to(device))
                chunks.append(f.float().cpu().reshape(b, views, -1))
                orders.append(order)
                metas += meta
            bar.update(len(order) + len(bad))
    if not chunks:
        return np.zeros(0, np.int64), torch.zeros(0, views, 0), []
    keys = torch.cat(orders).numpy()
    sort = np.argsort(keys, kind="stable")
    return keys[sort], torch.cat(chunks)[torch.from_numpy(sort)], [metas[i] for i in sort]


def _feature_set(feats: torch.Tensor, metas: Sequence[Any], backbone_cfg: BackboneConfig, fingerprint: str,
                 seed: int) -> FeatureSet:
    return FeatureSet(feats, [m.image for m in metas], [m.author for m in metas],
                      np.array([m.lat for m in metas], np.float64), np.array([m.lon for m in metas], np.float64),
                      backbone_cfg, fingerprint, seed)


def extract_features(
    backbone: Backbone, backbone_cfg: BackboneConfig, records: Sequence[Record], views: int = 1,
    batch_size: int = 32, num_workers: int = 0, seed: int = 0, progress: bool = True,
    limits: ImageLimits = DEFAULT_LIMITS, fingerprint: str | None = None, precision: str = "fp32",
) -> tuple[FeatureSet, LoadReport]:
    """Run the backbone over photos. Undecodable photos are reported and left out, never fatal.

    Args:
        backbone, backbone_cfg: the extractor and its resolved config (preprocessing).
        records: photos with positions.
        views: 1 = the plain preprocessed image; more adds random augmented views (training).
        fingerprint: identity to record (default: the backbone config's fingerprint; a fine-tuned
            model passes its own).
        precision: ``fp32``, or mixed precision on a GPU (``auto``, ``bf16``, ``fp16``; ignored on the CPU).

    Returns:
        The features ``(N, V, D)`` of the photos that decoded, in ``records`` order, and the report of
        those that did not.
    """
    if not records:
        raise InputError("no photos to extract features from")
    report = LoadReport("feature extraction", total=len(records))
    batches = _record_batches(records, backbone_cfg.preprocess, views, seed, limits, batch_size, num_workers)
    _, feats, metas = _run_backbone(backbone, batches, views, report, progress, len(records), precision)
    report.log()
    if not metas:
        raise InputError(f"none of the {len(records)} photos could be decoded: {report.summary()}")
    return _feature_set(feats, metas, backbone_cfg, fingerprint or backbone_fingerprint(backbone_cfg), seed), report


def extract_shard_features(
    backbone: Backbone, backbone_cfg: BackboneConfig, shards: str | Path | Sequence[str | Path], views: int = 1,
    batch_size: int = 32, num_workers: int = 0, seed: int = 0, progress: bool = True,
    limits: ImageLimits = DEFAULT_LIMITS, fingerprint: str | None = None, precision: str = "fp32",
) -> tuple[FeatureSet, LoadReport]:
    """:func:`extract_features` of the photos in WebDataset shards, streamed (never all in memory).

    The features come out in shard order; with shards written by ``geoswc shards`` they equal those of
    the source CSV's photos (augmented views included).
    """
    from .shards import resolve_shards, shard_sizes

    urls = resolve_shards(shards)
    sizes = shard_sizes(urls)
    total = None if None in sizes else sum(s or 0 for s in sizes)
    report = LoadReport("feature extraction (shards)")
    batches = _shard_batches(urls, backbone_cfg.preprocess, views, seed, limits, batch_size, num_workers)
    _, feats, metas = _run_backbone(backbone, batches, views, report, progress, total, precision)
    report.total = len(metas) + len(report.skipped)
    report.log()
    if not metas:
        raise InputError(f"no photo in the shards could be decoded: {report.summary()}")
    return _feature_set(feats, metas, backbone_cfg, fingerprint or backbone_fingerprint(backbone_cfg), seed), report


def extract_and_save(
    out: str | Path, backbone: Backbone, backbone_cfg: BackboneConfig, *, records: Sequence[Record] | None = None,
    shards: str | Path | Sequence[str | Path] | None = None, views: int = 1, batch_size: int = 32,
    num_workers: int = 0, seed: int = 0, progress: bool = True, limits: ImageLimits = DEFAULT_LIMITS,
    fingerprint: str | None = None, precision: str = "fp32",
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
    fp = fingerprint or backbone_fingerprint(backbone_cfg)
    ctx = distributed.context()
    common: dict[str, Any] = dict(views=views, batch_size=batch_size, num_workers=num_workers, seed=seed,
                                  progress=progress, limits=limits, fingerprint=fp, precision=precision)
    if not ctx.enabled:
        fs, report = (extract_features(backbone, backbone_cfg, records, **common) if records is not None
                      else extract_shard_features(backbone, backbone_cfg, shards, **common))  # type: ignore[arg-type]
        fs.save(out)
        return fs, report
    out = Path(out)
    pre = backbone_cfg.preprocess
    if records is not None:
        if not records:
            raise InputError("no photos to extract features from")
        mine = range(ctx.rank, len(records), ctx.world_size)
        report = LoadReport(f"feature extraction, rank {ctx.rank}", total=len(mine))
        batches = _record_batches(records, pre, views, seed, limits, batch_size, num_workers, mine)
        total: int | None = len(mine)
    else:
        from .shards import resolve_shards, shard_sizes

        urls = resolve_shards(shards)  # type: ignore[arg-type]
        if len(urls) < ctx.world_size:
            log.warning("%d shards for %d ranks: some ranks have nothing to do", len(urls), ctx.world_size)
        report = LoadReport(f"feature extraction (shards), rank {ctx.rank}")
        batches = _shard_batches(urls, pre, views, seed, limits, batch_size, num_workers)
        sizes = shard_sizes(urls)[ctx.rank::ctx.world_size]  # the shards ShardDataset deals to this rank
        total = None if None in sizes else sum(n or 0 for n in sizes)
    keys, feats, metas = _run_backbone(backbone, batches, views, report, progress, total, precision)
    if shards is not None:
        report.total = len(metas) + len(report.skipped)
    parts = out / ".parts"
    storage.save_tensors(parts / f"rank-{ctx.rank:05d}.safetensors",
                         {"features": feats.half(), "order": torch.from_numpy(keys.astype(np.int64))})
    storage.write_json(parts / f"rank-{ctx.rank:05d}.json", {
        "names": [m.image for m in metas], "authors": [m.author for m in metas],
        "lat": [float(m.lat) for m in metas], "lon": [float(m.lon) for m in metas],
        "total": report.total, "skipped": report.skipped})
    distributed.barrier()
    if not ctx.is_main:
        return None, report
    fs, report = _merge_parts(parts, ctx.world_size, views, backbone_cfg, fp, seed)
    fs.save(out)
    shutil.rmtree(parts, ignore_errors=True)
    return fs, report


def _merge_parts(parts: Path, world: int, views: int, backbone_cfg: BackboneConfig, fingerprint: str,
                 seed: int) -> tuple[FeatureSet, LoadReport]:
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
    feats = torch.cat(chunks)[sort].reshape(len(metas), views, -1)
    return _feature_set(feats, [metas[i] for i in sort.tolist()], backbone_cfg, fingerprint, seed), report
