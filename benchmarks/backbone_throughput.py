"""Feature-extraction cost of each backbone family on this machine: images per CPU-second and GFLOP per image.

Each backbone is built at its real architecture and input size with random weights (``weights: none``: speed does
not depend on the weights, and the foundation backbones' weights are not available offline), then timed on a few
batches of random images in eager PyTorch, fp32, on one thread (decoding and resizing are not timed; see
locate_throughput.py). Throughput is counted per CPU-second of the process (``time.process_time``) as well as per
wall-clock second: on a machine shared with other jobs the wall clock measures the load, the CPU time the backbone.
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` as in backbone_peak.py (convolutions and
matmuls, 2 per multiply-add). From these: the core-hours and PFLOP of one feature pass over MP-16 (4.72M photos).

Run:  python benchmarks/backbone_throughput.py --out benchmarks/results/backbone_throughput.json
It prints a Markdown table and writes it (``.md``) beside the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from geoswc.core import atomic_files
from geoswc.models.backbone import create_backbone, default_config
from geoswc.models.registry import get_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from backbone_peak import count_gflops  # noqa: E402
from provenance import provenance  # noqa: E402

MP16_PHOTOS = 4_723_695
DEFAULT = (
    "efficientnet-lite0,efficientnet-lite2,efficientnet-b4,dinov2-small,dinov2-base,clip-vit-b32,clip-vit-b16,"
    "siglip-base,clip-vit-l14"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--backbones", default=DEFAULT, help="comma-separated registry names")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=2, help="timed batches per backbone (after one warm-up batch)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args(argv)


def measure(name: str, batch_size: int, batches: int) -> dict:
    """One backbone's size, GFLOP per image and images/s."""
    spec = get_spec(name)
    cfg = dataclasses.replace(default_config(name), weights="none")
    backbone, cfg = create_backbone(cfg)
    size = cfg.preprocess.image_size
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    gflops = count_gflops(backbone, x)
    with torch.inference_mode():
        backbone(x)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            backbone(x)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = batch_size * batches
    per_core = n / cpu
    return {
        "backbone": name,
        "family": spec.family,
        "params_m": spec.params_m,
        "feature_dim": cfg.feature_dim,
        "image_size": size,
        "gflops_per_image": round(gflops, 4),
        "images_per_cpu_s": round(per_core, 3),
        "images_per_s": round(n / wall, 3),
        "cpu_ms_per_image": round(1000 / per_core, 1),
        "gflops_per_cpu_s": round(gflops * per_core, 1),
        "mp16_core_hours": round(MP16_PHOTOS / per_core / 3600),
        "mp16_pflop": round(MP16_PHOTOS * gflops / 1e6, 1),
    }


def markdown_table(result: dict) -> str:
    lines = [
        f"Eager PyTorch fp32 on this CPU ({result['threads']} thread, batch {result['batch_size']}, random "
        "weights); throughput per CPU-second; one feature pass over MP-16's 4.72M photos",
        "",
        "| backbone | params | dim | px | GFLOP/img | img per CPU-s | GFLOP per CPU-s | MP-16 pass, "
        "core-hours | MP-16 pass, PFLOP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["backbones"]:
        lines.append(
            f"| {r['backbone']} | {r['params_m']:.1f}M | {r['feature_dim']} | {r['image_size']} | "
            f"{r['gflops_per_image']:.1f} | {r['images_per_cpu_s']:.2f} | {r['gflops_per_cpu_s']:.0f} | "
            f"{r['mp16_core_hours']:,} | {r['mp16_pflop']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.backbones.split(","):
        rows.append(measure(name.strip(), args.batch_size, args.batches))
        print(
            f"{name}: {rows[-1]['images_per_cpu_s']} img per CPU-s, {rows[-1]['gflops_per_image']} GFLOP/img",
            file=sys.stderr,
        )
    result = {
        "benchmark": "backbone_throughput",
        "batch_size": args.batch_size,
        "batches": args.batches,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "backbones": rows,
        "command": shlex.join(["python", "benchmarks/backbone_throughput.py", *argv]),
        "provenance": provenance(shlex.join(["python", "benchmarks/backbone_throughput.py", *argv])),
    }
    table = markdown_table(result)
    print(table)
    atomic_files.write_report(args.out, result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
