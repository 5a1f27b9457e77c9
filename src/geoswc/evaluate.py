"""Benchmark evaluation: ``metrics.json``, ``predictions.csv`` and ``accuracy.png`` for a CSV of photos.

``metrics.json`` follows a fixed contract that other tools read::

    {"n": 752, "missing": 0, "method": "swc",
     "accuracy": {"1": 0.012, "25": 0.05, "200": 0.08, "750": 0.17, "2500": 0.33},
     "median_km": 3900.5, "model": "<model fingerprint>"}

``n`` counts the photos evaluated, ``missing`` the CSV rows that could not be (bad coordinates, missing
or undecodable images); accuracies are fractions of ``n``. With several methods, the first is the
contract's, the others are under ``"methods"`` and in ``predictions_<method>.csv``. A named benchmark
(``--benchmark``) adds ``"benchmark": {"name", "expected", "evaluated", "missing", "rows_in_file"}``, its
size as published against what was scored. ``missing.csv`` names every row that could not be evaluated
(``image,line,reason``), and last, when the file holds fewer rows than the benchmark as published, how many.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .api import Geolocator
from .benchmark_sets import Benchmark
from .config import METHODS, to_dict
from .data import LoadReport, Record, parse_row_label
from .errors import InputError
from .geo import THRESHOLDS_KM
from .metrics import accuracy_at, errors_km, median_km
from .prediction import Prediction
from .progress import progress_bar

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["image", "true_lat", "true_lon", "pred_lat", "pred_lon", "error_km", "cell", "confidence"]
MISSING_COLUMNS = ["image", "line", "reason"]


def missing_csv(skipped: Sequence[tuple[str, str]], gap: str = "") -> str:
    """``missing.csv``: each row or photo that could not be evaluated (its image, its line in the list when
    known, why), then ``gap`` (the photos the list itself lacks) as a last row without an image."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MISSING_COLUMNS)
    for item, why in skipped:
        image, line = parse_row_label(item)
        w.writerow([image, "" if line is None else line, why])
    if gap:
        w.writerow(["", "", gap])
    return buf.getvalue()


def benchmark_counts(bench: Benchmark, rows_in_file: int, evaluated: int, source: str) -> tuple[dict[str, Any], str]:
    """``metrics.json``'s ``benchmark`` entry, and the note on the photos the file lacks ("" when none)."""
    counts = {"name": bench.name, "expected": bench.expected, "evaluated": evaluated,
              "missing": max(bench.expected - evaluated, 0), "rows_in_file": rows_in_file}
    gap = bench.expected - rows_in_file
    note = (f"{gap} of the {bench.expected} photos of {bench.name} as published are not in {source}"
            if gap > 0 else "")
    if gap < 0:
        log.warning("%s holds %d rows, more than the %d of %s as published (%s)", source, rows_in_file,
                    bench.expected, bench.name, bench.source)
    return counts, note


@dataclass
class MethodResult:
    method: str
    names: list[str]
    true_lat: np.ndarray
    true_lon: np.ndarray
    predictions: list[Prediction]

    @property
    def errors_km(self) -> np.ndarray:
        return errors_km(self.true_lat, self.true_lon, [p.lat for p in self.predictions],
                         [p.lon for p in self.predictions])

    def metrics(self) -> dict[str, Any]:
        e = self.errors_km
        return {"accuracy": accuracy_at(e), "median_km": median_km(e)}

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(PREDICTION_COLUMNS)
        for name, tl, tn, p, e in zip(self.names, self.true_lat, self.true_lon, self.predictions, self.errors_km,
                                      strict=True):
            w.writerow([name, f"{tl:.6f}", f"{tn:.6f}", f"{p.lat:.6f}", f"{p.lon:.6f}", f"{e:.3f}", p.cell,
                        f"{p.confidence:.4f}"])
        return buf.getvalue()


def plot_accuracy(results: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str = "") -> None:
    """Accuracy against distance threshold (log axis), one line per method, the standard thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    grid = np.logspace(-1, np.log10(20000), 400)
    for name, err in results:
        curve = [(err <= t).mean() * 100 if err.size else 0.0 for t in grid]
        line = ax.plot(grid, curve, label=name, lw=2)[0]
        pts = [(err <= t).mean() * 100 if err.size else 0.0 for t in THRESHOLDS_KM]
        ax.plot(THRESHOLDS_KM, pts, "o", color=line.get_color(), ms=5)
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(0.1, 20000)
    ax.set_ylim(0, 100)
    ax.set_xticks(THRESHOLDS_KM)
    ax.set_xticklabels([f"{int(t)} km" for t in THRESHOLDS_KM])
    ax.set_xlabel("distance threshold")
    ax.set_ylabel("photos located within threshold (%)")
    ax.set_title(title or "Geolocation accuracy")
    ax.grid(axis="y", color="0.9")
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def locate_records(geolocator: Geolocator, records: Sequence[Record], methods: Sequence[str] = ("swc",),
                   exclude_same_author: bool = False, batch_size: int = 16, num_workers: int = 0,
                   progress: bool = True) -> tuple[list[MethodResult], LoadReport]:
    """Locate geotagged photos with each method (the backbone runs once per photo).

    Query photos that are also in the gallery (same image id) are never retrieved for themselves, and
    with ``exclude_same_author`` neither are photos of the same author.

    Returns:
        One :class:`MethodResult` per method, and the report of the photos that could not be decoded.
    """
    methods = list(dict.fromkeys(methods))
    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if exclude_same_author and not any(r.author for r in records):
        raise InputError("excluding same-author gallery photos needs an 'author' column")
    decode = LoadReport("decoding", total=len(records))
    rows: list[int] = []
    chunks: list[torch.Tensor] = []
    for b, feats in geolocator.iter_features([r.path for r in records], batch_size, num_workers, progress,
                                             names=[r.image for r in records]):
        for k, _, err in b.bad:
            decode.skip(records[k].image, str(err))
        if feats is not None:
            rows += b.keys.tolist()
            chunks.append(feats)
    decode.log()
    kept = [records[i] for i in rows]
    if not kept:
        raise InputError(f"no photo could be evaluated: {decode.summary()}")
    features, names = torch.cat(chunks), [r.image for r in kept]
    exclude = [r.author for r in kept] if exclude_same_author else None
    tlat, tlon = np.array([r.lat for r in kept]), np.array([r.lon for r in kept])
    return [MethodResult(m, names, tlat, tlon, _search(geolocator, features, m, names, exclude, progress))
            for m in methods], decode


def _search(geolocator: Geolocator, features: torch.Tensor, method: str, names: list[str],
            exclude: list[str] | None, progress: bool, step: int = 256) -> list[Prediction]:
    """Predictions for features ``(N, D)`` with one method, ``step`` photos at a time under a progress bar."""
    out: list[Prediction] = []
    with progress_bar(total=len(names), desc=f"{method} search", unit="img", show=progress) as bar:
        for s in range(0, len(names), step):
            out += geolocator.predict_features(features[s:s + step], method, names=names[s:s + step],  # type: ignore[arg-type]
                                               exclude_authors=exclude[s:s + step] if exclude else None)
            bar.update(len(names[s:s + step]))
    return out


def write_evaluation(out: str | Path, geolocator: Geolocator, results: Sequence[MethodResult],
                     skipped: Sequence[tuple[str, str]], run: dict[str, Any], benchmark: dict[str, Any] | None = None,
                     gap: str = "") -> dict[str, Any]:
    """Write ``metrics.json``, ``predictions[_METHOD].csv``, ``missing.csv``, ``accuracy.png`` and ``run.json``
    into ``out``.

    Args:
        results: the methods' results; the first is the contract's.
        skipped: ``(item, reason)`` of every row or photo that could not be evaluated.
        run: what was evaluated (source files, options), recorded in ``run.json``.
        benchmark: the named benchmark's counts (:func:`benchmark_counts`), recorded in ``metrics.json``.
        gap: the note on the photos the list lacks, the last row of ``missing.csv``.

    Returns:
        The ``metrics.json`` content.
    """
    out = storage.ensure_dir(out)
    # metrics.json marks a complete run: drop the old one before rewriting the files it describes, so a
    # run killed half-way never leaves new predictions beside old metrics.
    (out / "metrics.json").unlink(missing_ok=True)
    primary = results[0]
    metrics: dict[str, Any] = {"n": len(primary.names), "missing": len(skipped), "method": primary.method,
                               **primary.metrics(), "model": geolocator.fingerprint}
    if len(results) > 1:
        metrics["methods"] = {r.method: r.metrics() for r in results}
    if benchmark is not None:
        metrics["benchmark"] = benchmark
    storage.write_text(out / "missing.csv", missing_csv(skipped, gap))
    for r in results:
        storage.write_text(out / ("predictions.csv" if r is primary else f"predictions_{r.method}.csv"), r.to_csv())
    plot_accuracy([(r.method, r.errors_km) for r in results], out / "accuracy.png",
                  f"{run.get('title', 'evaluation')}: n={len(primary.names)}")
    storage.write_json(out / "run.json", {
        **run, "methods": [r.method for r in results], "model": geolocator.fingerprint,
        "cells_fingerprint": geolocator.model.config.cells_fingerprint,
        "gallery_size": len(geolocator.gallery) if geolocator.gallery is not None else 0,
        "search": to_dict(geolocator.search), "preprocess": to_dict(geolocator.model.config.backbone.preprocess),
        "model_config": to_dict(geolocator.model.config),
        "skipped": [{"item": i, "reason": why} for i, why in skipped],
    })
    storage.write_json(out / "metrics.json", metrics)
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line per method: accuracies in % and the median error."""
    rows = metrics.get("methods") or {metrics["method"]: metrics}
    head = "method          " + "".join(f"{k + ' km':>10}" for k in metrics["accuracy"]) + "   median km"
    lines = [f"n={metrics['n']} missing={metrics['missing']} model={metrics['model']}", head]
    if "benchmark" in metrics:
        b = metrics["benchmark"]
        lines.insert(1, f"benchmark {b['name']}: {b['expected']} photos expected as published, {b['evaluated']} "
                        f"evaluated, {b['missing']} missing (named in missing.csv)")
    for m, r in rows.items():
        acc = "".join(f"{100 * v:>9.1f}%" for v in r["accuracy"].values())
        lines.append(f"{m:<16}{acc}{r['median_km']:>12.1f}")
    return "\n".join(lines)
