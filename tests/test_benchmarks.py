"""Smoke test of the cross-validation benchmark (the README's table comes from it) on 40 real photos."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from geoswc.cells import build_cells
from geoswc.config import CellConfig
from geoswc.data import read_coordinates
from geoswc.geo import haversine_km

from .conftest import DEV_IMAGES, MP16, ROOT, dev_rows, write_csv


def _load_cv():
    spec = importlib.util.spec_from_file_location("cross_validation", ROOT / "benchmarks" / "cross_validation.py")
    mod = sys.modules["cross_validation"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.shared_data
def test_cross_validation_quick_run(tmp_path, capsys):
    cv = _load_cv()
    rows = dev_rows(40, step=53)
    csv_path = write_csv(tmp_path / "dev.csv", rows)
    out = tmp_path / "cv.json"
    changes = {"cells": {"cells": {"max_per_cell": 5000, "min_per_cell": 200}}, "features": {"views": 1},
               "train": {"search": {"select_km": 2000}}}
    assert cv.main(["--out", str(out), "--data.csv", str(csv_path), "--data.images", str(DEV_IMAGES), "--cache",
                    str(tmp_path / "cache"), "--quick", "true", "--changes", json.dumps(changes),
                    "--also", "[{select_km: 0}]"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 40 and result["folds"] == 2 and result["views"] == 1 and result["cells"] > 10
    assert result["recipe"]["train"]["search"]["select_km"] == 2000 and result["search"]["select_km"] == 2000
    assert list(result["methods"]) == ["swc", "swc select_km=0", "classification", "retrieval", "raw 1-NN",
                                       "cell prior"]
    for r in result["methods"].values():
        assert r["n"] == 40 and all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert list(r["accuracy"].values()) == sorted(r["accuracy"].values())  # monotone in the threshold
    assert "| cell prior |" in (tmp_path / "cv.md").read_text() and "| swc |" in capsys.readouterr().out

    # The prior row is the constant guess: recompute its median error from the cells alone.
    la, lo, _ = read_coordinates(MP16)
    cells = build_cells(la, lo, CellConfig(5000, 200))
    c = cv.cell_prior(cells, 2000.0)
    lat = np.array([float(r["lat"]) for r in rows])
    lon = np.array([float(r["lon"]) for r in rows])
    err = haversine_km(lat, lon, cells.lat[c], cells.lon[c])
    assert abs(result["methods"]["cell prior"]["median_km"] - float(np.median(err))) < 1e-6
    assert cv.cell_prior(cells, 0.0) == int(np.argmax(cells.count))
