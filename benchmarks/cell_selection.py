"""Per-photo cost of the cell steps of a prediction at MP-16's scale: choosing the cell (``select_km``), its
prediction density (``r_km``) and the cells searched (``search_km``), with no cells x cells structure.

Cell centroids: ``--cells`` positions drawn from the 100k MP-16 coordinates in ../shared/data/priors (each
jittered by a few km, as adaptive cells' centroids sit where the photos are). Probability vectors: a softmax of
Gaussian logits (spread, as a weak classifier's are) and of a few peaked ones, half each. Memory is the
tracemalloc peak of the steps (NumPy's arrays are traced), time the median per photo.

Run:  python benchmarks/cell_selection.py --out benchmarks/results/cell_selection.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from geoswc.core import atomic_files
from geoswc.core.sphere import latlon_to_xyz
from geoswc.data.records import read_coordinates
from geoswc.prediction.swc import SELECT_CANDIDATES, cells_within, prediction_density, select_cell

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--coords", type=Path, default=SHARED / "priors" / "mp16-coordinates-100k.csv")
    p.add_argument("--cells", type=int, default=30_000)
    p.add_argument("--photos", type=int, default=200)
    p.add_argument("--select-km", type=float, default=2000.0)
    p.add_argument("--r-km", type=float, default=25.0)
    p.add_argument("--search-km", type=float, default=200.0)
    p.add_argument(
        "--exact-photos",
        type=int,
        default=20,
        help="photos whose choice is compared with the exact one (every cell's mass: slow)",
    )
    return p.parse_args(argv)


def probability_vectors(n: int, cells: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for i in range(n):
        logits = rng.normal(0, 1.5 if i % 2 == 0 else 4.0, cells)
        p = np.exp(logits - logits.max())
        out.append(p / p.sum())
    return out


def exact_masses(p: np.ndarray, xyz: np.ndarray, r_km: float) -> np.ndarray:
    """Every cell's probability mass within ``r_km``, the slow way (the table in chunks of rows)."""
    cos_r = np.cos(min(r_km / 6371.0088, np.pi))
    return np.concatenate([(xyz[s : s + 1000] @ xyz.T >= cos_r) @ p for s in range(0, len(p), 1000)])


def compare_with_exact(probs: list[np.ndarray], xyz: np.ndarray, r_km: float) -> dict[str, float]:
    """How the choice among the most probable cells compares with the argmax of every cell's mass."""
    same, ratio, outside = [], [], []
    for p in probs:
        mass = exact_masses(p, xyz, r_km)
        chosen = select_cell(p, xyz, r_km)
        same.append(mass[chosen] >= mass.max() - 1e-12)
        ratio.append(mass[chosen] / mass.max())
        outside.append(1.0 - np.sort(p)[-SELECT_CANDIDATES:].sum())
    return {
        "exact_photos": len(probs),
        "same_mass_as_exact_share": round(float(np.mean(same)), 3),
        "chosen_mass_over_exact_min": round(float(np.min(ratio)), 4),
        "mass_outside_candidates_median": round(float(np.median(outside)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    lat, lon, _ = read_coordinates(args.coords)
    pick = rng.choice(len(lat), size=args.cells, replace=len(lat) < args.cells)
    jitter_deg = rng.normal(0, 0.05, (args.cells, 2))
    xyz = latlon_to_xyz(np.clip(lat[pick] + jitter_deg[:, 0], -90, 90), lon[pick] + jitter_deg[:, 1])
    probs = probability_vectors(args.photos, args.cells, rng)
    times, sizes = [], []
    tracemalloc.start()
    for p in probs:
        t0 = time.perf_counter()
        chosen = select_cell(p, xyz, args.select_km)
        prediction_density(p, xyz, chosen, args.r_km)
        sizes.append(len(cells_within(xyz, chosen, args.search_km)))
        times.append(time.perf_counter() - t0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result = {
        "cells": args.cells,
        "photos": args.photos,
        "select_km": args.select_km,
        "r_km": args.r_km,
        "search_km": args.search_km,
        "select_candidates": SELECT_CANDIDATES,
        "ms_per_photo_median": round(1000 * float(np.median(times)), 3),
        "ms_per_photo_p95": round(1000 * float(np.percentile(times, 95)), 3),
        "traced_peak_mb": round(peak / 2**20, 1),
        "cells_searched_median": int(np.median(sizes)),
        **compare_with_exact(probs[: args.exact_photos], xyz, args.select_km),
        "provenance": provenance(),
    }
    atomic_files.write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
