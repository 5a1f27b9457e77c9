"""The embedded default model: provenance (recipe, data digests, cells) and behaviour on real photos."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from geoswc.api import Geolocator, default_model_dir
from geoswc.cells import build_cells
from geoswc.config import CellConfig
from geoswc.geo import haversine_km
from geoswc.model import GeoModel

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEV = SHARED / "im2gps3k-dev"


def _build_script():
    spec = importlib.util.spec_from_file_location("build_default_model", ROOT / "scripts" / "build_default_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recipe() -> dict:
    return json.loads((ROOT / "recipes" / "default.json").read_text())


@pytest.fixture(scope="module")
def model() -> GeoModel:
    return GeoModel.load(default_model_dir())


@pytest.fixture(scope="module")
def geo() -> Geolocator:
    return Geolocator.load()


def test_default_model_is_shipped_inside_the_package_and_small():
    folder = default_model_dir()
    assert folder.is_relative_to(ROOT / "src" / "geoswc"), folder
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= 50, f"the embedded model takes {size_mb:.1f} MB"
    assert not list(folder.rglob("*.jpg")) and not list(folder.rglob("checkpoint*")), "photos or checkpoints shipped"


def test_recorded_recipe_is_the_recipe_in_the_repository(model, recipe):
    recorded = dict(model.config.recipe)
    recorded_digest = recorded.pop("digest")
    assert recorded == recipe, "recipes/default.json changed since the model was built: run `make default-model`"
    assert recorded_digest == _build_script().recipe_digest(recipe)


def test_model_config_matches_the_recipe(model, recipe):
    cfg = model.config
    assert cfg.backbone.name == recipe["backbone"]["backbone"]
    assert cfg.backbone.preprocess.image_size == recipe["backbone"]["image_size"]
    assert cfg.backbone.preprocess.resize == recipe["backbone"]["resize"]
    assert cfg.cells == CellConfig(**recipe["cells"])
    for section in ("train", "search", "heads"):
        have = getattr(cfg, section)
        for key, value in recipe[section].items():
            assert getattr(have, key) == value, f"{section}.{key}"


def test_shared_data_is_the_data_the_recipe_names(recipe):
    """The shipped model was built from exactly these files (sha256 in the recipe)."""
    assert _build_script().check_data(SHARED, recipe["data"]) == []


@pytest.mark.slow
def test_cells_rebuilt_from_mp16_coordinates_give_the_shipped_cells(model, recipe):
    path = SHARED / recipe["data"]["files"]["cell_coords"]
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    key = {k.lower(): k for k in rows[0]}
    lat = np.array([float(r[key["lat"]]) for r in rows])
    lon = np.array([float(r[key["lon"]]) for r in rows])
    table = build_cells(lat, lon, CellConfig(**recipe["cells"]))
    assert table.fingerprint == model.config.cells_fingerprint == model.cells.fingerprint


@pytest.mark.slow
def test_gallery_embeddings_are_the_models_embeddings_of_the_dev_photos(geo):
    """Re-embedding a few dev photos from their pixels gives the shipped gallery rows (float16 storage)."""
    gallery = geo.gallery
    assert len(gallery) == sum(1 for _ in (DEV / "images").iterdir())
    rows = [0, len(gallery) // 2, len(gallery) - 1]
    paths = [DEV / "images" / gallery.names[r] for r in rows]
    ((_, feats, bad),) = list(geo.iter_features(paths, batch_size=len(paths)))  # the inference path
    assert not bad
    with torch.inference_mode():
        _, emb = geo.model.heads(feats)
    shipped = np.asarray(gallery.embeddings[rows], np.float32)
    cos = (emb.numpy() * shipped).sum(1)
    assert np.all(cos > 0.999), cos
