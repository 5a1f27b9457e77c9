"""``errors_map.png``: where an evaluation's estimates went wrong, on a plain longitude-latitude map.

The top panel joins each photo's true position (a dot) to its estimate with a straight segment in longitude and
latitude, coloured by the error (log scale), taking the shorter way round and split at the antimeridian. The bottom
panel shows the accuracy at 750 km of each country (of the truth) as a dot at the spherical mean of its photos' true
positions, sized by its photo count. Country outlines are Natural Earth's (1:50m), from the world-atlas TopoJSON the
web service bundles (``service/static/vendor/world-atlas/countries-50m.json``, read as a data file). Drawn off-screen
with matplotlib's object API (Agg, no pyplot state), offline.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from geoswc.core.sphere import THRESHOLDS_KM, haversine_km, spherical_mean
from geoswc.evaluation.figures import figure, save_figure

WORLD_ATLAS = (
    Path(__file__).resolve().parents[1] / "service" / "static" / "vendor" / "world-atlas" / "countries-50m.json"
)
"""Natural Earth's country outlines (1:50m) as TopoJSON, bundled for the web service's map."""
MAP_KM = 750.0
"""The threshold of the per-country panel."""


def _mpl() -> Any:
    """The matplotlib classes a map is drawn with, imported when one is drawn."""
    from matplotlib import collections, colors, figure  # import-time cost (0.4 s): only drawing a map needs it

    return SimpleNamespace(
        LineCollection=collections.LineCollection,
        LogNorm=colors.LogNorm,
        Normalize=colors.Normalize,
        Figure=figure.Figure,
    )


@functools.lru_cache(maxsize=2)
def outline_arcs(path: Path = WORLD_ATLAS) -> list[np.ndarray]:
    """Every arc of a quantized TopoJSON file as ``(K, 2)`` lon, lat (country borders and coastlines), split where it
    jumps across the antimeridian; [] when the file is absent."""
    if not Path(path).is_file():
        return []
    topo = json.loads(Path(path).read_text(encoding="utf-8"))
    t = topo.get("transform")
    scale = np.array(t["scale"] if t else [1.0, 1.0])
    shift = np.array(t["translate"] if t else [0.0, 0.0])
    arcs = []
    for arc in topo["arcs"]:
        a = np.asarray(arc, np.float64)[:, :2]
        xy = (np.cumsum(a, axis=0) if t else a) * scale + shift
        jumps = np.flatnonzero(np.abs(np.diff(xy[:, 0])) > 180.0) + 1  # an arc cut at the antimeridian
        arcs += [p for p in np.split(xy, jumps) if len(p) > 1]
    return arcs


def antimeridian_segments(
    lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Straight segments in lon, lat from each ``(lat1, lon1)`` to ``(lat2, lon2)`` the shorter way round: ``(M, 2, 2)``
    segments (``[[lon, lat], [lon, lat]]``) and the index ``(M,)`` of the pair each comes from; a pair crossing the
    antimeridian gives two, split at +-180."""
    la1, lo1, la2, lo2 = (np.asarray(x, np.float64).ravel() for x in (lat1, lon1, lat2, lon2))
    d = lo2 - lo1
    lo2w = lo2 - 360.0 * np.round(d / 360.0)  # the shorter way: |lo2w - lo1| <= 180
    cross = np.abs(lo2w) > 180.0
    edge = np.where(lo2w > 180.0, 180.0, -180.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(cross, (edge - lo1) / (lo2w - lo1), 1.0)
    lat_c = la1 + t * (la2 - la1)
    end_lon = np.where(cross, edge, lo2)
    end_lat = np.where(cross, lat_c, la2)
    first = np.stack([np.stack([lo1, la1], -1), np.stack([end_lon, end_lat], -1)], 1)
    k = np.flatnonzero(cross)
    second = np.stack([np.stack([-edge[k], lat_c[k]], -1), np.stack([lo2[k], la2[k]], -1)], 1)
    return np.concatenate([first, second]), np.concatenate([np.arange(len(la1)), k])


def _outline(ax, arcs: list[np.ndarray]) -> None:
    ax.add_collection(_mpl().LineCollection(arcs, colors="0.6", linewidths=0.4, zorder=1))
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.tick_params(labelsize=9)


def country_points(countries: Sequence[str], lat: np.ndarray, lon: np.ndarray, errors: np.ndarray) -> list[tuple]:
    """``(country, mean lat, mean lon, photos, accuracy at MAP_KM)`` per country ("" and None entries skipped)."""
    arr = np.array([c or "" for c in countries], dtype=object)
    out = []
    for c in sorted(set(arr) - {""}):
        m = arr == c
        la, lo = spherical_mean(lat[m], lon[m])
        out.append((c, la, lo, int(m.sum()), float(np.mean(errors[m] <= MAP_KM))))
    return out


def _error_panel(fig: Any, ax: Any, arcs: list[np.ndarray], pos: tuple[np.ndarray, ...], title: str) -> np.ndarray:
    """Draw each photo's true position joined to its estimate, coloured by error; returns the errors ``(N,)`` km."""
    tl, tn, pl, pn = pos
    err = np.maximum(np.asarray(haversine_km(tl, tn, pl, pn), np.float64), 1.0)
    _outline(ax, arcs)
    segs, idx = antimeridian_segments(tl, tn, pl, pn)
    norm = _mpl().LogNorm(vmin=1.0, vmax=20000.0)
    order = np.argsort(-err[idx], kind="stable")  # small errors drawn last, on top
    lines = _mpl().LineCollection(segs[order], cmap="plasma_r", norm=norm, linewidths=0.7, alpha=0.7, zorder=2)
    lines.set_array(err[idx][order])
    ax.add_collection(lines)
    ax.scatter(tn, tl, s=4, c="black", linewidths=0, zorder=3, label="true position")
    bar = fig.colorbar(lines, ax=ax, shrink=0.7, pad=0.01)
    bar.set_ticks(list(THRESHOLDS_KM))
    bar.set_ticklabels([f"{int(t)} km" for t in THRESHOLDS_KM])
    bar.set_label("error (log scale)")
    ax.legend(loc="lower left", fontsize=9)
    ax.set_title(title, fontsize=13)
    return err


def plot_systems_errors(
    systems: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]], path: str | Path
) -> None:
    """Write one errors panel per system ``(name, true lat, true lon, predicted lat, predicted lon)``, side by side
    two to a row (``compare``'s ``errors_maps.png``)."""
    cols = min(2, len(systems))
    rows = -(-len(systems) // cols)
    fig = figure(figsize=(9 * cols, 5.2 * rows), dpi=90)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    arcs = outline_arcs()
    for ax, (name, *pos) in zip(axes, systems, strict=False):
        _error_panel(fig, ax, arcs, tuple(np.asarray(p, np.float64).ravel() for p in pos), name)
    for ax in axes[len(systems) :]:
        ax.set_axis_off()
    save_figure(fig, path)


def plot_errors_map(
    true_lat: ArrayLike,
    true_lon: ArrayLike,
    pred_lat: ArrayLike,
    pred_lon: ArrayLike,
    countries: Sequence[str],
    path: str | Path,
    title: str = "",
) -> None:
    """Write ``errors_map.png`` (1600 px wide): the error segments, then the accuracy at 750 km per country (the
    country of each photo's truth in ``countries``, "" for none)."""
    tl, tn, pl, pn = (np.asarray(x, np.float64).ravel() for x in (true_lat, true_lon, pred_lat, pred_lon))
    fig = figure(figsize=(16, 17), dpi=100)
    top, bottom = fig.subplots(2, 1)
    arcs = outline_arcs()
    err = _error_panel(
        fig, top, arcs, (tl, tn, pl, pn), title or f"Errors of {len(tl)} photos: true position to estimate"
    )
    _outline(bottom, arcs)
    pts = country_points(countries, tl, tn, err)
    if pts:
        _, la, lo, n, acc = (np.array(v) for v in zip(*pts, strict=True))
        sizes = 12 + 600 * np.sqrt(n / n.max())
        dots = bottom.scatter(
            lo,
            la,
            s=sizes,
            c=100 * acc,
            cmap="RdYlGn",
            norm=_mpl().Normalize(0, 100),
            edgecolors="k",
            linewidths=0.4,
            zorder=3,
        )
        cb = fig.colorbar(dots, ax=bottom, shrink=0.7, pad=0.01)
        cb.set_label(f"accuracy at {int(MAP_KM)} km (%)")
    bottom.set_title(f"Accuracy at {int(MAP_KM)} km per country of the truth (dot area: photos)", fontsize=13)
    save_figure(fig, path)
