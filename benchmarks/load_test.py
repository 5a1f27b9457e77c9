"""Load test of ``geoswc serve``: a real server under concurrent clients, then a burst beyond its limits.

1. Starts ``geoswc serve`` (a subprocess, a free localhost port, the embedded model unless ``--model``) with
   room for the clients (``--max-concurrent 2 --max-queue 6``: 8 admitted at once), waits for
   ``/api/health``, then holds it under ``--concurrency`` clients (threads, each with a keep-alive
   connection) posting one real photo per request (../shared/data/im2gps3k-dev, read in place) until
   ``--requests`` answers came back. Every answer must be 200; the server's RSS (``/proc/PID/status``) is
   sampled throughout.
2. Restarts the server with a small gate (``--max-concurrent 1 --max-queue 1``) and sends a burst of
   ``--burst`` simultaneous requests of several photos each: all but the two admitted must be refused at
   once with 503 and a ``Retry-After`` header (a bounded queue, not an unbounded one), and the server must
   answer normally afterwards.

Writes JSON: requests, concurrency, requests_per_s, p50_ms, p99_ms, status_counts, rss_mb_start, rss_mb_max,
rss_growth_mb, overload_503, retry_after, and details. Exits 1 when a check fails.

Run:  python benchmarks/load_test.py --out benchmarks/results/load_test.json [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_IMAGES = SHARED / "im2gps3k-dev" / "images"


# -- the server ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MiB (Linux), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample_rss(self, every_s: float = 0.1) -> None:
        while not self._stop.is_set():
            v = rss_mb(self.proc.pid)
            if v is not None:
                self.samples.append((time.monotonic(), v))
            self._stop.wait(every_s)


@contextlib.contextmanager
def serve(extra: Sequence[str], log: Path, model: str | None = None, timeout_s: float = 300) -> Iterator[Server]:
    """``geoswc serve`` on a free localhost port, ready (``/api/health`` answered 200) when yielded."""
    port = free_port()
    cmd = [sys.executable, "-m", "geoswc", "serve", "--host", "127.0.0.1", "--port", str(port), *extra]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("GEOSWC_TOKEN", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}; see {log}")
            try:
                status, _, _ = request(port, "GET", "/api/health", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout_s:.0f} s; see {log}")
            time.sleep(0.25)
        sampler = threading.Thread(target=server.sample_rss, daemon=True)
        sampler.start()
        yield server
    finally:
        server._stop.set()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- HTTP ------------------------------------------------------------------------------------------------


def multipart(files: Sequence[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    ctype: str | None = None,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 120,
) -> tuple[int, dict[str, str], bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        if own:
            conn.close()


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


def load_photos(folder: Path, n: int) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if not paths:
        raise SystemExit(f"no photos in {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


# -- phase 1: sustained load -------------------------------------------------------------------------------


def sustained(server: Server, photos: list[tuple[str, bytes]], total: int, concurrency: int) -> dict[str, Any]:
    lock = threading.Lock()
    issued = {"n": 0}
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: list[str] = []

    def client(worker: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            while True:
                with lock:
                    if issued["n"] >= total:
                        return
                    i = issued["n"]
                    issued["n"] += 1
                body, ctype = multipart([photos[i % len(photos)]])
                t0 = time.perf_counter()
                try:
                    status, _, payload = request(server.port, "POST", "/api/locate", body, ctype, conn=conn)
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                        statuses["connection_error"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                    continue
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(dt)
                    statuses[str(status)] += 1
                    if status != 200 and len(errors) < 10:
                        errors.append(f"{status}: {payload[:200]!r}")
        finally:
            conn.close()

    rss0 = rss_mb(server.proc.pid) or float("nan")
    start = time.monotonic()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - t0
    time.sleep(0.5)  # one more RSS sample after the load
    rss_end = rss_mb(server.proc.pid) or float("nan")
    during = [v for t, v in server.samples if t >= start]
    half = start + wall / 2
    first, second = [v for t, v in server.samples if start <= t < half], [v for t, v in server.samples if t >= half]
    return {
        "requests": len(latencies) + statuses["connection_error"],
        "concurrency": concurrency,
        "duration_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p90_ms": round(percentile(latencies, 90), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies), 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
        "status_counts": dict(sorted(statuses.items())),
        "rss_mb_start": round(rss0, 1),
        "rss_mb_max": round(max(during + [rss0, rss_end]), 1),
        "rss_mb_end": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss0, 1),
        "rss_mb_max_first_half": round(max(first), 1) if first else None,
        "rss_mb_max_second_half": round(max(second), 1) if second else None,
        "rss_samples": len(during),
        "errors": errors,
    }


# -- phase 2: a burst beyond the gate ---------------------------------------------------------------------


def burst(port: int, photos: list[tuple[str, bytes]], n: int, files_per_request: int) -> dict[str, Any]:
    """``n`` requests released at the same instant (a barrier); each carries ``files_per_request`` photos."""
    barrier = threading.Barrier(n)
    results: list[tuple[int, dict[str, str], float]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        files = [photos[(i * files_per_request + j) % len(photos)] for j in range(files_per_request)]
        body, ctype = multipart(files)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.connect()
        barrier.wait()
        t0 = time.perf_counter()
        try:
            status, headers, _ = request(port, "POST", "/api/locate", body, ctype, conn=conn)
        except (OSError, http.client.HTTPException):
            status, headers = -1, {}
        finally:
            conn.close()
        with lock:
            results.append((status, headers, (time.perf_counter() - t0) * 1000))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    refused = [(h, ms) for s, h, ms in results if s == 503]
    retry = sorted({h.get("retry-after", "") for h, _ in refused})
    after, _, _ = request(port, "POST", "/api/locate", *multipart([photos[0]]))
    return {
        "burst_requests": n,
        "files_per_request": files_per_request,
        "burst_status_counts": dict(sorted(Counter(str(s) for s, _, _ in results).items())),
        "overload_503": len(refused),
        "retry_after": [int(r) for r in retry if r.isdigit()],
        "retry_after_missing": sum(1 for h, _ in refused if "retry-after" not in h),
        "refusal_p50_ms": round(percentile([ms for _, ms in refused], 50), 1) if refused else None,
        "refusal_max_ms": round(max(ms for _, ms in refused), 1) if refused else None,
        "served_p50_ms": round(percentile([ms for s, _, ms in results if s == 200], 50), 1),
        "status_after_burst": after,
    }


# -- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="a short run (60 requests) to check the script")
    p.add_argument("--model", default=None, help="model folder to serve (default: the embedded model)")
    p.add_argument("--data.images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--requests", type=int, default=None, help="sustained-phase requests (default 500; quick 60)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--burst", type=int, default=12, help="simultaneous requests of the overload burst")
    p.add_argument("--logs", type=Path, default=None, help="folder for the servers' logs (default: a temp folder)")
    args = p.parse_args(argv)
    total = args.requests or (60 if args.quick else 500)
    photos = load_photos(args.images, 64 if args.quick else 256)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="geoswc-load-test-"))
    logs.mkdir(parents=True, exist_ok=True)

    # room for every client: max-concurrent + max-queue >= concurrency, so no 503 is expected here
    queue = max(0, args.concurrency - 2)
    print(f"sustained: {total} requests from {args.concurrency} clients (gate 2 + {queue})", file=sys.stderr)
    with serve(
        ["--service.max_concurrent", "2", "--service.max_queue", str(queue)], logs / "sustained.log", args.model
    ) as server:
        body, ctype = multipart([photos[0]])
        for _ in range(3):  # warm caches (place index, allocator) before measuring
            request(server.port, "POST", "/api/locate", body, ctype)
        result = sustained(server, photos, total, args.concurrency)
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}), file=sys.stderr)

    print(f"overload: a burst of {args.burst} simultaneous 4-photo requests at a gate of 1 + 1", file=sys.stderr)
    with serve(
        ["--service.max_concurrent", "1", "--service.max_queue", "1", "--service.queue_timeout_s", "60"],
        logs / "overload.log",
        args.model,
    ) as server:
        over = burst(server.port, photos, args.burst, 4)
    print(json.dumps(over), file=sys.stderr)

    checks = {
        "no_5xx_under_load": all(not k.startswith("5") for k in result["status_counts"]),
        "all_200_under_load": result["status_counts"].get("200", 0) == result["requests"],
        "enough_requests": result["requests"] >= total,
        "rss_bounded": result["rss_mb_max"] < result["rss_mb_start"] + 1024,
        "burst_refused_with_503": over["overload_503"] >= args.burst - 2,
        "retry_after_on_every_503": over["overload_503"] > 0 and over["retry_after_missing"] == 0,
        "refusals_are_immediate": (over["refusal_max_ms"] or 1e9) < 5000,
        "serves_after_burst": over["status_after_burst"] == 200,
    }
    out = {
        **{k: v for k, v in result.items() if k != "errors"},
        "overload_503": over["overload_503"],
        "retry_after": over["retry_after"],
        "overload": over,
        "checks": checks,
        "ok": all(checks.values()),
        "errors": result["errors"],
        "settings": {
            "quick": args.quick,
            "model": args.model or "embedded default",
            "photos": len(photos),
            "sustained_gate": {"max_concurrent": 2, "max_queue": queue},
            "overload_gate": {"max_concurrent": 1, "max_queue": 1},
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "provenance": provenance(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.out}; checks: {checks}; server logs in {logs}", file=sys.stderr)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
