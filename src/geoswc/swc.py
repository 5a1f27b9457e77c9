"""Search within cell: cluster the retrieved neighbours' positions and take the spherical mean of the
largest cluster. Pure NumPy / scikit-learn, arrays in and out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import sparse
from sklearn.cluster import DBSCAN

from .geo import EARTH_RADIUS_KM, points_within, sklearn_haversine_points, spherical_mean, xyz_to_latlon


def cluster_positions(lat: ArrayLike, lon: ArrayLike, eps_km: float, min_samples: int = 1) -> NDArray[np.int64]:
    """DBSCAN on the sphere (haversine metric on radians). Labels ``(N,)``; -1 is noise.

    With ``min_samples=1`` (the paper's setting) every point is a core point, so the clusters are the
    connected components of the "within eps_km" graph and there is no noise.
    """
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if lat.size == 0:
        return np.zeros(0, np.int64)
    X = sklearn_haversine_points(lat, lon)
    db = DBSCAN(eps=eps_km / EARTH_RADIUS_KM, min_samples=min_samples, metric="haversine", algorithm="ball_tree")
    return db.fit_predict(X).astype(np.int64)


def largest_cluster(labels: ArrayLike, similarity: ArrayLike) -> int:
    """Label of the cluster with most members; ties go to the larger summed similarity, then to the
    cluster of the most similar neighbour. Returns -1 when every point is noise."""
    labels, sim = np.asarray(labels), np.asarray(similarity, np.float64)
    best, best_key = -1, None
    for lab in np.unique(labels[labels >= 0]):
        m = labels == lab
        key = (int(m.sum()), float(sim[m].sum()), float(sim[m].max()))
        if best_key is None or key > best_key:
            best, best_key = int(lab), key
    return best


@dataclass
class ClusterEstimate:
    """Where the neighbours point: the estimate and how it was reached."""

    lat: float
    lon: float
    labels: NDArray[np.int64]
    """DBSCAN label of each neighbour, ``(k,)``."""
    cluster: int
    """The chosen label (-1: all noise, the most similar neighbour's position was used)."""


def estimate_from_neighbors(lat: ArrayLike, lon: ArrayLike, similarity: ArrayLike, eps_km: float,
                            min_samples: int = 1) -> ClusterEstimate:
    """The spherical mean of the largest DBSCAN cluster of the neighbours ``(k,)``.

    If DBSCAN labels every neighbour noise (possible only with ``min_samples > 1``), the most similar
    neighbour's position is returned.
    """
    lat, lon, sim = np.asarray(lat, np.float64), np.asarray(lon, np.float64), np.asarray(similarity, np.float64)
    if lat.size == 0:
        raise ValueError("estimate_from_neighbors needs at least one neighbour")
    labels = cluster_positions(lat, lon, eps_km, min_samples)
    chosen = largest_cluster(labels, sim)
    if chosen < 0:
        i = int(np.argmax(sim))
        return ClusterEstimate(float(lat[i]), float(lon[i]), labels, -1)
    m = labels == chosen
    mlat, mlon = spherical_mean(lat[m], lon[m])
    return ClusterEstimate(mlat, mlon, labels, chosen)


def prediction_density(probs: ArrayLike, cells_xyz: ArrayLike, chosen: int, r_km: float) -> float:
    """Confidence: the probability mass of the cells whose centroids lie within ``r_km`` of the chosen
    cell's centroid (the chosen cell included). In [0, 1]."""
    probs, xyz = np.asarray(probs, np.float64), np.asarray(cells_xyz, np.float64)
    cos = np.clip(xyz @ xyz[chosen], -1.0, 1.0)
    near = np.arccos(cos) * EARTH_RADIUS_KM <= r_km
    near[chosen] = True
    return float(np.clip(probs[near].sum(), 0.0, 1.0))


def neighborhood(cells_xyz: ArrayLike, r_km: float) -> sparse.csr_matrix:
    """Sparse ``(C, C)`` 0/1 matrix: entry ``(i, j)`` is 1 when cell j's centroid lies within ``r_km`` of cell
    i's (the diagonal always). ``neighborhood @ probs`` gives every cell's prediction density at once."""
    rows = points_within(*xyz_to_latlon(cells_xyz), r_km)
    indptr = np.cumsum([0] + [len(r) + 1 for r in rows])
    indices = np.concatenate([np.append(r, i) for i, r in enumerate(rows)]) if len(rows) else np.zeros(0, int)
    m = sparse.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(rows), len(rows)))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def select_cell(probs: ArrayLike, hood: sparse.csr_matrix | None = None) -> int:
    """The cell to search in: the most probable one (``hood`` None, as in the paper), or the cell with the
    most probability mass within the neighbourhood radius, the Bayes choice for accuracy at that radius."""
    p = np.asarray(probs, np.float64)
    return int(np.argmax(p if hood is None else hood @ p))
