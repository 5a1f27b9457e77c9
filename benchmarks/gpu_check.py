"""GPU check of the paper-scale path: extraction and end-to-end fine-tuning on synthetic shards, one process and
then ``torchrun`` over every visible GPU, under mixed precision, in under 10 minutes on one modern GPU.

What it runs, all through the ``geoswc`` commands a user runs (subprocesses, so torchrun is the real launcher):

1. synthetic photos (random JPEGs at ``--size`` px whose colours follow their position, around 40 places, so
   that a model can learn something) packed into WebDataset shards, and a cell table of their positions;
2. ``geoswc features`` with ``--backbone`` (EfficientNet-B4 at 300 px by default, random weights: speed does not
   depend on them, and this machine may be offline) under ``--precision``;
3. ``geoswc train --train.finetune true`` on the shards: the heads, then ``--steps`` fine-tuning steps over
   ``--epochs`` epochs;
4. the same two commands under ``torchrun --nproc-per-node N`` (N = visible GPUs);
5. ``geoswc features`` with a randomly initialised CLIP ViT-L/14 image tower (needs ``transformers``).

It reports, in ``--out`` (JSON): images/s of extraction (wall clock of the command, start-up included) and of
fine-tuning (the fine-tuning epochs' own time, from the command's log), peak GPU memory (rank 0), whether the
fine-tuning loss fell from its first epoch to its last, and each command's wall time.

Run:  python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
Without a CUDA GPU it says so in one line and exits 0. ``--device cpu`` runs the same path on the CPU (the
smoke test does, on tiny inputs).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning_fabric
import numpy as np
import torch
from PIL import Image

from geoswc.core import atomic_files
from geoswc.data.records import Record
from geoswc.data.shards import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from provenance import provenance  # noqa: E402

EPOCH_LINE = re.compile(r"(\w+) epoch (\d+)/(\d+): loss (\S+) \((\d+) steps, ([\d.]+) s\)")
PEAK_LINE = re.compile(r"peak GPU memory ([\d.]+) GiB")
PLACES = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the smoke path, no GPU needed")
    p.add_argument("--photos", type=int, default=9600, help="synthetic photos (fine-tuning cycles through them)")
    p.add_argument("--size", type=int, default=300, help="side of the synthetic JPEGs, px")
    p.add_argument("--backbone", default="efficientnet-b4")
    p.add_argument("--image-size", type=int, default=300, help="the backbone's input size")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=128, help="extraction batch per process")
    p.add_argument("--train-batch", type=int, default=64, help="global fine-tuning batch (2 views of half as many)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps, in all")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs the steps are split into")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="decoding processes per rank")
    p.add_argument("--procs", type=int, default=0, help="torchrun processes (0: one per visible GPU; 2 on a CPU)")
    p.add_argument("--clip", default="clip-vit-l14", help="foundation backbone to time extraction of ('' to skip)")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    return p.parse_args(argv)


def _photo(job: tuple[Path, int, float, float, int]) -> None:
    """One synthetic JPEG: a colour that follows the position, a coarse random texture, a little noise."""
    path, seed, lat, lon, size = job
    rng = np.random.default_rng(seed)
    base = np.array([0.5 + 0.45 * math.sin(math.radians(lon)), 0.5 + 0.45 * lat / 90, 0.5 + 0.45 * math.cos(lon)])
    coarse = rng.uniform(-0.25, 0.25, (8, 8, 3))
    tex = np.asarray(Image.fromarray(((coarse + 0.5) * 255).astype(np.uint8)).resize((size, size)), np.float32)
    img = np.clip(base * 255 + (tex - 127.5) * 0.6 + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def make_data(work: Path, n: int, size: int, workers: int) -> tuple[Path, Path]:
    """``n`` synthetic photos around :data:`PLACES` places -> shards and a cell table; returns their paths."""
    rng = np.random.default_rng(0)
    centres = np.column_stack([rng.uniform(-60, 70, PLACES), rng.uniform(-180, 180, PLACES)])
    which = rng.integers(PLACES, size=n)
    lat = np.clip(centres[which, 0] + rng.normal(0, 0.5, n), -89, 89)
    lon = (centres[which, 1] + rng.normal(0, 0.5, n) + 180) % 360 - 180
    (work / "photos").mkdir(parents=True, exist_ok=True)
    jobs = [(work / "photos" / f"{i:06d}.jpg", i, float(lat[i]), float(lon[i]), size) for i in range(n)]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(_photo, jobs, chunksize=64))
    records = [Record(p.name, p, la, lo, f"a{i % 97}") for i, (p, _, la, lo, _) in enumerate(jobs)]
    per_shard = max(8, n // max(16, 4 * workers))
    write_shards(records, work / "shards", per_shard, verify=False, progress=False)
    with open(work / "coords.csv", "w", newline="") as f:
        csv.writer(f).writerows([("lat", "lon"), *zip(lat.tolist(), lon.tolist(), strict=True)])
    return work / "shards", work / "coords.csv"


def geoswc(args: list[str], procs: int = 0) -> tuple[float, str]:
    """Run ``geoswc ARGS`` (under ``torchrun --nproc-per-node procs`` when ``procs``); wall seconds and its log."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd = (launcher if procs else [sys.executable]) + ["-m", "geoswc", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return wall, done.stderr


def _peak_gib(log: str) -> float | None:
    found = PEAK_LINE.findall(log)
    return float(found[-1]) if found else None


def extract(a: argparse.Namespace, shards: Path, out: Path, backbone: str, size: int, procs: int = 0) -> dict:
    """``geoswc features`` over the shards; images/s of the whole command."""
    wall, log = geoswc(
        ["features", "--data.shards", str(shards), "--out", str(out), "--backbone.name", backbone]
        + ["--backbone.image_size", str(size), "--backbone.weights", "none", "--run.device", a.device]
        + ["--run.precision", a.precision, "--run.batch_size", str(a.batch_size), "--run.workers", str(a.workers)],
        procs,
    )
    return {
        "backbone": backbone,
        "image_size": size,
        "processes": max(1, procs),
        "images_per_s": round(a.photos / wall, 1),
        "wall_s": round(wall, 1),
        "peak_gpu_gib": _peak_gib(log),
    }


def finetune(a: argparse.Namespace, shards: Path, feats: Path, cells: Path, out: Path, procs: int = 0) -> dict:
    """``geoswc train --train.finetune true``; images/s and losses of the fine-tuning epochs."""
    per_epoch = math.ceil(a.steps / a.epochs)
    wall, log = geoswc(
        ["train", "--features", str(feats), "--cells", str(cells), "--out", str(out), "--data.shards", str(shards)]
        + ["--train.finetune", "true", "--train.epochs", "1", "--train.rrm_epochs", "1"]
        + ["--train.finetune_epochs", str(a.epochs), "--train.max_steps", str(per_epoch)]
        + ["--train.batch_size", str(a.train_batch), "--run.device", a.device, "--run.precision", a.precision]
        + ["--run.workers", str(a.workers)],
        procs,
    )
    epochs = [
        (float(loss), int(steps), float(s))
        for name, _, _, loss, steps, s in EPOCH_LINE.findall(log)
        if name == "finetune"
    ]
    if not epochs:
        raise RuntimeError(f"no fine-tuning epoch in the log of `geoswc train`:\n{log[-3000:]}")
    steps, seconds = sum(e[1] for e in epochs), sum(e[2] for e in epochs)
    images = steps * 2 * (a.train_batch // 2)
    return {
        "processes": max(1, procs),
        "steps": steps,
        "images_per_s": round(images / seconds, 1),
        "finetune_s": round(seconds, 1),
        "losses": [round(e[0], 4) for e in epochs],
        "loss_fell": epochs[-1][0] < epochs[0][0],
        "wall_s": round(wall, 1),
        "peak_gpu_gib": _peak_gib(log),
    }


def _attempt(what: str, fn, *args) -> dict:
    """``fn(*args)``, or the reason it failed (one check failing does not lose the others)."""
    try:
        return fn(*args)
    except (RuntimeError, OSError) as e:
        print(f"{what} failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return {"error": str(e)[-2000:]}


def check(a: argparse.Namespace, work: Path) -> dict:
    procs = a.procs or (torch.cuda.device_count() if a.device == "cuda" else 2)
    t0 = time.perf_counter()
    shards, coords = make_data(work, a.photos, a.size, a.workers)
    geoswc(
        ["cells", "--coords", str(coords), "--out", str(work / "cells.csv")]
        + ["--cells.max_per_cell", str(max(20, a.photos // 40)), "--cells.min_per_cell", "2"]
    )
    result: dict = {"data_s": round(time.perf_counter() - t0, 1)}
    for key, n in (("one_process", 0), ("torchrun", procs)):
        feats = work / f"features-{key}"
        result[key] = {"extract": _attempt(f"{key} extraction", extract, a, shards, feats, a.backbone, a.image_size, n)}
        if "error" not in result[key]["extract"]:
            cells = work / "cells.csv"
            result[key]["train"] = _attempt(f"{key} training", finetune, a, shards, feats, cells, work / f"m-{key}", n)
    if a.clip:
        result["clip_extract"] = _attempt("CLIP extraction", extract, a, shards, work / "features-clip", a.clip, 224)
    return result


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine, nothing measured (run it where `nvidia-smi` lists one)")
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = check(a, work)
    report = {
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "visible_gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "lightning_fabric": lightning_fabric.__version__,
        "settings": {k: str(v) for k, v in vars(a).items() if k not in ("out", "work")},
        **result,
        "total_s": round(time.perf_counter() - t0, 1),
        "provenance": provenance(),
    }
    atomic_files.write_text(a.out, json.dumps(report, indent=2) + "\n")
    for key in ("one_process", "torchrun"):
        ex, tr = report[key]["extract"], report[key].get("train", {})
        print(
            f"{key}: extraction {ex.get('images_per_s')} img/s, fine-tuning {tr.get('images_per_s')} img/s, "
            f"loss fell: {tr.get('loss_fell')}, peak {tr.get('peak_gpu_gib')} GiB"
        )
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
