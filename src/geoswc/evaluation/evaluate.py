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
contract's, the others are under ``"methods"`` and in ``predictions_<method>.csv``. Two blocks say how far to
trust the estimates::

    "calibration": {"ece": {"1": ..., "25": ..., "200": ..., "750": ..., "2500": ...}, "brier": {...}},
    "selective": {"coverage": [0.1, 0.25, 0.5, 0.75, 1.0], "accuracy": {"25": [...], "750": [...], "2500": [...]}}

``calibration`` compares the calibrated ``within_km`` with what happened (ECE over 10 equal-mass bins of the
predicted probability, and the Brier score); it is null when the model has no calibrator. ``selective`` is the
accuracy among the most confident photos, ranked at each threshold by ``within_km`` at that threshold (by the
prediction density ``confidence`` without a calibrator).

Every method's block also holds ``"geoscore": {"mean", "median"}`` (``5000 * exp(-d_km / 1492.7)``) and ``"admin":
{"country", "admin1", "admin2", "city", "labelled", "unlabelled"}`` (the share of the labelled photos whose estimate
falls in the truth's country, admin1, admin2 and nearest place; :mod:`geoswc.evaluation.regions`, method in
``"admin_labels"``, the denominators in ``"admin_note"``). ``"breakdown"`` (also ``breakdown.csv``) gives the first
method's results per continent and per country of the truth; ``errors_map.png`` maps its errors.

In both CSVs a text cell that a spreadsheet would take for a formula (it begins with ``=``, ``+``, ``-``, ``@``, a
tab or a carriage return) gets a single quote ``'`` added in front (:func:`geoswc.core.text_cells.csv_text`; a cell
that begins with ``'`` gets one too); ``geoswc compare`` removes it when it reads ``predictions.csv``. Numbers are
never changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoswc.core import atomic_files, text_cells
from geoswc.core.config import METHODS, to_dict
from geoswc.core.errors import InputError
from geoswc.core.progress import progress_bar
from geoswc.core.sphere import THRESHOLDS_KM
from geoswc.data.records import LoadReport, Record, parse_row_label
from geoswc.evaluation.benchmark_sets import Benchmark
from geoswc.evaluation.errors_map import plot_errors_map
from geoswc.evaluation.figures import figure, save_figure
from geoswc.evaluation.metrics import (
    COVERAGES,
    SELECTIVE_KM,
    accuracy_at,
    calibration_block,
    equal_mass_bins,
    errors_km,
    geoscore_block,
    median_km,
    selective_block,
)
from geoswc.evaluation.regions import (
    ADMIN_LABELS,
    ADMIN_LEVELS,
    ADMIN_NOTE,
    AdminLabel,
    admin_block,
    admin_hits,
    admin_labels,
    breakdown,
    breakdown_csv,
    format_breakdown,
)
from geoswc.prediction.calibration import signal_matrix
from geoswc.prediction.geolocator import Geolocator
from geoswc.prediction.results import Prediction

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = [
    "image",
    "true_lat",
    "true_lon",
    "pred_lat",
    "pred_lon",
    "error_km",
    "cell",
    "confidence",
    *(f"within_{int(t)}_km" for t in THRESHOLDS_KM),
    "localizable",
]
MISSING_COLUMNS = ["image", "line", "reason"]


def missing_csv(skipped: Sequence[tuple[str, str]], gap: str = "") -> str:
    """``missing.csv``: each row or photo that could not be evaluated (its image, its line in the list when
    known, why), then ``gap`` (the photos the list itself lacks) as a last row without an image. The image and
    the reason are text cells escaped for spreadsheets (:func:`geoswc.core.text_cells.csv_text`: a ``'`` in front of
    one that begins with a formula character)."""
    rows = [text_cells.csv_row(MISSING_COLUMNS)]
    for item, why in skipped:
        image, line = parse_row_label(item)
        rows.append(
            text_cells.csv_row([text_cells.csv_text(image), "" if line is None else line, text_cells.csv_text(why)])
        )
    if gap:
        rows.append(text_cells.csv_row(["", "", text_cells.csv_text(gap)]))
    return "".join(rows)


def benchmark_counts(bench: Benchmark, rows_in_file: int, evaluated: int, source: str) -> tuple[dict[str, Any], str]:
    """``metrics.json``'s ``benchmark`` entry, and the note on the photos the file lacks ("" when none)."""
    counts = {
        "name": bench.name,
        "expected": bench.expected,
        "evaluated": evaluated,
        "missing": max(bench.expected - evaluated, 0),
        "rows_in_file": rows_in_file,
    }
    gap = bench.expected - rows_in_file
    note = f"{gap} of the {bench.expected} photos of {bench.name} as published are not in {source}" if gap > 0 else ""
    if gap < 0:
        log.warning(
            "%s holds %d rows, more than the %d of %s as published (%s)",
            source,
            rows_in_file,
            bench.expected,
            bench.name,
            bench.source,
        )
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
        return errors_km(
            self.true_lat, self.true_lon, [p.lat for p in self.predictions], [p.lon for p in self.predictions]
        )

    @property
    def within(self) -> np.ndarray | None:
        """The calibrated ``within_km`` of every prediction ``(N, T)``, or None when some prediction has none."""
        if not self.predictions or any(p.within_km is None for p in self.predictions):
            return None
        return np.array([[p.within_km[f"{int(t)}"] for t in THRESHOLDS_KM] for p in self.predictions])  # type: ignore[index]

    def estimate_labels(self) -> list[AdminLabel | None]:
        """The administrative label of each estimate (:func:`~geoswc.evaluation.regions.admin_labels`)."""
        return admin_labels([p.lat for p in self.predictions], [p.lon for p in self.predictions])

    def metrics(self, truth: Sequence[AdminLabel | None] | None = None) -> dict[str, Any]:
        """This method's block of ``metrics.json``; ``truth``: the labels of the true positions (computed when
        not given)."""
        e, w = self.errors_km, self.within
        confidence = w if w is not None else np.array([p.confidence for p in self.predictions])
        truth = admin_labels(self.true_lat, self.true_lon) if truth is None else truth
        return {
            "accuracy": accuracy_at(e),
            "median_km": median_km(e),
            "geoscore": geoscore_block(e),
            "admin": admin_block(truth, self.estimate_labels()),
            "calibration": calibration_block(w, e) if w is not None else None,
            "selective": selective_block(confidence, e),
        }

    def to_csv(self) -> str:
        """``predictions.csv``: :data:`PREDICTION_COLUMNS` for each photo. The text cells (the image and the cell
        token) are escaped for spreadsheets: one that begins with a formula character gets a ``'`` in front
        (:func:`geoswc.core.text_cells.csv_text`); the numbers are written as they are. A field holding a line break
        of either kind is quoted (:func:`geoswc.core.text_cells.csv_row`)."""
        rows = [text_cells.csv_row(PREDICTION_COLUMNS)]
        for name, tl, tn, p, e in zip(
            self.names, self.true_lat, self.true_lon, self.predictions, self.errors_km, strict=True
        ):
            within = [f"{p.within_km[f'{int(t)}']:.4f}" for t in THRESHOLDS_KM] if p.within_km else [""] * 5
            rows.append(
                text_cells.csv_row(
                    [
                        text_cells.csv_text(name),
                        f"{tl:.6f}",
                        f"{tn:.6f}",
                        f"{p.lat:.6f}",
                        f"{p.lon:.6f}",
                        f"{e:.3f}",
                        text_cells.csv_text(p.cell),
                        f"{p.confidence:.4f}",
                        *within,
                        "" if p.localizable is None else p.localizable,
                    ]
                )
            )
        return "".join(rows)


def plot_accuracy(results: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str = "") -> None:
    """Accuracy against distance threshold (log axis), one line per method, the standard thresholds marked."""
    fig = figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
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
    save_figure(fig, path)


def plot_reliability(within: np.ndarray, errors: np.ndarray, path: str | Path, title: str = "", bins: int = 10) -> None:
    """One reliability diagram per threshold: the observed rate against the mean calibrated probability of
    ``bins`` equal-mass bins of ``within (N, T)`` (the diagonal is perfect calibration)."""
    fig = figure(figsize=(3.0 * len(THRESHOLDS_KM), 3.4), dpi=110)
    axes = fig.subplots(1, len(THRESHOLDS_KM))
    for j, (ax, t) in enumerate(zip(axes, THRESHOLDS_KM, strict=True)):
        p, hit = within[:, j], errors <= t
        parts = equal_mass_bins(p, bins)
        mp, rate = [p[b].mean() for b in parts], [hit[b].mean() for b in parts]
        top = max(0.05, min(1.0, 1.15 * max([*mp, *rate], default=0.0)))
        ax.plot([0, top], [0, top], color="0.7", lw=1, ls="--")
        ax.plot(mp, rate, "o-", ms=4, lw=1.5)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_title(f"within {int(t)} km")
        ax.set_xlabel("predicted probability")
        if j == 0:
            ax.set_ylabel("observed rate")
    fig.suptitle(title or "Reliability of within_km (10 equal-mass bins)")
    save_figure(fig, path)


def plot_selective(confidence: np.ndarray, errors: np.ndarray, path: str | Path, title: str = "") -> None:
    """Accuracy against coverage (the most confident fraction of photos kept), one line per threshold of
    :data:`~geoswc.evaluation.metrics.SELECTIVE_KM`; ``confidence`` as in
    :func:`~geoswc.evaluation.metrics.selective_block`."""
    block = selective_block(confidence, errors)
    grid = np.linspace(0.02, 1.0, 50)
    fig = figure(figsize=(6.5, 4.2), dpi=120)
    ax = fig.subplots()
    for t in SELECTIVE_KM:
        col = confidence[:, list(THRESHOLDS_KM).index(t)] if confidence.ndim == 2 else confidence
        order = np.argsort(-col, kind="stable")
        hit = (errors <= t)[order]
        curve = [100 * hit[: max(1, int(np.ceil(c * len(hit))))].mean() for c in grid] if len(hit) else []
        line = ax.plot(grid[: len(curve)], curve, lw=2, label=f"within {int(t)} km")[0]
        ax.plot(COVERAGES, [100 * v for v in block["accuracy"][str(int(t))]], "o", color=line.get_color(), ms=5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("coverage (share of photos kept, most confident first)")
    ax.set_ylabel("accuracy among kept photos (%)")
    ax.set_title(title or "Selective prediction")
    ax.grid(color="0.9")
    ax.legend(loc="upper right")
    save_figure(fig, path)


def locate_records(
    geolocator: Geolocator,
    records: Sequence[Record],
    methods: Sequence[str] = ("swc",),
    exclude_same_author: bool = False,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[list[MethodResult], LoadReport]:
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
    for b, feats in geolocator.iter_features(
        [r.path for r in records], batch_size, num_workers, progress, names=[r.image for r in records]
    ):
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
    return [
        MethodResult(m, names, tlat, tlon, _search(geolocator, features, m, names, exclude, progress)) for m in methods
    ], decode


def _search(
    geolocator: Geolocator,
    features: torch.Tensor,
    method: str,
    names: list[str],
    exclude: list[str] | None,
    progress: bool,
    step: int = 256,
) -> list[Prediction]:
    """Predictions for features ``(N, D)`` with one method, ``step`` photos at a time under a progress bar."""
    out: list[Prediction] = []
    with progress_bar(total=len(names), desc=f"{method} search", unit="img", show=progress) as bar:
        for s in range(0, len(names), step):
            out += geolocator.predict_features(
                features[s : s + step],
                method,
                names=names[s : s + step],  # type: ignore[arg-type]
                exclude_authors=exclude[s : s + step] if exclude else None,
            )
            bar.update(len(names[s : s + step]))
    return out


def write_evaluation(
    out: str | Path,
    geolocator: Geolocator,
    results: Sequence[MethodResult],
    skipped: Sequence[tuple[str, str]],
    run: dict[str, Any],
    benchmark: dict[str, Any] | None = None,
    gap: str = "",
) -> dict[str, Any]:
    """Write ``metrics.json``, ``predictions[_METHOD].csv``, ``missing.csv``, ``breakdown.csv``, ``accuracy.png``,
    ``reliability.png`` (only with a calibrator), ``selective.png``, ``errors_map.png`` and ``run.json`` into ``out``.

    Args:
        results: the methods' results; the first is the contract's.
        skipped: ``(item, reason)`` of every row or photo that could not be evaluated.
        run: what was evaluated (source files, options), recorded in ``run.json``.
        benchmark: the named benchmark's counts (:func:`benchmark_counts`), recorded in ``metrics.json``.
        gap: the note on the photos the list lacks, the last row of ``missing.csv``.

    Returns:
        The ``metrics.json`` content.
    """
    out = atomic_files.ensure_dir(out)
    # metrics.json marks a complete run: drop the old one before rewriting the files it describes, so a
    # run killed half-way never leaves new predictions beside old metrics.
    (out / "metrics.json").unlink(missing_ok=True)
    primary = results[0]
    truth = admin_labels(primary.true_lat, primary.true_lon)
    block = primary.metrics(truth)
    metrics: dict[str, Any] = {
        "n": len(primary.names),
        "missing": len(skipped),
        "method": primary.method,
        **block,
        "admin_labels": ADMIN_LABELS,
        "admin_note": ADMIN_NOTE,
        "model": geolocator.fingerprint,
    }
    if len(results) > 1:
        metrics["methods"] = {r.method: (block if r is primary else r.metrics(truth)) for r in results}
    if benchmark is not None:
        metrics["benchmark"] = benchmark
    atomic_files.write_text(out / "missing.csv", missing_csv(skipped, gap))
    for r in results:
        atomic_files.write_text(
            out / ("predictions.csv" if r is primary else f"predictions_{r.method}.csv"), r.to_csv()
        )
    metrics["breakdown"] = write_breakdown(out, primary, truth)
    write_plots(out, results, f"{run.get('title', 'evaluation')}: {primary.method}, n={len(primary.names)}", truth)
    atomic_files.write_json(
        out / "run.json",
        {
            **run,
            "methods": [r.method for r in results],
            "model": geolocator.fingerprint,
            "cells_fingerprint": geolocator.model.config.cells_fingerprint,
            "gallery_size": len(geolocator.gallery) if geolocator.gallery is not None else 0,
            "search": to_dict(geolocator.search),
            "preprocess": to_dict(geolocator.model.config.backbone.preprocess),
            "model_config": to_dict(geolocator.model.config),
            "calibrator": geolocator.calibrator.fingerprint if geolocator.calibrator is not None else None,
            "localizable_rule": to_dict(geolocator.rule) if geolocator.calibrator is not None else None,
            "skipped": [{"item": i, "reason": why} for i, why in skipped],
        },
    )
    atomic_files.write_json(out / "metrics.json", metrics)
    return metrics


def write_breakdown(out: Path, result: MethodResult, truth: Sequence[AdminLabel | None]) -> dict[str, Any]:
    """Write ``breakdown.csv`` (per continent and per country of the truth) and return ``metrics.json``'s
    ``breakdown`` block (:func:`~geoswc.evaluation.regions.breakdown`)."""
    _, hits = admin_hits(truth, result.estimate_labels())
    block = breakdown(truth, result.errors_km, hits[:, ADMIN_LEVELS.index("country")])
    atomic_files.write_text(out / "breakdown.csv", breakdown_csv(block))
    return block


def write_plots(out: Path, results: Sequence[MethodResult], title: str, truth: Sequence[AdminLabel | None]) -> None:
    """``accuracy.png`` (every method), and of the first method ``reliability.png`` (only with a calibrator),
    ``selective.png`` and ``errors_map.png``."""
    primary = results[0]
    plot_accuracy([(r.method, r.errors_km) for r in results], out / "accuracy.png", title)
    within = primary.within
    (out / "reliability.png").unlink(missing_ok=True)
    if within is not None:
        plot_reliability(within, primary.errors_km, out / "reliability.png", f"Reliability of within_km ({title})")
    plot_selective(
        within if within is not None else np.array([p.confidence for p in primary.predictions]),
        primary.errors_km,
        out / "selective.png",
        f"Selective prediction ({title}; ranked by {'within_km' if within is not None else 'confidence'})",
    )
    plot_errors_map(
        primary.true_lat,
        primary.true_lon,
        [p.lat for p in primary.predictions],
        [p.lon for p in primary.predictions],
        [t.country if t is not None else "" for t in truth],
        out / "errors_map.png",
        f"Errors of {title}: true position to estimate",
    )


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line per method: accuracies in % and the median error."""
    rows = metrics.get("methods") or {metrics["method"]: metrics}
    head = "method          " + "".join(f"{k + ' km':>10}" for k in metrics["accuracy"]) + "   median km"
    lines = [f"n={metrics['n']} missing={metrics['missing']} model={metrics['model']}", head]
    if "benchmark" in metrics:
        b = metrics["benchmark"]
        lines.insert(
            1,
            f"benchmark {b['name']}: {b['expected']} photos expected as published, {b['evaluated']} "
            f"evaluated, {b['missing']} missing (named in missing.csv)",
        )
    for m, r in rows.items():
        acc = "".join(f"{100 * v:>9.1f}%" for v in r["accuracy"].values())
        lines.append(f"{m:<16}{acc}{r['median_km']:>12.1f}")
    lines += admin_lines(metrics, rows)
    cal = metrics.get("calibration")
    lines.append(
        "calibration     "
        + (
            "no calibrator: within_km is not available"
            if cal is None
            else "ECE " + " ".join(f"{k} km {v:.3f}" for k, v in cal["ece"].items())
        )
    )
    sel = metrics["selective"]
    lines.append(
        "selective       "
        + "; ".join(f"within {k} km: " + " ".join(f"{100 * v:.0f}%" for v in acc) for k, acc in sel["accuracy"].items())
        + f" (at coverage {', '.join(f'{c:g}' for c in sel['coverage'])})"
    )
    if "breakdown" in metrics:
        lines += [f"where it fails ({metrics['method']}; breakdown.csv)", format_breakdown(metrics["breakdown"])]
    return "\n".join(lines)


def admin_lines(metrics: dict[str, Any], rows: dict[str, Any]) -> list[str]:
    """The printed table's GeoScore and administrative-level accuracy lines, one per method."""
    if not all("geoscore" in r and "admin" in r for r in rows.values()):
        return []
    first = next(iter(rows.values()))["admin"]
    lines = [
        "method          GeoScore mean  median  " + "".join(f"{'same ' + lv:>13}" for lv in ADMIN_LEVELS),
    ]
    for m, r in rows.items():
        adm = "".join(
            f"{100 * r['admin'][lv]:>12.1f}%" if r["admin"][lv] is not None else f"{'-':>13}" for lv in ADMIN_LEVELS
        )
        lines.append(f"{m:<16}{r['geoscore']['mean']:>13.0f}{r['geoscore']['median']:>8.0f}  {adm}")
    lines.append(
        f"admin levels    {metrics.get('admin_labels', ADMIN_LABELS)}; {first['labelled']} photos labelled, "
        f"{first['unlabelled']} unlabelled (truth over 200 km from any place: not in the denominators)"
    )
    return lines


def labelled_signals(
    geo: Geolocator, records: Sequence[Record], exclude_same_author: bool, batch_size: int = 16, workers: int = 0
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """What a calibrator is fitted on, from a labelled set the model did not train on: per method of ``geo``, the
    signals ``(N, S)`` and errors ``(N,)`` of each photo; and the photos located."""
    results, _ = locate_records(geo, records, geo.methods, exclude_same_author, batch_size, workers)
    per_method = {r.method: (signal_matrix([p.signals for p in r.predictions]), r.errors_km) for r in results}
    return per_method, len(results[0].names)
