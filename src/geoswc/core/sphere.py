"""Geodesic math on the sphere. Inputs and outputs are ``(lat, lon)`` in degrees; radians stay in here."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

EARTH_RADIUS_KM = 6371.0088
"""Mean Earth radius (IUGG), the convention of the geolocation literature."""
HALF_EARTH_KM = float(np.pi * EARTH_RADIUS_KM)
"""The farthest two places can be apart along the surface (about 20,015 km)."""

THRESHOLDS_KM: tuple[float, ...] = (1.0, 25.0, 200.0, 750.0, 2500.0)
"""Standard accuracy thresholds: street, city, region, country, continent."""


def validate_latlon(lat: ArrayLike, lon: ArrayLike) -> NDArray[np.bool_]:
    """Boolean mask of coordinates that are finite and in range (|lat| <= 90, |lon| <= 180)."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    return np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0) & (np.abs(lon) <= 180.0)


def haversine_km(lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike) -> NDArray[np.float64]:
    """Great-circle distance in km between points given in degrees (broadcasts)."""
    p1, p2 = np.radians(np.asarray(lat1, np.float64)), np.radians(np.asarray(lat2, np.float64))
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2, np.float64) - np.asarray(lon1, np.float64))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def latlon_to_xyz(lat: ArrayLike, lon: ArrayLike) -> NDArray[np.float64]:
    """Unit vectors ``(..., 3)`` for coordinates in degrees."""
    la, lo = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def xyz_to_latlon(xyz: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(lat, lon)`` in degrees of vectors ``(..., 3)``; the vectors need not be unit length."""
    xyz = np.asarray(xyz, np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lat = np.degrees(np.arctan2(z, np.hypot(x, y)))
    lon = np.degrees(np.arctan2(y, x))
    return lat, lon


def sklearn_haversine_points(lat: ArrayLike, lon: ArrayLike) -> NDArray[np.float64]:
    """``(N, 2)`` ``(lat, lon)`` in radians: the input of scikit-learn's ``haversine`` metric (BallTree, DBSCAN)."""
    return np.radians(np.stack([np.asarray(lat, np.float64), np.asarray(lon, np.float64)], axis=1))


def spherical_mean(lat: ArrayLike, lon: ArrayLike, weights: ArrayLike | None = None) -> tuple[float, float]:
    """Mean position on the sphere: the normalised (weighted) mean of the unit vectors.

    Unlike averaging degrees, this is right across the antimeridian and near the poles. When the
    vectors cancel out (antipodal points), the first point is returned.
    """
    xyz = latlon_to_xyz(lat, lon).reshape(-1, 3)
    if xyz.shape[0] == 0:
        raise ValueError("spherical_mean needs at least one point")
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    m = (xyz * w[:, None]).sum(0)
    if np.linalg.norm(m) < 1e-12:
        m = xyz[0]
    la, lo = xyz_to_latlon(m)
    return float(la), float(lo)
