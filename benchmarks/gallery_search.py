"""Gallery search at scale: search within the chosen cell vs exhaustive flat search over the whole gallery.

Synthetic galleries of 100k, 1M and 4.7M entries (the size of MP-16) with the embedding width D of the default
model (1280, float16). Positions are MP-16 photo coordinates (../shared/data/priors, resampled with ~1 km
jitter), so the cell sizes follow where people take photos; the cells are the embedded default model's
adaptive S2 partition (``--cells`` for another). Embeddings are a mixture: a per-cell direction, a "landmark"
direction shared by ~50 photos, and noise; a query is a fresh photo of a random gallery photo's landmark, so
its cell is drawn in proportion to cell size, as real queries are.

Each gallery is built with the streaming :class:`geoswc.gallery_files.GalleryWriter` (chunks in random cell order,
compacted at the end), then opened memory-mapped. Measured per size:

- ``per_query_ms``: mean latency of ``Gallery.search(q, 10, rows=gallery.cell_rows(cell))``, the call
  ``Geolocator`` makes (single query, exact); ``flat_per_query_ms``: ``Gallery.search(q, 10)`` over all rows.
- ``recall_at_10``: the within-cell top-10 against a float32 brute force over the same cell (1.0 = exact).
- ``cell_share_of_global_top10``: how many of the whole gallery's top-10 lie in the query's cell
  (a property of the synthetic data, shown for context).
- ``bytes_per_entry``: the index folder's size on disk over N (memory-mapped at load, not read).
- ``build_s``: time in the streaming writer (chunks in, compaction, checksums), synthetic generation excluded.
- ``faiss``: FAISS (HNSW and IVF-SQfp16) on the largest cell, with recall@10 against the exact search.

Run:  python benchmarks/gallery_search.py --out benchmarks/results/gallery_search.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geoswc import storage
from geoswc.api import default_model_dir
from geoswc.cells import CellTable
from geoswc.gallery import Gallery, GalleryIdentity
from geoswc.gallery_files import GalleryWriter, load_gallery

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
K = 10
CHUNK = 1 << 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="small sizes and few queries (under 2 minutes)")
    p.add_argument("--sizes", default=None, help="comma-separated gallery sizes (default 100000,1000000,4700000)")
    p.add_argument("--queries", type=int, default=None, help="within-cell queries per size (default 300; quick 60)")
    p.add_argument("--cells", type=Path, default=default_model_dir() / "cells.csv", help="cell table CSV")
    p.add_argument("--coords", type=Path, default=SHARED / "priors" / "mp16-coordinates-100k.csv")
    p.add_argument("--dim", type=int, default=None, help="embedding width (default: the default model's)")
    p.add_argument("--workdir", type=Path, default=None, help="where to build the galleries (default: a temp dir)")
    p.add_argument("--no-faiss", action="store_true", help="skip the FAISS comparison")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def default_dim() -> int:
    cfg = json.loads((default_model_dir() / "config.json").read_text())["config"]
    return int(cfg["backbone"]["feature_dim"])  # the RRM keeps the backbone's width


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Synth:
    """The synthetic embedding model: cell direction + landmark direction + noise, unit norm."""

    def __init__(self, dim: int, num_cells: int, seed: int, landmarks: int = 20000) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.cell_dir = torch.nn.functional.normalize(torch.randn(num_cells + 1, dim, generator=g), dim=1)
        self.lm_dir = torch.nn.functional.normalize(torch.randn(landmarks, dim, generator=g), dim=1)
        self.g = g

    def make(self, cell: np.ndarray, lm: np.ndarray) -> torch.Tensor:
        noise = torch.nn.functional.normalize(torch.randn(len(cell), self.dim, generator=self.g), dim=1)
        c = torch.from_numpy(np.where(cell < 0, len(self.cell_dir) - 1, cell))
        x = 0.45 * self.cell_dir[c] + 0.6 * self.lm_dir[torch.from_numpy(lm % len(self.lm_dir))] + 0.66 * noise
        return torch.nn.functional.normalize(x, dim=1)


def build(folder: Path, n: int, synth: Synth, base_lat: np.ndarray, base_lon: np.ndarray, base_cell: np.ndarray,
          num_cells: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Write a synthetic gallery of n entries; returns the entries' (cell, landmark) and the time spent in the
    writer (adding chunks and compacting; generating the synthetic data is not counted)."""
    pick = rng.integers(0, len(base_lat), n)
    cell = base_cell[pick]
    lm = pick.astype(np.int64) * 2 + rng.integers(0, 2, n)  # two landmarks per MP-16 coordinate
    lat = np.clip(base_lat[pick] + rng.normal(0, 0.01, n), -90, 90)
    lon = (base_lon[pick] + rng.normal(0, 0.01, n) + 180) % 360 - 180
    write_s = 0.0
    with GalleryWriter(folder, synth.dim, GalleryIdentity("synthetic0000000", "synthetic0000000", num_cells)) as w:
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            emb = synth.make(cell[s:e], lm[s:e]).half().numpy()
            names, authors = [f"synthetic/{i:08d}.jpg" for i in range(s, e)], [f"user{i % 200003}" for i in range(s, e)]
            t0 = time.perf_counter()
            w.add(emb, lat[s:e], lon[s:e], cell[s:e], names, authors)
            write_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        w.finish()
        write_s += time.perf_counter() - t0
    return cell, lm, write_s


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def brute_top(g: Gallery, q: np.ndarray, start: int, stop: int, k: int = K) -> np.ndarray:
    best_s, best_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
    for s in range(start, stop, CHUNK):
        e = min(stop, s + CHUNK)
        sims = np.asarray(g.embeddings[s:e], np.float32) @ q
        best_s, best_i = np.concatenate([best_s, sims]), np.concatenate([best_i, np.arange(s, e)])
        keep = np.lexsort((best_i, -best_s))[:k]
        best_s, best_i = best_s[keep], best_i[keep]
    return best_i


def faiss_on_cell(g: Gallery, cell: int, queries: np.ndarray) -> dict | None:
    try:
        import faiss
    except ImportError:
        return None
    a, b = g.cell_range(cell)
    x = np.ascontiguousarray(g.embeddings[a:b], np.float32)
    exact = [g.search(q, K, rows=np.arange(a, b))[0] - a for q in queries]
    t0 = time.perf_counter()
    for q in queries:
        g.search(q, K, rows=np.arange(a, b))
    exact_ms = 1000 * (time.perf_counter() - t0) / len(queries)
    out: dict = {"cell_entries": int(b - a), "exact_per_query_ms": exact_ms, "indexes": []}
    n = b - a
    nlist = max(8, int(np.sqrt(n)))
    kinds = [("HNSW32,Flat efSearch=64", lambda: faiss.IndexHNSWFlat(g.dim, 32, faiss.METRIC_INNER_PRODUCT)),
             (f"IVF{nlist},SQfp16 nprobe=16", lambda: faiss.IndexIVFScalarQuantizer(
                 faiss.IndexFlatIP(g.dim), g.dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT))]
    for name, make in kinds:
        index = make()
        faiss.omp_set_num_threads(torch.get_num_threads())  # build on all threads
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(x)
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efConstruction = 40
        index.add(x)
        build_s = time.perf_counter() - t0
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = 64
        else:
            index.nprobe = 16
        faiss.omp_set_num_threads(1)  # one query at a time, like the exact search
        hits, t0 = 0, time.perf_counter()
        found = [index.search(q[None, :], K)[1][0] for q in queries]
        ms = 1000 * (time.perf_counter() - t0) / len(queries)
        for f, e in zip(found, exact, strict=True):
            hits += len(set(f.tolist()) & set(e.tolist()))
        out["indexes"].append({"index": name, "per_query_ms": ms, "recall_at_10": hits / (K * len(queries)),
                               "build_s": build_s, "bytes_per_entry": _faiss_bytes(faiss, index) / n})
        del index
    return out


def _faiss_bytes(faiss, index) -> int:
    with tempfile.NamedTemporaryFile() as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


def run_size(n: int, args: argparse.Namespace, work: Path, table: CellTable, base: tuple, synth: Synth) -> dict:
    rng = np.random.default_rng(args.seed + n)
    folder = work / f"gallery-{n}"
    print(f"[{n:,}] building ...", file=sys.stderr, flush=True)
    cell, lm, build_s = build(folder, n, synth, *base, len(table), rng)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    g = load_gallery(folder)
    load_ms = 1000 * (time.perf_counter() - t0)
    rss_load = rss_mb() - rss0
    t0 = time.perf_counter()
    g.verify()  # every block's checksum once (reads the file into the page cache, as searches would)
    verify_s = time.perf_counter() - t0

    nq = args.queries or (60 if args.quick else 300)
    inside = np.flatnonzero(cell >= 0)
    qi = rng.choice(inside, nq)
    queries = synth.make(cell[qi], lm[qi]).numpy()
    qcells = cell[qi]
    for q, c in zip(queries[:5], qcells[:5], strict=True):  # warm-up
        g.search(q, K, rows=g.cell_rows(int(c)))
    times, cand = [], []
    for q, c in zip(queries, qcells, strict=True):
        t0 = time.perf_counter()
        rows = g.cell_rows(int(c))
        g.search(q, K, rows=rows)
        times.append(time.perf_counter() - t0)
        cand.append(rows.size)
    times_ms = 1000 * np.array(times)

    nflat = 5 if args.quick else (20 if n <= 200_000 else 10 if n <= 2_000_000 else 5)
    flat_ms, share = [], []
    g.search(queries[0], K)  # warm-up
    for q, c in zip(queries[:nflat], qcells[:nflat], strict=True):
        t0 = time.perf_counter()
        top, _ = g.search(q, K)
        flat_ms.append(1000 * (time.perf_counter() - t0))
        share.append(float(np.mean(g.cell[top] == c)))

    nrec = min(nq, 10 if args.quick else 30)
    hits = 0
    for q, c in zip(queries[:nrec], qcells[:nrec], strict=True):
        a, b = g.cell_range(int(c))
        got = g.search(q, K, rows=g.cell_rows(int(c)))[0]
        hits += len(set(got.tolist()) & set(brute_top(g, q, a, b).tolist()))
    recall = hits / (K * nrec)

    faiss_res = None
    if not args.no_faiss:
        big = int(np.argmax(g.cell_sizes()))
        fq = rng.choice(np.flatnonzero(cell == big), 50 if args.quick else 200)
        print(f"[{n:,}] FAISS on the largest cell ({g.cell_sizes()[big]:,} entries) ...", file=sys.stderr, flush=True)
        faiss_res = faiss_on_cell(g, big, synth.make(cell[fq], lm[fq]).numpy())

    sizes = g.cell_sizes()
    res = {
        "entries": n,
        "dim": g.dim,
        "cells": len(table),
        "nonempty_cells": int((sizes > 0).sum()),
        "largest_cell": int(sizes.max()),
        "mean_candidates": float(np.mean(cand)),
        "per_query_ms": float(times_ms.mean()),
        "p50_ms": float(np.median(times_ms)),
        "p95_ms": float(np.percentile(times_ms, 95)),
        "flat_per_query_ms": float(np.mean(flat_ms)),
        "speedup_vs_flat": float(np.mean(flat_ms) / times_ms.mean()),
        "bytes_per_entry": dir_bytes(folder) / n,
        "embedding_bytes_per_entry": g.dim * 2,
        "recall_at_10": recall,
        "cell_share_of_global_top10": float(np.mean(share)),
        "queries": nq,
        "flat_queries": nflat,
        "build_s": build_s,
        "load_ms": load_ms,
        "rss_after_load_mb": rss_load,
        "verify_s": verify_s,
        "faiss": faiss_res,
    }
    del g
    shutil.rmtree(folder, ignore_errors=True)
    return res


def print_table(rows: list[dict]) -> None:
    print("| entries | cells (non-empty) | mean cell searched | within-cell ms/query (p50) | flat ms/query | "
          "speedup | bytes/entry | recall@10 | write s | load ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['entries']:,} | {r['cells']} ({r['nonempty_cells']}) | {r['mean_candidates']:,.0f} | "
              f"{r['per_query_ms']:.2f} ({r['p50_ms']:.2f}) | {r['flat_per_query_ms']:.1f} | "
              f"{r['speedup_vs_flat']:.0f}x | {r['bytes_per_entry']:.0f} | {r['recall_at_10']:.3f} | "
              f"{r['build_s']:.1f} | {r['load_ms']:.1f} |")
    fa = [(r["entries"], r["faiss"]) for r in rows if r.get("faiss")]
    if fa:
        print("\nFAISS on the largest cell vs exact within-cell search (recall@10 against exact):\n")
        print("| entries | cell entries | exact ms/query | index | ms/query | recall@10 | build s | bytes/entry |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|")
        for n, f in fa:
            for ix in f["indexes"]:
                print(f"| {n:,} | {f['cell_entries']:,} | {f['exact_per_query_ms']:.2f} | {ix['index']} | "
                      f"{ix['per_query_ms']:.2f} | {ix['recall_at_10']:.3f} | {ix['build_s']:.1f} | "
                      f"{ix['bytes_per_entry']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [20_000, 100_000] if args.quick else [100_000, 1_000_000, 4_700_000])
    dim = args.dim or default_dim()
    table = CellTable.load(args.cells)
    coords = np.loadtxt(args.coords, delimiter=",", skiprows=1)
    base = (coords[:, 0], coords[:, 1], table.assign(coords[:, 0], coords[:, 1]))
    synth = Synth(dim, len(table), args.seed)
    work = Path(tempfile.mkdtemp(prefix="geoswc-gallery-bench-", dir=args.workdir))
    rows = []
    try:
        for n in sizes:
            rows.append(run_size(n, args, work, table, base, synth))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "faiss"}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    result = {
        "benchmark": "gallery_search", "quick": args.quick, "k": K, "dim": dim, "cells_file": str(args.cells),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "sizes": rows,
    }
    storage.write_text(args.out, json.dumps(result, indent=2) + "\n")  # atomic, creates the folder
    print(f"\n-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
