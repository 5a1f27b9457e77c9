"""Gallery search at MP-16 scale: FAISS codes (flat, sq8, pq, opq) searched within the chosen cell, on ~30k cells.

Synthetic galleries of 100k, 1M and 4.7M entries (the size of MP-16) with the embedding width D of the default
model (1280). Positions are resampled from the MP-16 coordinates in ../shared/data/priors (jittered ~1 km, as
in ``scale_rehearsal.py``), and the cells are an adaptive S2 table built from them with the paper recipe's
thresholds scaled to the size (350 / 45 at 4.72M photos: ~30k cells at every size), so cell sizes follow where
people take photos. Each entry is a mixture: its cell's direction, a "landmark" direction shared by ~50 photos,
and noise. Two embedding distributions are measured side by side:

- ``synthetic``: the three parts are isotropic Gaussian directions;
- ``realistic``: the three parts are drawn from the embedded default model's real gallery embeddings (2,245
  photos): their mean plus a Gaussian in their top principal components (their spectrum), so the vectors share
  a mean direction and have few dominant dimensions, as trained embeddings do.

A query is a fresh photo of a random gallery photo's landmark, so its cell is drawn in proportion to cell size,
as real queries are. Each gallery is written by :class:`geoswc.gallery.files.GalleryWriter` (training the
quantiser on a sample, coding the rows as they are compacted), then opened with ``load_gallery`` as a service
would. Measured per size, distribution and codes:

- ``per_query_ms`` (mean, p50, p95): ``Gallery.search(q, 10, cells=[cell])``, the call ``Geolocator`` makes;
  each query is one FAISS preassigned-list search plus the exact re-ranking of the short list from disk (wall
  time: on a busy machine it includes waiting for a core and for the disk); ``cpu_ms_per_query``: its CPU time.
  These are *cold*: the index's files are dropped from the page cache before the measuring process opens them
  (``posix_fadvise``, where the system has it), so every query reads its cell's vectors from the disk and checks
  their digests, as a service that has just started does;
- ``warm_ms_per_query``, ``warm_cpu_ms_per_query``: the same queries again in the same process (pages cached,
  rows checked), as a running service meets a cell it has searched before;
- ``recall_at_10``: against the exact float32 top-10 over the same cell's stored vectors (1.0 = exact);
- ``resident_bytes_per_entry``: the growth of the process's resident memory (anonymous + file-backed pages) from
  before loading the index to after the queries, over N; ``anon_bytes_per_entry``: the anonymous part;
- ``disk_bytes_per_entry``, ``build_s`` (writer time, synthetic generation excluded), ``load_s``;
- ``disk_bound_s``: this disk's floor for the build, measured in the same run beside it: reading the staged
  embeddings' bytes once (a file just written, as the writer's staging file is) and writing as many bytes plus the
  codes to a file, fsync'd; ``build_over_disk``: ``build_s / disk_bound_s``.

Run:  python benchmarks/gallery_search.py --out benchmarks/results/gallery_search.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geoswc import workflow
from geoswc.core import atomic_files
from geoswc.core.config import CellConfig, GalleryCodes
from geoswc.core.threads import auto_threads, set_threads
from geoswc.gallery.files import GalleryWriter, load_gallery
from geoswc.gallery.search import Gallery, GalleryIdentity
from geoswc.prediction.geolocator import default_model_dir
from provenance import provenance  # noqa: E402 - benchmarks/provenance.py
from scale_rehearsal import MP16, synthetic_photos  # noqa: E402 - a sibling script (benchmarks/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
K = 10
CHUNK = 1 << 16
COPY_BYTES = 64 << 20
LANDMARK_PHOTOS = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="one small size, few queries (about a minute)")
    p.add_argument("--sizes", default=None, help="comma-separated gallery sizes (default 100000,1000000,4700000)")
    p.add_argument("--codes", default="flat,pq", help="kinds of codes to measure, comma-separated")
    p.add_argument(
        "--flat-max",
        type=int,
        default=1_000_000,
        help="largest size measured with flat codes (flat holds 2 bytes a dimension in memory)",
    )
    p.add_argument("--pq-bytes", type=int, default=128, help="bytes of a pq/opq code")
    p.add_argument("--rerank", type=int, default=100, help="candidates re-scored exactly")
    p.add_argument("--distributions", default="synthetic,realistic")
    p.add_argument("--queries", type=int, default=None, help="within-cell queries per gallery (default 300)")
    p.add_argument("--coords", type=Path, default=SHARED / "priors" / "mp16-coordinates-100k.csv")
    p.add_argument("--dim", type=int, default=None, help="embedding width (default: the default model's)")
    p.add_argument("--workdir", type=Path, default=None, help="where to build the galleries (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="compute threads of the build, as --run.threads (default 0: geoswc's automatic count for an index built "
        "from cached features; 1 is faster on a busy machine)",
    )
    p.add_argument(
        "--query-threads",
        type=int,
        default=0,
        help="compute threads of the query measurement (default 0: the automatic count of a locating command, as "
        "a service searches)",
    )
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: measure one index, print JSON
    p.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def default_dim() -> int:
    cfg = json.loads((default_model_dir() / "config.json").read_text())["config"]
    return int(cfg["backbone"]["feature_dim"])  # the RRM keeps the backbone's width


def memory_mb() -> tuple[float, float]:
    """This process's ``(VmRSS, RssAnon)`` in MiB."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            got[key] = int(value.split()[0]) / 1024
    return got["VmRSS"], got["RssAnon"]


class Synth:
    """The embedding model: cell direction + landmark direction + noise, unit norm.

    Args:
        basis: ``(mean (D,), components (r, D))`` with the components scaled by their standard deviations: the
            parts are drawn in that space (``realistic``); None draws them isotropically (``synthetic``).
    """

    def __init__(
        self,
        dim: int,
        num_cells: int,
        seed: int,
        landmarks: int,
        basis: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.dim, self.basis = dim, basis
        self.cell_dir = self._draw(num_cells + 1)
        self.lm_dir = self._draw(landmarks)

    def _draw(self, n: int) -> torch.Tensor:
        if self.basis is None:
            return torch.nn.functional.normalize(torch.randn(n, self.dim, generator=self.g), dim=1)
        _, comps = self.basis
        x = torch.randn(n, comps.shape[0], generator=self.g) @ comps
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def make(self, cell: np.ndarray, lm: np.ndarray) -> torch.Tensor:
        c = torch.from_numpy(np.where(cell < 0, len(self.cell_dir) - 1, cell))
        x = (
            0.45 * self.cell_dir[c]
            + 0.6 * self.lm_dir[torch.from_numpy(lm % len(self.lm_dir))]
            + 0.66 * self._draw(len(cell))
        )
        if self.basis is not None:
            x = x + self.basis[0]
        return torch.nn.functional.normalize(x, dim=1)


def real_basis(rank: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scaled principal components of the default model's real gallery embeddings."""
    emb = torch.from_numpy(np.asarray(load_gallery(default_model_dir() / "index").embeddings, np.float32))
    mean = emb.mean(0)
    _, s, v = torch.linalg.svd(emb - mean, full_matrices=False)
    r = min(rank, len(s))
    comps = v[:r] * (s[:r, None] / np.sqrt(len(emb) - 1))
    scale = float(comps.pow(2).sum().sqrt())  # the parts' typical norm: make them unit-sized, like the mean's
    return mean / scale, comps / scale


def cell_table(n: int, work: Path, coords: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Positions of ``n`` photos, and their cells in an adaptive S2 table of ~30k cells built from them."""
    lat, lon, _ = synthetic_photos(n, coords)
    path = work / "coords.csv"
    with open(path, "w") as f:
        f.write("lat,lon\n")
        for s in range(0, n, CHUNK):
            np.savetxt(f, np.column_stack([lat[s : s + CHUNK], lon[s : s + CHUNK]]), fmt="%.6f", delimiter=",")
    thresholds = CellConfig(max_per_cell=max(4, round(350 * n / MP16)), min_per_cell=max(1, round(45 * n / MP16)))
    table = workflow.cells(path, work / "cells.csv", thresholds)
    return lat, lon, table.assign(lat, lon), len(table)


def build(folder: Path, synth: Synth, photos: tuple, num_cells: int, codes: GalleryCodes, seed: int) -> float:
    """Write the gallery; returns the seconds spent in the writer (synthetic generation excluded)."""
    lat, lon, cell = photos
    n = len(lat)
    lm = np.random.default_rng(seed).integers(0, max(1, n // LANDMARK_PHOTOS), n)
    write_s = 0.0
    with GalleryWriter(
        folder, synth.dim, GalleryIdentity("synthetic0000000", "synthetic0000000", num_cells), codes
    ) as w:
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
    return write_s


def disk_bound(work: Path, n: int, dim: int, code_bytes: int) -> float:
    """Seconds to read ``n`` float16 embedding rows' bytes once from a file just written (as the writer's staging
    file is) and write as many bytes plus ``n`` codes of ``code_bytes`` to another, fsync'd: what any build of the
    index must spend on this disk."""
    src, dst = work / "disk-bound-staged.bin", work / "disk-bound-out.bin"
    nbytes = n * dim * 2
    block = np.random.default_rng(0).integers(0, 256, COPY_BYTES, np.uint8).tobytes()  # incompressible
    with open(src, "wb") as f:
        for s in range(0, nbytes, COPY_BYTES):
            f.write(block[: min(COPY_BYTES, nbytes - s)])
    buf = bytearray(COPY_BYTES)
    try:
        t0 = time.perf_counter()
        with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
            while k := f.readinto(buf):
                g.write(memoryview(buf)[:k])
            for s in range(0, n * code_bytes, COPY_BYTES):
                g.write(block[: min(COPY_BYTES, n * code_bytes - s)])
            os.fsync(g.fileno())
        return time.perf_counter() - t0
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def exact_top(g: Gallery, q: np.ndarray, cell: int) -> np.ndarray:
    """The exact float32 top-k over the cell's stored vectors (ties by row)."""
    rows = g.cell_rows(cell)
    sims = np.asarray(g.embeddings[rows], np.float32) @ q
    return rows[np.lexsort((rows, -sims))[:K]]


def queries_for(synth: Synth, photos: tuple, nq: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``nq`` fresh photos of random gallery photos' landmarks, and their cells."""
    lat, _, cell = photos
    rng = np.random.default_rng(seed + 1)
    qi = rng.choice(np.flatnonzero(cell >= 0), nq)
    lm = np.random.default_rng(seed).integers(0, max(1, len(lat) // LANDMARK_PHOTOS), len(lat))[qi]
    return synth.make(cell[qi], lm).numpy(), cell[qi]


def measure(folder: Path, queries: Path) -> dict:
    """Open the index and time within-cell queries, in this (fresh) process; then recall against the exact
    search (after the memory reading: the exact search maps the cells' vectors)."""
    data = np.load(queries)
    qs, qcells = data["queries"], data["cells"]
    import faiss  # noqa: F401 - loaded before the first reading: the index's memory, not the library's

    cold = drop_from_page_cache(folder)
    rss0, anon0 = memory_mb()
    t0 = time.perf_counter()
    g = load_gallery(folder)
    load_s = time.perf_counter() - t0
    for q, c in zip(qs[:5], qcells[:5], strict=True):  # warm-up
        g.search(q, K, cells=[int(c)])
    times, found = [], []
    c0 = time.process_time()
    for q, c in zip(qs, qcells, strict=True):
        t0 = time.perf_counter()
        found.append(g.search(q, K, cells=[int(c)])[0])
        times.append(1000 * (time.perf_counter() - t0))
    cpu_ms = 1000 * (time.process_time() - c0) / len(qs)  # CPU time: what a busy machine's other jobs do not inflate
    rss1, anon1 = memory_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    for q, c in zip(qs, qcells, strict=True):
        g.search(q, K, cells=[int(c)])
    warm_ms, warm_cpu_ms = (1000 * (time.perf_counter() - t0) / len(qs), 1000 * (time.process_time() - c0) / len(qs))
    truth = [exact_top(g, q, int(c)) for q, c in zip(qs, qcells, strict=True)]
    hits = sum(int(np.isin(f, t).sum()) for f, t in zip(found, truth, strict=True))
    ms, sizes, n = np.array(times), g.cell_sizes(), len(g)
    return {
        "codes": g.codes,
        "code_bytes": int(g.lists.ivf.code_size),
        "rerank": g.rerank,
        "per_query_ms": float(ms.mean()),
        "p50_ms": float(np.median(ms)),
        "p95_ms": float(np.percentile(ms, 95)),
        "cpu_ms_per_query": cpu_ms,
        "cold": cold,
        "warm_ms_per_query": warm_ms,
        "warm_cpu_ms_per_query": warm_cpu_ms,
        "recall_at_10": hits / max(1, sum(t.size for t in truth)),
        "queries": len(qs),
        "mean_cell_searched": float(np.mean(sizes[qcells])),
        "cells": len(sizes),
        "nonempty_cells": int((sizes > 0).sum()),
        "largest_cell": int(sizes.max()),
        "resident_bytes_per_entry": (rss1 - rss0) * 2**20 / n,
        "anon_bytes_per_entry": (anon1 - anon0) * 2**20 / n,
        "disk_bytes_per_entry": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / n,
        "load_s": load_s,
    }


def drop_from_page_cache(folder: Path) -> bool:
    """Ask the kernel to drop the index files' pages from the page cache (written to disk first); False where
    the system cannot (then the measurement is whatever the cache holds)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def measure_in_child(folder: Path, queries: Path, threads: int) -> dict:
    """:func:`measure` in a fresh process, so that its memory is the index's and the interpreter's alone."""
    cmd = [
        sys.executable,
        __file__,
        "--out",
        "-",
        "--measure",
        str(folder),
        "--queries-file",
        str(queries),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {folder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.threads = set_threads(args.threads, pipelined=False)  # the count set (0 resolved), recorded
    args.query_threads = args.query_threads or auto_threads()  # what a locating command would search with
    if args.measure:
        print(json.dumps(measure(args.measure, args.queries_file)))
        return 0
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([20_000] if args.quick else [100_000, 1_000_000, 4_700_000])
    )
    kinds = args.codes.split(",")
    dim = args.dim or default_dim()
    nq = args.queries or (40 if args.quick else 300)
    work = Path(tempfile.mkdtemp(prefix="geoswc-gallery-bench-", dir=args.workdir))
    rows = []
    try:
        for n in sizes:
            lat, lon, cell, num_cells = cell_table(n, work, args.coords)
            photos = (lat, lon, cell)
            for dist in args.distributions.split(","):
                basis = real_basis() if dist == "realistic" else None
                if basis is not None and basis[0].shape[0] != dim:
                    raise SystemExit(f"--dim {dim} differs from the default model's embeddings ({basis[0].shape[0]})")
                for kind in kinds:
                    if kind == "flat" and n > args.flat_max:
                        continue
                    synth = Synth(dim, num_cells, args.seed, max(1, n // LANDMARK_PHOTOS), basis)
                    codes = GalleryCodes(kind=kind, pq_bytes=args.pq_bytes, rerank=args.rerank, seed=args.seed)
                    folder = work / f"gallery-{n}-{dist}-{kind}"
                    print(f"[{n:,} {dist} {kind}] building ...", file=sys.stderr, flush=True)
                    build_s = build(folder, synth, photos, num_cells, codes, args.seed)
                    code_bytes = {"flat": 0, "sq8": dim}.get(kind, args.pq_bytes)
                    disk_s = disk_bound(work, n, dim, code_bytes)
                    print(
                        f"[{n:,} {dist} {kind}] built in {build_s:.1f} s; disk bound {disk_s:.1f} s "
                        f"({build_s / disk_s:.1f}x)",
                        file=sys.stderr,
                        flush=True,
                    )
                    synth = Synth(dim, num_cells, args.seed, max(1, n // LANDMARK_PHOTOS), basis)  # same directions
                    qs, qcells = queries_for(synth, photos, nq, args.seed)
                    np.savez(work / "queries.npz", queries=qs, cells=qcells)
                    row = {
                        "entries": n,
                        "dim": dim,
                        "distribution": dist,
                        "build_s": build_s,
                        "disk_bound_s": disk_s,
                        "build_over_disk": build_s / disk_s,
                        **measure_in_child(folder, work / "queries.npz", args.query_threads),
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    shutil.rmtree(folder, ignore_errors=True)
                    write_result(args, dim, rows, complete=False)  # each run kept as soon as it is measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    write_result(args, dim, rows, complete=True)
    print(f"\n-> {args.out}")
    return 0


def write_result(args: argparse.Namespace, dim: int, rows: list[dict], complete: bool) -> None:
    result = {
        "benchmark": "gallery_search",
        "quick": args.quick,
        "complete": complete,
        "k": K,
        "dim": dim,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "query_threads": args.query_threads,
        "faiss": __import__("faiss").__version__,
        "command": " ".join(["python", *sys.argv]),
        "runs": rows,
        "provenance": provenance(),
    }
    atomic_files.write_text(args.out, json.dumps(result, indent=2) + "\n")  # atomic, creates the folder


def print_table(rows: list[dict]) -> None:
    print(
        "| entries | embeddings | codes | cells (non-empty) | mean cell | cold ms/query (p50, p95) | cold CPU ms | "
        "warm ms (CPU) | recall@10 | resident B/entry (anon) | disk B/entry | write s (disk bound, ratio) | load s |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        codes = r["codes"] + (f" {r['code_bytes']} B, re-rank {r['rerank']}" if r["codes"] != "flat" else "")
        print(
            f"| {r['entries']:,} | {r['distribution']} | {codes} | {r['cells']:,} ({r['nonempty_cells']:,}) | "
            f"{r['mean_cell_searched']:.0f} | {r['per_query_ms']:.2f} ({r['p50_ms']:.2f}, {r['p95_ms']:.2f}) | "
            f"{r['cpu_ms_per_query']:.2f} | {r['warm_ms_per_query']:.2f} ({r['warm_cpu_ms_per_query']:.2f}) | "
            f"{r['recall_at_10']:.3f} | {r['resident_bytes_per_entry']:.0f} ({r['anon_bytes_per_entry']:.0f}) | "
            f"{r['disk_bytes_per_entry']:.0f} | {r['build_s']:.0f} ({disk_cell(r)}) | {r['load_s']:.1f} |"
        )


def disk_cell(r: dict) -> str:
    """``disk_bound_s, build_over_disk`` for the table (a run measured before they were: "-")."""
    return f"{r['disk_bound_s']:.0f} s, {r['build_over_disk']:.1f}x" if "disk_bound_s" in r else "-"


if __name__ == "__main__":
    raise SystemExit(main())
