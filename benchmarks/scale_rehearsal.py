"""Scale rehearsal: each step of the pipeline at growing numbers of photos, with its wall time and peak memory,
so that a step whose memory grows faster than the photos shows before MP-16 (4.72M photos) does.

Inputs are synthetic but shaped like MP-16: positions resampled from the 100k MP-16 coordinates in
../shared/data/priors (jittered by about a kilometre), authors clustered in space (a few per ~20 km square),
and random float16 features of the backbone's width (EfficientNet-Lite0: 1280), written by the library's own
feature-cache writer. Cells use the paper recipe's thresholds (350 / 45 at 4.72M) scaled to the photos, so every
size gets a table of roughly MP-16's ~30k cells. Each step runs in its own process through the library
function the command runs (``workflow.cells``, ``FeatureWriter``, ``workflow.train`` with ``max_steps`` steps per
phase, ``workflow.index`` with the MP-16 recipe's ``pq`` codes, ``Geolocator.predict_features``), sampled every
50 ms for its resident memory (``peak_rss_mb``, file-backed pages of memory-mapped caches included) and its
anonymous memory (``anon_peak_mb``, what the step itself allocated).

Run:  python benchmarks/scale_rehearsal.py --sizes 100000,1000000 --out benchmarks/results/scale_rehearsal.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
STEPS = ("cells", "features", "train", "index", "locate")
MP16 = 4_723_695


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="photo counts, comma-separated")
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--coords", type=Path, default=SHARED / "priors" / "mp16-coordinates-100k.csv")
    p.add_argument("--dim", type=int, default=1280, help="feature width (EfficientNet-Lite0: 1280)")
    p.add_argument("--steps", type=int, default=20, help="optimisation steps per training phase")
    p.add_argument("--queries", type=int, default=200, help="photos located in the locate step")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--step", choices=("inputs", *STEPS), help=argparse.SUPPRESS)  # internal: one step, this process
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- measuring a step -----------------------------------------------------------------------------------------


class Peaks:
    """Samples this process's VmRSS and RssAnon from /proc every 50 ms; keeps the peaks (MiB)."""

    def __init__(self) -> None:
        self.rss = self.anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                mb = int(value.split()[0]) / 1024
                if key == "VmRSS":
                    self.rss = max(self.rss, mb)
                else:
                    self.anon = max(self.anon, mb)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.05)

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_step(step: str, n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One step in a fresh process: ``{"wall_s", "peak_rss_mb", "anon_peak_mb", ...}``."""
    cmd = [
        sys.executable,
        __file__,
        "--step",
        step,
        "--n",
        str(n),
        "--work",
        str(work),
        "--dim",
        str(args.dim),
        "--steps",
        str(args.steps),
        "--queries",
        str(args.queries),
        "--coords",
        str(args.coords),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} at {n} photos failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the steps (each in its own process) ------------------------------------------------------------------------


def synthetic_photos(n: int, coords: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` positions resampled from real MP-16 ones (jittered ~1 km) and authors clustered in space: a few
    per ~20 km square, as numbers ``(n,)`` (:func:`author_names` spells a slice of them)."""
    from geoswc.data.records import read_coordinates

    rng = np.random.default_rng(n)
    lat, lon, _ = read_coordinates(coords)
    pick = rng.integers(len(lat), size=n)
    lat = np.clip(lat[pick] + rng.normal(0, 0.01, n), -90, 90)
    lon = (lon[pick] + rng.normal(0, 0.01, n) + 180) % 360 - 180
    square = np.floor(lat / 0.2).astype(np.int64) * 2000 + np.floor(lon / 0.2).astype(np.int64)
    return lat, lon, square * 4 + rng.integers(4, size=n)


def author_names(codes: np.ndarray) -> list[str]:
    return [f"u{c}" for c in codes.tolist()]


def step_cells(n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from geoswc import workflow
    from geoswc.core.config import CellConfig

    thresholds = CellConfig(max_per_cell=max(4, round(350 * n / MP16)), min_per_cell=max(1, round(45 * n / MP16)))
    table = workflow.cells(work / "coords.csv", work / "cells.csv", thresholds)
    return {"cells": len(table)}


def step_features(n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from geoswc.core.config import to_dict
    from geoswc.models.backbone import default_config
    from geoswc.models.registry import backbone_fingerprint
    from geoswc.training.feature_files import CacheInfo, FeatureWriter

    lat, lon, authors = synthetic_photos(n, args.coords)
    config = dataclasses.replace(default_config("efficientnet-lite0"), feature_dim=args.dim)
    rng = np.random.default_rng(1)
    with FeatureWriter(work / "features", 1, args.dim) as w:
        for s in range(0, n, 1024):
            e = min(n, s + 1024)
            w.add(
                np.arange(s, e),
                rng.standard_normal((e - s, 1, args.dim), np.float32).astype(np.float16),
                [f"p{i}.jpg" for i in range(s, e)],
                author_names(authors[s:e]),
                lat[s:e],
                lon[s:e],
            )
        w.finish(CacheInfo(to_dict(config), backbone_fingerprint(config), 1, args.dim, 0), progress=False)
    return {"cache_mb": round((work / "features" / "features.safetensors").stat().st_size / 2**20)}


def step_train(n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from geoswc import workflow
    from geoswc.core.config import TrainConfig

    workflow.train(
        work / "features",
        work / "cells.csv",
        work / "model",
        TrainConfig(epochs=1, rrm_epochs=1, max_steps=args.steps, batch_size=128),
    )
    return {"steps_per_phase": args.steps}


def step_index(n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from geoswc import workflow
    from geoswc.core.config import GalleryCodes

    codes = GalleryCodes(kind="pq", pq_bytes=math.gcd(args.dim, 128))  # the MP-16 recipe's codes (128 B at 1280-d)
    gallery = workflow.index(work / "model", work / "index", features=work / "features", codes=codes)
    return {"gallery": len(gallery)}


def step_locate(n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from geoswc.core import tensor_files
    from geoswc.prediction.geolocator import Geolocator

    geo = Geolocator.load(work / "model", work / "index", with_backbone=False, search={"select_km": 2000.0})
    rows = np.sort(np.random.default_rng(2).integers(n, size=args.queries))  # queries: rows of the cache, mapped
    feats = tensor_files.map_tensor(work / "features" / "features.safetensors", "features", "the rehearsal's features")
    queries = feats[torch.from_numpy(rows), 0].float()
    start = time.perf_counter()
    geo.predict_features(queries, "swc")
    return {"ms_per_photo": round(1000 * (time.perf_counter() - start) / len(rows), 2)}


def one_step(args: argparse.Namespace) -> int:
    """Internal: run ``--step`` at ``--n`` photos in this process and print its measurement as JSON."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    if args.step == "inputs":  # the cells step's input, written by a process of its own: not measured
        lat, lon, _ = synthetic_photos(args.n, args.coords)
        with open(work / "coords.csv", "w") as f:
            f.write("lat,lon\n" + "".join(f"{a!r},{b!r}\n" for a, b in zip(lat.tolist(), lon.tolist(), strict=True)))
        print(json.dumps({}))
        return 0
    fn = {
        "cells": step_cells,
        "features": step_features,
        "train": step_train,
        "index": step_index,
        "locate": step_locate,
    }[args.step]
    start = time.perf_counter()
    with Peaks() as peaks:
        extra = fn(args.n, work, args)
    print(
        json.dumps(
            {
                "wall_s": round(time.perf_counter() - start, 2),
                "peak_rss_mb": round(peaks.rss),
                "anon_peak_mb": round(peaks.anon),
                **extra,
            }
        )
    )
    return 0


# -- the rehearsal --------------------------------------------------------------------------------------------


def growth(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step: the exponent of anonymous peak memory against photos between the smallest and largest size,
    and that memory extrapolated to MP-16's 4.72M photos."""
    if len(sizes) < 2:
        return {}
    a, b = sizes[0], sizes[-1]
    out = {}
    for step in STEPS:
        ma, mb = a["steps"][step]["anon_peak_mb"], b["steps"][step]["anon_peak_mb"]
        k = math.log(max(mb, 1) / max(ma, 1)) / math.log(b["n"] / a["n"])
        out[step] = {
            "anon_exponent": round(k, 2),
            "anon_ratio": round(mb / max(ma, 1), 2),
            "anon_mb_at_4_72M": round(mb * (MP16 / b["n"]) ** k),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        return one_step(args)
    if args.out is None:
        raise SystemExit("--out is required")
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        work = Path(tempfile.mkdtemp(prefix=f"rehearsal-{n}-", dir=args.work))
        try:
            steps: dict[str, Any] = {}
            run_step("inputs", n, work, args)
            for step in STEPS:
                steps[step] = run_step(step, n, work, args)
                print(f"{n:>9} {step:<9} {json.dumps(steps[step])}", flush=True)
            results.append({"n": n, "steps": steps})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    command = " ".join(["python", "benchmarks/scale_rehearsal.py", *sys.argv[1:]])
    report = {
        "dim": args.dim,
        "steps_per_phase": args.steps,
        "cpu_count": os.cpu_count(),
        "sizes": results,
        "growth": growth(results),
        "command": command,
        "provenance": provenance(command),
    }
    from geoswc.core import atomic_files

    atomic_files.write_json(args.out, report)
    print(json.dumps(report["growth"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
