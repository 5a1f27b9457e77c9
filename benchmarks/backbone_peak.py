"""Backbone throughput against this machine's matrix-multiply peak, for the torch and onnx runtimes.

The peak is the best GFLOP/s of a large float32 matmul (``torch.mm``) measured in the same run, with the same
thread count. The backbone is the embedded default model's (EfficientNet-Lite0, 224 px); its FLOPs per
image are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, 2 per
multiply-add; element-wise ops are not counted). Inputs are real photos from ../shared/data/im2gps3k-dev,
preprocessed once (decoding is not timed here; see locate_throughput.py). The runtimes are timed in
alternating rounds so both see the same background load.

Run:  python benchmarks/backbone_peak.py --out benchmarks/results/backbone_peak.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from geoswc.core import atomic_files
from geoswc.data.records import loader
from geoswc.data.shards import photo_dataset
from geoswc.models.geomodel import GeoModel
from geoswc.models.onnx_runtime import OnnxBackbone, default_cache_dir
from geoswc.prediction.geolocator import default_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="shorter timings (under 2 minutes)")
    p.add_argument("--model", type=Path, default=default_model_dir(), help="model folder (default: embedded)")
    p.add_argument("--images", type=Path, default=SHARED / "im2gps3k-dev" / "images")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and torch's default)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per runtime and batch size")
    p.add_argument("--cache", type=Path, default=None, help="ONNX export cache (default: ~/.cache/geoswc/onnx)")
    return p.parse_args(argv)


def matmul_peak(n: int, seconds: float) -> float:
    """Best GFLOP/s of ``(n, n) @ (n, n)`` float32 over repeated runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def count_gflops(backbone: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        backbone(x[:1])
    return fc.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    all_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, all_threads})
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    seconds = args.seconds or (2.0 if args.quick else 12.0)

    model = GeoModel.load(args.model)
    backbone, cfg = model.backbone, model.config.backbone
    assert backbone is not None
    photos = sorted(args.images.glob("*.jpg"))[: max(batch_sizes)]
    x_all = torch.cat([b.images for b in loader(photo_dataset(photos, cfg.preprocess), 16) if b.images is not None])
    gflops = count_gflops(backbone, x_all)
    cache = args.cache or default_cache_dir()
    t0 = time.perf_counter()
    onnx_path = OnnxBackbone.from_backbone(backbone, model.backbone_fingerprint, cfg.preprocess.image_size, cache).path
    export_s = time.perf_counter() - t0
    print(
        f"backbone {cfg.name} @ {cfg.preprocess.image_size}px: {gflops:.3f} GFLOP/image; onnx ready in {export_s:.1f}s",
        file=sys.stderr,
        flush=True,
    )

    rows = []
    peaks = {}
    for nt in threads:
        torch.set_num_threads(nt)
        peaks[nt] = matmul_peak(2048 if args.quick else 4096, 2.0 if args.quick else 8.0)
        runners = {"torch": backbone, "onnx": OnnxBackbone(onnx_path, cfg.feature_dim, threads=nt)}
        for bs in batch_sizes:
            x = x_all[:bs].contiguous()
            times: dict[str, list[float]] = {k: [] for k in runners}
            with torch.inference_mode():
                for fn in runners.values():
                    fn(x)  # warm-up
                t_end = time.perf_counter() + seconds * len(runners)
                while time.perf_counter() < t_end or min(len(v) for v in times.values()) < 3:
                    for name, fn in runners.items():  # alternate: both see the same background load
                        t0 = time.perf_counter()
                        fn(x)
                        times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                ips = bs * len(ts) / sum(ts)
                rows.append(
                    {
                        "runtime": name,
                        "threads": nt,
                        "batch_size": bs,
                        "images_per_s": ips,
                        "ms_per_image": 1000 / ips,
                        "median_ms_per_image": 1000 * float(np.median(ts)) / bs,
                        "achieved_gflops": ips * gflops,
                        "fraction_of_peak": ips * gflops / peaks[nt],
                        "batches": len(ts),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    torch.set_num_threads(all_threads)

    print(
        f"\nEfficientNet-Lite0 backbone, {gflops:.3f} GFLOP/image; matmul peak (float32) per thread count: "
        + ", ".join(f"{nt} thread(s) {p:.0f} GFLOP/s" for nt, p in peaks.items())
        + "\n"
    )
    print("| runtime | threads | batch | images/s | ms/image | GFLOP/s achieved | fraction of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['runtime']} | {r['threads']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
            f"{r['ms_per_image']:.1f} | {r['achieved_gflops']:.1f} | {100 * r['fraction_of_peak']:.1f} % |"
        )
    best = max(rows, key=lambda r: r["images_per_s"])
    top = best["threads"]
    speedups = {
        f"{nt}t_bs{bs}": next(
            r for r in rows if r["runtime"] == "onnx" and r["threads"] == nt and r["batch_size"] == bs
        )["images_per_s"]
        / next(r for r in rows if r["runtime"] == "torch" and r["threads"] == nt and r["batch_size"] == bs)[
            "images_per_s"
        ]
        for nt in threads
        for bs in batch_sizes
    }
    print("\nonnx / torch images/s: " + ", ".join(f"{k} {v:.1f}x" for k, v in speedups.items()))
    result = {
        "benchmark": "backbone_peak",
        "quick": args.quick,
        "backbone": cfg.name,
        "image_size": cfg.preprocess.image_size,
        "gflops_per_image": gflops,
        "machine_peak_gflops": peaks[top],
        "machine_peak_gflops_by_threads": {str(k): v for k, v in peaks.items()},
        "threads": top,
        "best_runtime": best["runtime"],
        "best_batch_size": best["batch_size"],
        "images_per_s": best["images_per_s"],
        "fraction_of_peak": best["fraction_of_peak"],
        "onnx_speedup_vs_torch": speedups,
        "runtimes": rows,
        "onnx_export_s": export_s,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "provenance": provenance(),
    }
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    atomic_files.write_text(args.out, json.dumps(result, indent=2) + "\n")  # atomic, creates the folder
    print(f"\n-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
