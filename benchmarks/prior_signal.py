"""How often the embedded model's estimate is no better than its prior, and how right it is when it is and when
it is not, on the development photos (the photos it was trained on: its gallery holds them, and each photo's own
gallery entry is excluded from its search, as the leakage guard does).

Every photo is located by ``Geolocator.predict_features`` (``swc``), which says for each whether the estimate is
prior-like (:class:`geoswc.prediction.swc.PriorRule`: the photo moved the cell probabilities little from the
gallery's share of photos per cell, and no cluster of gallery photos agrees on a place). The script reports the
share called prior-like, accuracy within 1/25/750 km of each group, and the same for the Venice photos (within 5 km
of Piazza San Marco), whose gallery neighbours agree. Figures from the development photographers may not
transfer to other collections.

Run:  python benchmarks/prior_signal.py --out benchmarks/results/prior_signal.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from geoswc import Geolocator
from geoswc.core import atomic_files
from geoswc.core.sphere import haversine_km

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "im2gps3k-dev"
VENICE = (45.4341, 12.3388)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--csv", type=Path, default=DEV / "im2gps3k-dev.csv")
    p.add_argument("--images", type=Path, default=DEV / "images")
    p.add_argument("--step", type=int, default=1, help="every step-th photo (1: all)")
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args(argv)


def group(err: np.ndarray, mask: np.ndarray) -> dict:
    n = int(mask.sum())
    return {
        "photos": n,
        **{f"within_{t}_km": round(float((err[mask] < t).mean()), 4) if n else None for t in (1, 25, 750)},
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with open(a.csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:: a.step]
    geo = Geolocator.load()
    feats, kept = [], []
    names = [r["image"] for r in rows]
    for b, f in geo.iter_features([a.images / n for n in names], a.batch_size, names=names, progress=True):
        if f is not None:
            feats.append(f)
            kept += b.keys.tolist()
    preds = geo.predict_features(torch.cat(feats), "swc", names=[names[i] for i in kept])
    lat, lon = (np.array([float(rows[i][k]) for i in kept]) for k in ("lat", "lon"))
    err = haversine_km(lat, lon, np.array([p.lat for p in preds]), np.array([p.lon for p in preds]))
    prior = np.array([bool(p.prior_like) for p in preds])
    venice = haversine_km(lat, lon, *VENICE) < 5
    result = {
        "photos": len(preds),
        "prior_like_share": round(float(prior.mean()), 4),
        "prior_like": group(err, prior),
        "informed": group(err, ~prior),
        "venice": {**group(err, venice), "prior_like_share": round(float(prior[venice].mean()), 4)},
        "others": {**group(err, ~venice), "prior_like_share": round(float(prior[~venice].mean()), 4)},
        "searched_cells": len({p.cell for p in preds}),
        "prior_kl_nats_median": round(float(np.median([p.prior_kl for p in preds])), 4),
        "provenance": provenance(),
    }
    atomic_files.write_text(a.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
