"""Offline reverse geocoding: the nearest GeoNames place (population >= 1000) to a position.

Uses ``reverse_geocoder`` (GeoNames cities1000, shipped in its wheel) in single-process mode, and
``pycountry`` for country names. The KD-tree is built on first use (about a second), not at import.
"""

from __future__ import annotations

import contextlib
import io
import threading
from dataclasses import dataclass

import pycountry

from geoswc.core.sphere import haversine_km

_lock = threading.Lock()
_geocoder = None


@dataclass(frozen=True)
class Place:
    """A named place near an estimate."""

    name: str
    admin1: str
    """Region (state, province)."""
    admin2: str
    """Sub-region (county, district); may be empty."""
    country_code: str
    country: str
    lat: float
    lon: float
    distance_km: float
    """From the queried position to this place."""

    def label(self) -> str:
        return ", ".join(p for p in (self.name, self.admin1, self.country) if p)


def _get_geocoder():
    global _geocoder
    with _lock:
        if _geocoder is None:
            import reverse_geocoder  # lazy: ~0.3 s to import, needed only to name places

            with contextlib.redirect_stdout(io.StringIO()):  # it prints a loading banner
                _geocoder = reverse_geocoder.RGeocoder(mode=1, verbose=False)
        return _geocoder


def country_name(code: str) -> str:
    c = pycountry.countries.get(alpha_2=code)
    if c is None:
        return {"XK": "Kosovo", "AN": "Netherlands Antilles", "CS": "Serbia and Montenegro"}.get(code, code)
    return getattr(c, "common_name", None) or c.name


def nearest_places(coords: list[tuple[float, float]]) -> list[Place]:
    """The nearest place to each ``(lat, lon)``."""
    if not coords:
        return []
    rows = _get_geocoder().query(coords)
    out = []
    for (lat, lon), r in zip(coords, rows, strict=True):
        plat, plon = float(r["lat"]), float(r["lon"])
        out.append(
            Place(
                r["name"],
                r["admin1"],
                r["admin2"],
                r["cc"],
                country_name(r["cc"]),
                plat,
                plon,
                float(haversine_km(lat, lon, plat, plon)),
            )
        )
    return out
