"""Search within cell: cluster the retrieved neighbours' positions and take the spherical mean of the
largest cluster. Pure NumPy, arrays in and out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from geoswc.core.sphere import EARTH_RADIUS_KM, spherical_mean


def cluster_positions(lat: ArrayLike, lon: ArrayLike, eps_km: float, min_samples: int = 1) -> NDArray[np.int64]:
    """DBSCAN on the sphere: labels ``(N,)`` of points ``(N,)`` in degrees; -1 is noise.

    Two points are neighbours when their great-circle distance is at most ``eps_km``; a point with at least
    ``min_samples`` neighbours (itself included) is a core point. The labels are scikit-learn's
    (``DBSCAN(metric="haversine")``): clusters numbered in the order of their first core point, a border point
    given to the first cluster whose expansion reaches it. With ``min_samples=1`` (the paper's setting) every
    point is a core point, so the clusters are the connected components of the "within eps_km" graph.
    ``O(N²)`` in NumPy: meant for the ``k`` neighbours of one photo (tens), where it is ~50x faster than a
    ball tree.
    """
    lat, lon = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    n = lat.size
    labels = np.full(n, -1, np.int64)
    if n == 0:
        return labels
    # The haversine "a" of every pair against that of eps: the same comparison a ball tree makes.
    a = (
        np.sin((lat[:, None] - lat[None, :]) / 2) ** 2
        + np.cos(lat)[:, None] * np.cos(lat)[None, :] * np.sin((lon[:, None] - lon[None, :]) / 2) ** 2
    )
    near = a <= np.sin(min(eps_km / EARTH_RADIUS_KM, np.pi) / 2) ** 2
    core = near.sum(1) >= min_samples
    neighbours = [np.flatnonzero(row) for row in near]
    label = 0
    for i in range(n):
        if labels[i] != -1 or not core[i]:
            continue
        stack = [i]
        while stack:  # depth first, as scikit-learn's dbscan_inner
            v = stack.pop()
            if labels[v] != -1:
                continue
            labels[v] = label
            if core[v]:
                stack.extend(int(u) for u in neighbours[v] if labels[u] == -1)
        label += 1
    return labels


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


def estimate_from_neighbors(
    lat: ArrayLike, lon: ArrayLike, similarity: ArrayLike, eps_km: float, min_samples: int = 1
) -> ClusterEstimate:
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


def _min_cos(r_km: float) -> float:
    """The cosine of the angle ``r_km`` spans: two unit vectors are within ``r_km`` when their dot product is at
    least this (``-1``: everywhere, for half the Earth's circumference or more)."""
    return float(np.cos(min(r_km / EARTH_RADIUS_KM, np.pi)))


def cells_within(cells_xyz: ArrayLike, chosen: int, r_km: float) -> NDArray[np.int64]:
    """The cells whose centroids lie within ``r_km`` of cell ``chosen``'s, ``chosen`` included: ``O(C)``, no
    structure kept between calls."""
    xyz = np.asarray(cells_xyz, np.float64)
    near = xyz @ xyz[chosen] >= _min_cos(r_km)
    near[chosen] = True
    return np.flatnonzero(near)


def prediction_density(probs: ArrayLike, cells_xyz: ArrayLike, chosen: int, r_km: float) -> float:
    """Confidence: the probability mass of the cells whose centroids lie within ``r_km`` of the chosen
    cell's centroid (the chosen cell included). In [0, 1]."""
    return densities(probs, cells_xyz, chosen, [r_km])[0]


def densities(probs: ArrayLike, cells_xyz: ArrayLike, chosen: int, radii_km: Sequence[float]) -> list[float]:
    """:func:`prediction_density` at each radius, from one product of the centroids ``(C, 3)``."""
    p = np.asarray(probs, np.float64)
    xyz = np.asarray(cells_xyz, np.float64)
    cos = xyz @ xyz[chosen]
    out = []
    for r in radii_km:
        near = cos >= _min_cos(r)
        near[chosen] = True
        out.append(min(max(float(p[near].sum()), 0.0), 1.0))
    return out


SELECT_CANDIDATES = 512
"""The most probable cells :func:`select_cell` weighs against each other (all of them in smaller tables)."""


def select_cell(probs: ArrayLike, cells_xyz: ArrayLike | None = None, r_km: float = 0.0) -> int:
    """The cell to search in: the most probable one (``r_km`` 0, as in the paper), or the cell with the most
    probability mass within ``r_km`` of its centroid, the Bayes choice for accuracy at that radius.

    With ``r_km > 0`` the candidates and the mass counted are those of the :data:`SELECT_CANDIDATES` most probable
    cells: exact for tables that size or smaller; in larger ones (MP-16's ~30k cells) the mass the classifier
    gives the remaining cells is left out, and the work is ``O(C + K²)`` per photo with no ``C × C`` structure.
    Ties go to the lowest cell index.
    """
    p = np.asarray(probs, np.float64)
    if r_km <= 0 or cells_xyz is None:
        return int(np.argmax(p))
    k = min(len(p), SELECT_CANDIDATES)
    cand = np.sort(np.argpartition(-p, k - 1)[:k]) if k < len(p) else np.arange(len(p))
    xyz = np.asarray(cells_xyz, np.float64)[cand]
    near = xyz @ xyz.T >= _min_cos(r_km)
    np.fill_diagonal(near, True)
    mass = near @ p[cand]
    return int(cand[np.flatnonzero(mass >= mass.max() - 1e-12)[0]])


def cell_prior(counts: ArrayLike, alpha: float = 0.5) -> NDArray[np.float64]:
    """The model's prior over cells ``(C,)``, from the gallery photos each cell holds ``(C,)``: the share of the
    photos it was trained to expect there (Laplace-smoothed by ``alpha``, so no cell has probability 0)."""
    n = np.asarray(counts, np.float64)
    return (n + alpha) / (n.sum() + alpha * len(n))


def prior_divergence(probs: ArrayLike, prior: ArrayLike) -> float:
    """KL(probs || prior) in nats: how far a photo moved the classifier's cell probabilities ``(C,)`` from the
    prior ``(C,)`` (0: the photo told it nothing; 1: the odds of the cells it favours changed e-fold)."""
    p, q = np.asarray(probs, np.float64), np.asarray(prior, np.float64)
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


@dataclass(frozen=True)
class PriorRule:
    """When an estimate is called no better than the model's prior: the photo moved the cell probabilities less
    than ``kl_nats`` from the prior (:func:`prior_divergence`), and no cluster of at least ``cluster_share`` of the
    ``k`` neighbours with a mean similarity of at least ``cluster_similarity`` agrees on a place.

    The defaults were chosen on the embedded model's development photos (2,244 located; see docs/trust.md,
    "No better than the prior"): 95 % of them are called prior-like and are within 25 km of the truth 0.3 % of
    the time, the rest 23 %. Similarities are the retrieval module's own scale: another model may need others."""

    kl_nats: float = 1.0
    cluster_share: float = 0.3
    cluster_similarity: float = 0.35

    def prior_like(self, kl_nats: float, signals: dict[str, float]) -> bool:
        """Whether a prediction with this divergence and these retrieval signals is the prior's guess."""
        agree = (
            signals.get("cluster_size", 0.0) >= self.cluster_share
            and signals.get("cluster_similarity", 0.0) >= self.cluster_similarity
        )
        return kl_nats < self.kl_nats and not agree
