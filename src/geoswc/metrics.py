"""Geolocation metrics: the share of photos within 1/25/200/750/2500 km, and the median error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from .geo import THRESHOLDS_KM, haversine_km


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
