import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoswc.core.sphere import haversine_km, latlon_to_xyz
from geoswc.prediction.swc import cluster_positions, estimate_from_neighbors, largest_cluster, prediction_density


def offsets(lat0, lon0, km, n, rng):
    """n points scattered within ~km of (lat0, lon0)."""
    dlat = rng.uniform(-km, km, n) / 111.195
    dlon = rng.uniform(-km, km, n) / (111.195 * np.cos(np.radians(lat0)))
    return lat0 + dlat, lon0 + dlon


def test_dbscan_finds_planted_clusters():
    rng = np.random.default_rng(0)
    a = offsets(48.8584, 2.2945, 0.2, 6, rng)  # Eiffel Tower, within 200 m
    b = offsets(48.8606, 2.3376, 0.2, 3, rng)  # Louvre, ~3 km away
    c = ([40.6892], [-74.0445])  # Statue of Liberty
    lat = np.concatenate([a[0], b[0], c[0]])
    lon = np.concatenate([a[1], b[1], c[1]])
    labels = cluster_positions(lat, lon, eps_km=1.0, min_samples=1)
    assert len(set(labels[:6])) == 1 and len(set(labels[6:9])) == 1
    assert len(set(labels)) == 3 and -1 not in labels
    # a bigger eps merges Eiffel and Louvre, not New York
    merged = cluster_positions(lat, lon, eps_km=5.0)
    assert len(set(merged[:9])) == 1 and merged[9] != merged[0]
    # min_samples > 1 turns the isolated point into noise
    assert cluster_positions(lat, lon, eps_km=1.0, min_samples=2)[9] == -1


@settings(max_examples=150, deadline=None)
@given(
    centre=st.tuples(st.floats(-89, 89), st.floats(-180, 180)),
    spread_km=st.floats(0.01, 50),
    n=st.integers(1, 25),
    eps_km=st.floats(0.05, 20),
    min_samples=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_dbscan_labels_match_scikit_learn(centre, spread_km, n, eps_km, min_samples, seed):
    """The NumPy DBSCAN gives scikit-learn's labels (numbering and border points included) on clumps of points
    anywhere on the sphere, the poles and the antimeridian included."""
    from sklearn.cluster import DBSCAN

    from geoswc.core.sphere import EARTH_RADIUS_KM

    rng = np.random.default_rng(seed)
    lat, lon = offsets(centre[0], centre[1], spread_km, n, rng)
    lat = np.clip(lat, -90, 90)
    lon = (lon + 180) % 360 - 180
    x = np.radians(np.stack([lat, lon], 1))
    db = DBSCAN(eps=eps_km / EARTH_RADIUS_KM, min_samples=min_samples, metric="haversine", algorithm="ball_tree")
    expected = db.fit_predict(x)
    a = (
        np.sin((x[:, None, 0] - x[None, :, 0]) / 2) ** 2
        + np.cos(x[:, None, 0]) * np.cos(x[None, :, 0]) * np.sin((x[:, None, 1] - x[None, :, 1]) / 2) ** 2
    )
    margin = np.abs(a - np.sin(eps_km / EARTH_RADIUS_KM / 2) ** 2)
    if margin.min() < 1e-15:  # a pair exactly at eps: either answer is right
        return
    np.testing.assert_array_equal(cluster_positions(lat, lon, eps_km, min_samples), expected)


def test_estimate_is_spherical_mean_of_largest_cluster():
    rng = np.random.default_rng(1)
    a = offsets(-33.8568, 151.2153, 0.3, 7, rng)  # Sydney Opera House
    lat = np.concatenate([a[0], [35.6586, 35.6590, 35.6595]])  # Tokyo x3
    lon = np.concatenate([a[1], [139.7454, 139.7450, 139.7449]])
    sim = np.concatenate([np.full(7, 0.5), [0.9, 0.9, 0.9]])  # Tokyo more similar but fewer
    est = estimate_from_neighbors(lat, lon, sim, eps_km=1.0)
    assert haversine_km(est.lat, est.lon, -33.8568, 151.2153) < 0.4
    # the mean is the normalised mean vector
    m = latlon_to_xyz(a[0], a[1]).mean(0)
    m /= np.linalg.norm(m)
    assert np.allclose(latlon_to_xyz(est.lat, est.lon), m, atol=1e-9)
    assert (est.labels[:7] == est.cluster).all()


def test_cluster_ties_go_to_similarity():
    labels = np.array([0, 0, 1, 1, 2])
    assert largest_cluster(labels, [0.1, 0.1, 0.5, 0.5, 0.99]) == 1
    assert largest_cluster(np.array([-1, -1]), [0.3, 0.4]) == -1


def test_all_noise_falls_back_to_most_similar():
    est = estimate_from_neighbors([0.0, 10.0, 20.0], [0.0, 10.0, 20.0], [0.2, 0.9, 0.1], eps_km=1.0, min_samples=2)
    assert est.cluster == -1 and (est.lat, est.lon) == (10.0, 10.0)


def test_prediction_density():
    cells = latlon_to_xyz([48.85, 48.95, 52.52, -33.86], [2.35, 2.35, 13.40, 151.2])  # Paris, +11 km, Berlin, Sydney
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    assert prediction_density(probs, cells, 0, 25.0) == pytest.approx(0.7)
    assert prediction_density(probs, cells, 0, 1000.0) == pytest.approx(0.9)
    assert prediction_density(probs, cells, 3, 0.0) == pytest.approx(0.1)


def test_cell_selection_and_neighbourhoods():
    from geoswc.prediction.swc import cells_within, select_cell

    cells = latlon_to_xyz([48.85, 48.95, 52.52, -33.86], [2.35, 2.35, 13.40, 151.2])
    probs = np.array([0.3, 0.3, 0.05, 0.35])
    assert cells_within(cells, 0, 25.0).tolist() == [0, 1] and cells_within(cells, 3, 0.0).tolist() == [3]
    assert cells_within(cells, 2, 1000.0).tolist() == [0, 1, 2]
    assert select_cell(probs) == 3  # the most probable cell: Sydney
    assert select_cell(probs, cells, 25.0) == 0  # but 60 % of the mass is around Paris (a tie: the lower index)
    assert select_cell(probs, cells, 1000.0) == 0  # Paris, Paris and Berlin (878 km away) tie at 65 %
    assert select_cell([0.05, 0.3, 0.3, 0.35], cells, 1000.0) == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), r_km=st.sampled_from([25.0, 300.0, 2000.0]))
def test_cell_selection_equals_the_dense_computation(seed, r_km):
    """On tables up to SELECT_CANDIDATES cells the choice is exact: the argmax of every cell's mass within
    r_km, computed here the slow way."""
    from geoswc.prediction.swc import SELECT_CANDIDATES, select_cell

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    lat, lon = rng.uniform(-80, 80, n), rng.uniform(-180, 180, n)
    xyz = latlon_to_xyz(lat, lon)
    probs = rng.dirichlet(np.full(n, 0.1))
    d = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    mass = (d <= r_km) @ probs
    assert n <= SELECT_CANDIDATES
    assert mass[select_cell(probs, xyz, r_km)] == pytest.approx(mass.max(), abs=1e-9)


def test_densities_at_several_radii_match_one_at_a_time():
    from geoswc.prediction.swc import densities

    rng = np.random.default_rng(3)
    lat, lon = rng.uniform(-80, 80, 300), rng.uniform(-180, 180, 300)
    xyz = latlon_to_xyz(lat, lon)
    p = rng.dirichlet(np.ones(300))
    radii = [0.0, 25.0, 750.0, 2500.0, 30000.0]
    got = densities(p, xyz, 7, radii)
    for r, g in zip(radii, got, strict=True):
        near = haversine_km(lat, lon, lat[7], lon[7]) <= r + 1e-6
        assert g == pytest.approx(min(1.0, p[near].sum()), abs=1e-9) and g == prediction_density(p, xyz, 7, r)
    assert got[0] == pytest.approx(p[7]) and got[-1] == pytest.approx(1.0)
