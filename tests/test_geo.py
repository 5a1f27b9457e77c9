import numpy as np
import pytest

from geoswc.core.sphere import (
    EARTH_RADIUS_KM,
    haversine_km,
    latlon_to_xyz,
    spherical_mean,
    validate_latlon,
    xyz_to_latlon,
)

# Great-circle distances on a sphere of radius 6371.0088 km, computed independently with the spherical
# law of cosines in 30-digit arithmetic (mpmath); the commonly quoted city distances agree to < 0.5 %.
CITY_PAIRS = [
    ((51.5074, -0.1278), (48.8566, 2.3522), 343.557),  # London - Paris
    ((40.7128, -74.0060), (34.0522, -118.2437), 3935.752),  # New York - Los Angeles
    ((35.6762, 139.6503), (-33.8688, 151.2093), 7825.829),  # Tokyo - Sydney
    ((-33.9249, 18.4241), (-34.6037, -58.3816), 6869.763),  # Cape Town - Buenos Aires
]


@pytest.mark.parametrize("a,b,km", CITY_PAIRS)
def test_haversine_city_pairs(a, b, km):
    d = haversine_km(a[0], a[1], b[0], b[1])
    assert d == pytest.approx(km, abs=1e-3)
    assert haversine_km(b[0], b[1], a[0], a[1]) == pytest.approx(d)  # symmetric


def test_haversine_special_cases():
    assert haversine_km(10, 20, 10, 20) == 0.0
    # antipodes: half the circumference
    assert haversine_km(0, 0, 0, 180) == pytest.approx(np.pi * EARTH_RADIUS_KM)
    assert haversine_km(90, 0, -90, 0) == pytest.approx(np.pi * EARTH_RADIUS_KM)
    # across the antimeridian: 179.5 E to 179.5 W is 1 degree of longitude at the equator
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(np.radians(1) * EARTH_RADIUS_KM)
    # broadcasting
    d = haversine_km(np.zeros(3), np.zeros(3), np.array([0, 1, 2]), np.zeros(3))
    assert d.shape == (3,) and np.all(np.diff(d) > 0)


def test_xyz_round_trip():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-89, 89, 100), rng.uniform(-179, 179, 100)
    xyz = latlon_to_xyz(lat, lon)
    assert np.allclose(np.linalg.norm(xyz, axis=-1), 1.0)
    la, lo = xyz_to_latlon(xyz * 3.0)  # length does not matter
    assert np.allclose(la, lat) and np.allclose(lo, lon)


def test_spherical_mean_across_antimeridian():
    lat, lon = spherical_mean([0.0, 0.0], [179.0, -179.0])
    assert lat == pytest.approx(0.0, abs=1e-9)
    assert abs(lon) == pytest.approx(180.0)  # the naive mean of degrees would give 0 (wrong side of Earth)


def test_spherical_mean_weights_and_single_point():
    assert spherical_mean([12.5], [-45.0]) == pytest.approx((12.5, -45.0))
    lat, _ = spherical_mean([0.0, 10.0], [0.0, 0.0], weights=[3.0, 1.0])
    assert 0.0 < lat < 5.0


def test_validate_latlon():
    mask = validate_latlon([0, 91, -90, np.nan, 10], [0, 0, 180, 0, -181])
    assert mask.tolist() == [True, False, True, False, False]
