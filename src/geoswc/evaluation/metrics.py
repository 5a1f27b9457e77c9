"""Geolocation metrics: the share of photos within 1/25/200/750/2500 km, the median error, and GeoScore."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from geoswc.core.sphere import THRESHOLDS_KM, haversine_km


def errors_km(true_lat: ArrayLike, true_lon: ArrayLike, pred_lat: ArrayLike, pred_lon: ArrayLike) -> np.ndarray:
    """Great-circle error of each prediction, ``(N,)`` km."""
    return np.asarray(haversine_km(true_lat, true_lon, pred_lat, pred_lon), np.float64)


def accuracy_at(errors: ArrayLike, thresholds_km: Sequence[float] = THRESHOLDS_KM) -> dict[str, float]:
    """Fraction of errors ``<=`` each threshold, keyed by the threshold written as in the literature
    (``"1"``, ``"25"``, ...). An empty input gives 0.0 everywhere."""
    e = np.asarray(errors, np.float64)
    return {_key(t): (float(np.mean(e <= t)) if e.size else 0.0) for t in thresholds_km}


def median_km(errors: ArrayLike) -> float:
    e = np.asarray(errors, np.float64)
    return float(np.median(e)) if e.size else float("nan")


def _key(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else str(t)


def summarize(errors: ArrayLike) -> dict[str, object]:
    """``{"n", "accuracy", "median_km"}`` of an error list."""
    e = np.asarray(errors, np.float64)
    return {"n": int(e.size), "accuracy": accuracy_at(e), "median_km": median_km(e)}


GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7
"""GeoScore of an error ``d``: ``5000 * exp(-d / 1492.7)`` (GeoGuessr's points; 5000 at 0 km)."""


def geoscore(errors: ArrayLike) -> np.ndarray:
    """The GeoScore ``(N,)`` of each error ``(N,)`` km: ``5000 * exp(-d_km / 1492.7)``."""
    return GEOSCORE_MAX * np.exp(-np.asarray(errors, np.float64) / GEOSCORE_SCALE_KM)


def geoscore_block(errors: ArrayLike) -> dict[str, float]:
    """``{"mean", "median"}`` GeoScore of an error list (NaN for an empty one)."""
    g = geoscore(errors)
    return {
        "mean": float(g.mean()) if g.size else float("nan"),
        "median": float(np.median(g)) if g.size else float("nan"),
    }


# -- calibration and selective prediction ---------------------------------------------------------------

COVERAGES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
"""Fractions of the most confident photos the selective accuracy is measured on."""
SELECTIVE_KM: tuple[float, ...] = (25.0, 750.0, 2500.0)
"""Thresholds of the selective accuracy."""


def equal_mass_bins(probability: ArrayLike, bins: int = 10) -> list[np.ndarray]:
    """The indices of ``probability (N,)`` split into at most ``bins`` bins of nearly equal size by rank; equal
    probabilities stay in one bin (a tie takes the bin of its lowest rank). Empty bins are dropped."""
    p = np.asarray(probability, np.float64)
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    first = np.searchsorted(ranked, ranked, side="left")  # the lowest rank of each value
    label = first * min(bins, max(p.size, 1)) // max(p.size, 1)
    return [order[label == b] for b in np.unique(label)]


def ece(probability: ArrayLike, hit: ArrayLike, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-mass bins of the predicted probability ``(N,)``
    (:func:`equal_mass_bins`): the photo-weighted mean of ``|mean predicted - observed rate|`` per bin. An empty
    input gives 0.0."""
    p, y = np.asarray(probability, np.float64), np.asarray(hit, np.float64)
    if p.size == 0:
        return 0.0
    return float(sum(b.size * abs(p[b].mean() - y[b].mean()) for b in equal_mass_bins(p, bins)) / p.size)


def brier(probability: ArrayLike, hit: ArrayLike) -> float:
    """Brier score: the mean squared difference between the predicted probability and the outcome (0 or 1)."""
    p, y = np.asarray(probability, np.float64), np.asarray(hit, np.float64)
    return float(np.mean((p - y) ** 2)) if p.size else 0.0


def selective_accuracy(confidence: ArrayLike, hit: ArrayLike, coverages: Sequence[float] = COVERAGES) -> list[float]:
    """Accuracy among the ``ceil(c * N)`` most confident photos (at least one), for each coverage ``c``; ties
    in confidence keep the input order. An empty input gives 0.0 everywhere."""
    conf, y = np.asarray(confidence, np.float64), np.asarray(hit, np.float64)
    if conf.size == 0:
        return [0.0 for _ in coverages]
    order = np.argsort(-conf, kind="stable")
    return [float(y[order[: max(1, int(np.ceil(c * conf.size - 1e-9)))]].mean()) for c in coverages]


def calibration_block(
    within: ArrayLike, errors: ArrayLike, thresholds_km: Sequence[float] = THRESHOLDS_KM
) -> dict[str, dict[str, float]]:
    """``{"ece": {"1": ..., ...}, "brier": {...}}`` of probabilities ``within (N, T)`` (one column per threshold)
    against the errors ``(N,)`` km."""
    p, e = np.asarray(within, np.float64).reshape(-1, len(thresholds_km)), np.asarray(errors, np.float64)
    return {
        "ece": {_key(t): ece(p[:, j], e <= t) for j, t in enumerate(thresholds_km)},
        "brier": {_key(t): brier(p[:, j], e <= t) for j, t in enumerate(thresholds_km)},
    }


def selective_block(
    confidence: ArrayLike,
    errors: ArrayLike,
    thresholds_km: Sequence[float] = THRESHOLDS_KM,
    selective_km: Sequence[float] = SELECTIVE_KM,
) -> dict[str, object]:
    """``{"coverage": [...], "accuracy": {"25": [...], "750": [...], "2500": [...]}}``: the accuracy at each of
    ``selective_km`` among the most confident photos. ``confidence`` is ``(N,)`` (one ranking for every threshold)
    or ``(N, T)`` (ranked at each threshold by its own column, e.g. the calibrated ``within_km``)."""
    c, e = np.asarray(confidence, np.float64), np.asarray(errors, np.float64)
    column = {t: (c[:, list(thresholds_km).index(t)] if c.ndim == 2 else c) for t in selective_km}
    return {
        "coverage": list(COVERAGES),
        "accuracy": {_key(t): selective_accuracy(column[t], e <= t) for t in selective_km},
    }
