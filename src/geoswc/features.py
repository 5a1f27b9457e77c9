"""Backbone features of a photo list, extracted once and cached, so heads train in minutes on a CPU.

On disk (a folder): ``features.json`` (format, resolved backbone config and fingerprint, digests),
``features.safetensors`` (float16 ``(N, V, D)``: V views per photo, the plain view first) and
``items.csv`` (image, author, lat, lon).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import storage
from .backbone import Backbone, backbone_fingerprint
from .config import BackboneConfig, from_dict, to_dict
from .data import ImageDataset, LoadReport, Record, collate
from .errors import ArtifactError, InputError
from .images import DEFAULT_LIMITS, ImageLimits

log = logging.getLogger(__name__)

FEATURES_FORMAT = "geoswc-features/1"


@dataclass
class FeatureSet:
    """Cached features ``(N, V, D)`` float32 with each photo's id, author and position ``(N,)``."""

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
        storage.write_json(folder / "features.json", {
            "format": FEATURES_FORMAT,
            "backbone_fingerprint": self.backbone_fingerprint,
            "backbone": to_dict(self.backbone),
            "size": len(self), "views": self.views, "seed": self.seed, "dim": int(self.features.shape[2]),
            "tensors_sha256": sha, "items_sha256": storage.sha256_bytes(items),
        })

    @classmethod
    def load(cls, folder: str | Path) -> FeatureSet:
        folder = Path(folder)
        meta = storage.read_json(folder / "features.json", "feature cache")
        if meta.get("format") != FEATURES_FORMAT:
            raise ArtifactError(f"{folder} is not a geoswc feature cache (format {meta.get('format')!r})")
        t = storage.load_tensors(folder / "features.safetensors", "feature cache tensors", meta.get("tensors_sha256"))
        raw = (folder / "items.csv").read_bytes() if (folder / "items.csv").is_file() else b""
        if storage.sha256_bytes(raw) != meta.get("items_sha256"):
            raise ArtifactError(f"{folder / 'items.csv'} is missing, damaged or was changed; re-extract features")
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))[1:]
        feats = t["features"].float()
        if feats.ndim != 3 or feats.shape[0] != len(rows):
            raise ArtifactError(f"feature cache {folder} is inconsistent; re-extract features")
        return cls(feats, [r[0] for r in rows], [r[1] for r in rows],
                   np.array([float(r[2]) for r in rows]), np.array([float(r[3]) for r in rows]),
                   from_dict(BackboneConfig, meta["backbone"]), str(meta["backbone_fingerprint"]),
                   int(meta.get("seed", 0)))


@torch.inference_mode()
def extract_features(
    backbone: Backbone, backbone_cfg: BackboneConfig, records: Sequence[Record], views: int = 1,
    batch_size: int = 32, num_workers: int = 0, seed: int = 0, progress: bool = True,
    limits: ImageLimits = DEFAULT_LIMITS, fingerprint: str | None = None,
) -> tuple[FeatureSet, LoadReport]:
    """Run the backbone over photos. Undecodable photos are reported and left out, never fatal.

    Args:
        backbone, backbone_cfg: the extractor and its resolved config (preprocessing).
        records: photos with positions.
        views: 1 = the plain preprocessed image; more adds random augmented views (training).
        fingerprint: identity to record (default: the backbone config's fingerprint; a fine-tuned
            model passes its own).

    Returns:
        The features of the photos that decoded, and the report of those that did not.
    """
    if not records:
        raise InputError("no photos to extract features from")
    ds = ImageDataset([r.path for r in records], backbone_cfg.preprocess, views=views, seed=seed, limits=limits)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    report = LoadReport("feature extraction", total=len(records))
    device = next(backbone.parameters()).device
    backbone.eval()
    out = torch.zeros(len(records), views, backbone_cfg.feature_dim)
    ok = torch.zeros(len(records), dtype=torch.bool)
    with tqdm(total=len(records), desc="features", unit="img", disable=not progress) as bar:
        for idx, x, bad in dl:
            for i, err in bad:
                report.skip(records[i].image, str(err))
            if x is not None:
                b = x.shape[0]
                x = x.reshape(-1, *x.shape[-3:]).to(device)
                f = backbone(x).float().cpu().reshape(b, views, -1)
                out[idx] = f
                ok[idx] = True
            bar.update(len(idx) + len(bad))
    report.log()
    keep = torch.nonzero(ok).squeeze(1).numpy()
    if keep.size == 0:
        raise InputError(f"none of the {len(records)} photos could be decoded: {report.summary()}")
    recs = [records[i] for i in keep]
    fs = FeatureSet(out[torch.from_numpy(keep)], [r.image for r in recs], [r.author for r in recs],
                    np.array([r.lat for r in recs]), np.array([r.lon for r in recs]), backbone_cfg,
                    fingerprint or backbone_fingerprint(backbone_cfg), seed)
    return fs, report
