"""Property-based tests (hypothesis): the geodesic math, and the CSV readers on arbitrary input."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from geoswc.core.errors import InputError
from geoswc.core.sphere import EARTH_RADIUS_KM, haversine_km, latlon_to_xyz, spherical_mean, xyz_to_latlon
from geoswc.data.records import parse_coord, read_coordinates, read_photo_csv

from .conftest import jpeg_bytes

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

lats = st.floats(-90, 90, allow_nan=False)
lons = st.floats(-180, 180, allow_nan=False)
points = st.tuples(lats, lons)
HALF_CIRCUMFERENCE = math.pi * EARTH_RADIUS_KM
EPS_KM = 1e-6


def d(a: tuple[float, float], b: tuple[float, float]) -> float:
    return float(haversine_km(a[0], a[1], b[0], b[1]))


# -- haversine ------------------------------------------------------------------------------------------


@SETTINGS
@given(points, points)
def test_haversine_symmetric_and_bounded(a: tuple[float, float], b: tuple[float, float]) -> None:
    assert d(a, b) == pytest.approx(d(b, a), abs=EPS_KM)
    assert 0.0 <= d(a, b) <= HALF_CIRCUMFERENCE + EPS_KM
    assert d(a, a) < EPS_KM


@SETTINGS
@given(points, points, points)
def test_haversine_triangle_inequality(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> None:
    assert d(a, c) <= d(a, b) + d(b, c) + 1e-3  # float32-free, so a metre is ample slack near antipodes


@SETTINGS
@given(points, points, st.floats(-720, 720, allow_nan=False))
def test_haversine_invariant_under_longitude_rotation(
    a: tuple[float, float], b: tuple[float, float], shift: float
) -> None:
    """Rotating both points about the axis keeps their distance, across the antimeridian included."""
    wrap = lambda lon: (lon + 180.0) % 360.0 - 180.0  # noqa: E731
    # near antipodes a rounding of the shifted longitudes moves the distance by up to ~0.1 m
    assert d((a[0], wrap(a[1] + shift)), (b[0], wrap(b[1] + shift))) == pytest.approx(d(a, b), abs=1e-3)


@SETTINGS
@given(lats, st.floats(0, 5, allow_nan=False), st.floats(0, 5, allow_nan=False))
def test_antimeridian_neighbours_are_near(lat: float, e1: float, e2: float) -> None:
    """179.9° E and 179.9° W are 0.2° of longitude apart, not 359.8°."""
    across = d((lat, 180.0 - e1), (lat, -180.0 + e2))
    same_side = d((lat, -e1), (lat, e2))
    assert across == pytest.approx(same_side, abs=1e-6)
    assert across <= (e1 + e2) * math.pi / 180 * EARTH_RADIUS_KM + EPS_KM


@SETTINGS
@given(points, st.floats(0, 1, allow_nan=False))
def test_haversine_matches_the_arc_along_a_meridian(a: tuple[float, float], frac: float) -> None:
    lat2 = -90 + frac * 180
    expected = abs(lat2 - a[0]) * math.pi / 180 * EARTH_RADIUS_KM
    assert d(a, (lat2, a[1])) == pytest.approx(expected, abs=1e-3)  # arcsin near 1 loses ~0.1 m


# -- unit vectors ---------------------------------------------------------------------------------------


@SETTINGS
@given(points)
def test_latlon_xyz_round_trip(p: tuple[float, float]) -> None:
    xyz = latlon_to_xyz(*p)
    assert np.linalg.norm(xyz) == pytest.approx(1.0, abs=1e-12)
    lat, lon = xyz_to_latlon(xyz)
    assert -90 <= lat <= 90 and -180 <= lon <= 180
    assert float(lat) == pytest.approx(p[0], abs=1e-9)
    # the same place (at a pole any longitude is; at ±180° the sign may flip)
    assert d(p, (float(lat), float(lon))) < EPS_KM


@SETTINGS
@given(
    st.lists(st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(-1, 1)), min_size=1, max_size=5),
    st.floats(1e-3, 1e3),
)
def test_xyz_to_latlon_ignores_length(vs: list[tuple[float, float, float]], scale: float) -> None:
    v = np.array(vs)
    assume(np.all(np.linalg.norm(v, axis=1) > 1e-6))
    a, b = xyz_to_latlon(v), xyz_to_latlon(v * scale)
    np.testing.assert_allclose(a[0], b[0], atol=1e-9)
    assert np.all(haversine_km(a[0], a[1], b[0], b[1]) < EPS_KM)


# -- spherical mean -------------------------------------------------------------------------------------


@st.composite
def cluster(draw: st.DrawFn) -> tuple[tuple[float, float], float, np.ndarray, np.ndarray]:
    """Up to 12 points within ``radius_km`` (<= 2000 km) of a random centre, and positive weights."""
    centre = draw(points)
    radius = draw(st.floats(0.01, 2000))
    n = draw(st.integers(1, 12))
    ang = np.array(draw(st.lists(st.floats(0, 2 * math.pi), min_size=n, max_size=n)))
    frac = np.array(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
    weights = np.array(draw(st.lists(st.floats(1e-3, 1e3), min_size=n, max_size=n)))
    # destination points along bearings (spherical, exact)
    la1, lo1 = math.radians(centre[0]), math.radians(centre[1])
    delta = frac * radius / EARTH_RADIUS_KM
    la2 = np.arcsin(np.clip(np.sin(la1) * np.cos(delta) + np.cos(la1) * np.sin(delta) * np.cos(ang), -1, 1))
    lo2 = lo1 + np.arctan2(np.sin(ang) * np.sin(delta) * np.cos(la1), np.cos(delta) - np.sin(la1) * np.sin(la2))
    lat, lon = np.degrees(la2), (np.degrees(lo2) + 180) % 360 - 180
    return centre, radius, np.stack([lat, lon], 1), weights


@SETTINGS
@given(cluster(), st.booleans())
def test_spherical_mean_stays_inside_a_cluster(c: tuple, weighted: bool) -> None:
    """The (weighted) mean of points in a cap lies in that cap, and no farther from any point than the
    farthest pair: it is inside their spherical convex hull, even across the antimeridian or a pole."""
    centre, radius, pts, w = c
    mlat, mlon = spherical_mean(pts[:, 0], pts[:, 1], w if weighted else None)
    assert -90 <= mlat <= 90 and -180 <= mlon <= 180
    assert d(centre, (mlat, mlon)) <= radius + 1e-3
    spread = max(d(p, q) for p in pts for q in pts)
    assert max(d((mlat, mlon), p) for p in pts) <= spread + 1e-3


@SETTINGS
@given(cluster(), st.randoms())
def test_spherical_mean_ignores_order(c: tuple, rnd) -> None:
    _, _, pts, w = c
    order = list(range(len(pts)))
    rnd.shuffle(order)
    a = spherical_mean(pts[:, 0], pts[:, 1], w)
    b = spherical_mean(pts[order, 0], pts[order, 1], w[order])
    assert d(a, b) < 1e-3


@SETTINGS
@given(lats, st.floats(0.001, 10))
def test_spherical_mean_across_the_antimeridian(lat: float, e: float) -> None:
    assume(abs(lat) < 89)
    mlat, mlon = spherical_mean([lat, lat], [180 - e, -180 + e])
    assert abs(abs(mlon) - 180) < 1e-6  # not 0, the naive average of 179.x and -179.x
    assert d((mlat, mlon), (lat, 180.0)) <= 2 * e * math.pi / 180 * EARTH_RADIUS_KM


# -- coordinate parsing and the CSV readers ------------------------------------------------------------


@SETTINGS
@given(st.floats(-90, 90, allow_nan=False))
def test_parse_coord_round_trips_plain_numbers(v: float) -> None:
    for text in (repr(v), f"{v:.6f}", f"  {v} "):
        assert parse_coord(text, "lat", 90) == pytest.approx(float(text))


@SETTINGS
@given(st.text(max_size=30))
def test_parse_coord_is_a_number_in_range_or_a_value_error(text: str) -> None:
    try:
        v = parse_coord(text, "lat", 90)
    except ValueError as e:
        assert "lat" in str(e)
    else:
        assert math.isfinite(v) and abs(v) <= 90


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos the generated rows may name (and a folder named like one)."""
    d = tmp_path_factory.mktemp("csv_props")
    for name in ("a.jpg", "b.jpg", "c d.jpg", "é.jpg"):
        (d / name).write_bytes(jpeg_bytes())
    (d / "sub.jpg").mkdir()
    return d


cells = st.one_of(
    st.sampled_from(["a.jpg", "b.jpg", "c d.jpg", "é.jpg", "sub.jpg", "missing.jpg", "", "../a.jpg"]),
    st.sampled_from(["0", "-90", "90", "180", "-180", "90.0001", "1e3", "nan", "inf", "-inf", "1_0", " 12.5 "]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
rows = st.lists(st.lists(cells, min_size=0, max_size=6), max_size=12)
headers = st.one_of(
    st.just(["image", "lat", "lon", "author"]),
    st.just(["IMAGE", " Lat ", "lon"]),
    st.lists(st.sampled_from(["image", "lat", "lon", "author", "x", ""]), max_size=5),
)


def check_read(path: Path, folder: Path) -> None:
    """A CSV reader's answer is an InputError, or records that are all valid, unique, and accounted for."""
    try:
        records, report = read_photo_csv(path, folder)
    except InputError as e:
        assert str(path) in str(e)
        return
    assert report.total == len(records) + len(report.skipped)
    assert len({r.image for r in records}) == len(records)
    for r in records:
        assert math.isfinite(r.lat) and math.isfinite(r.lon) and abs(r.lat) <= 90 and abs(r.lon) <= 180
        assert r.path.is_file()
    for item, why in report.skipped:
        assert item and why


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(headers, rows)
def test_csv_reader_never_crashes_on_arbitrary_rows(folder: Path, header: list[str], body: list[list[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    path = folder / "rows.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    check_read(path, folder)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_csv_readers_never_crash_on_arbitrary_bytes(folder: Path, data: bytes) -> None:
    for path, content in ((folder / "raw.csv", data), (folder / "headed.csv", b"image,lat,lon\n" + data)):
        path.write_bytes(content)
        check_read(path, folder)
        try:
            lat, lon, report = read_coordinates(path)
        except InputError as e:
            assert str(path) in str(e)
        else:
            assert len(lat) == len(lon) == report.kept > 0
            assert np.all(np.abs(lat) <= 90) and np.all(np.abs(lon) <= 180)
