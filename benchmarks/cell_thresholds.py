"""How many adaptive cells a threshold gives, on the 100k MP-16 coordinates and on a 50k subsample of them with
the thresholds halved: the ratios behind the paper recipe's ``--cells.max_per_cell 350 --cells.min_per_cell 45``
for ~30k cells on all 4.72M MP-16 photos (docs/paper-recipe.md).

For each ``max/min`` pair (ratio 8): the cells ``geoswc cells`` keeps, the share of the points that fall in kept
cells, and a kept cell's mean number of points over ``max``. Two ratios that stay the same across thresholds and
sample sizes let the count be extrapolated: ``cells ~ kept * N / (mean_over_max * max)``.

Run:  python benchmarks/cell_thresholds.py --out benchmarks/results/cell_thresholds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from geoswc.core import atomic_files
from geoswc.core.config import CellConfig
from geoswc.data.records import read_coordinates
from geoswc.geo.cells import build_cells

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MP16_PHOTOS = 4_720_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--coords", type=Path, default=SHARED / "priors" / "mp16-coordinates-100k.csv")
    p.add_argument("--max", type=int, nargs="+", default=[32, 64, 128, 256], help="max_per_cell values (min: /8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the half-size subsample")
    return p.parse_args(argv)


def partition(lat: np.ndarray, lon: np.ndarray, max_per_cell: int) -> dict[str, float]:
    """Cells kept at ``max_per_cell`` (min: an eighth of it), the share of points in them, their mean over max."""
    t0 = time.perf_counter()
    cells = build_cells(lat, lon, CellConfig(max_per_cell=max_per_cell, min_per_cell=max(1, max_per_cell // 8)))
    count = np.asarray(cells.count, np.float64)
    return {
        "max_per_cell": max_per_cell,
        "min_per_cell": max(1, max_per_cell // 8),
        "cells": len(cells),
        "points_kept": float(count.sum() / len(lat)),
        "mean_over_max": float(count.mean() / max_per_cell) if len(count) else 0.0,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lat, lon, _ = read_coordinates(args.coords)
    half = np.random.default_rng(args.seed).choice(len(lat), len(lat) // 2, replace=False)
    rows = []
    for m in args.max:
        rows.append({"full": partition(lat, lon, m), "half": partition(lat[half], lon[half], max(1, m // 2))})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    kept = float(np.mean([r["full"]["points_kept"] for r in rows]))
    ratio = float(np.mean([r["full"]["mean_over_max"] for r in rows]))
    per_cell = kept / ratio  # cells ~ per_cell * N / max
    result = {
        "benchmark": "cell_thresholds",
        "sample": len(lat),
        "rows": rows,
        "cells_per_photo_over_max": per_cell,
        "mp16_photos": MP16_PHOTOS,
        "max_for_30k_cells_on_mp16": per_cell * MP16_PHOTOS / 30_000,
        "provenance": provenance(),
    }
    atomic_files.write_text(args.out, json.dumps(result, indent=2) + "\n")
    best = result["max_for_30k_cells_on_mp16"]
    print(f"cells ~ {per_cell:.2f} N / max: max_per_cell ~ {best:.0f} for 30k cells on MP-16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
