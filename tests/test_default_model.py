"""The embedded default model: provenance (recipe, data digests, cells) and behaviour on real photos."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from geoswc.core.sphere import haversine_km
from geoswc.data.records import read_coordinates
from geoswc.geo.cells import build_cells
from geoswc.models.geomodel import GeoModel
from geoswc.prediction.geolocator import Geolocator, default_model_dir
from geoswc.recipes import Recipe

from .conftest import ROOT, SHARED, load_script

DEV = SHARED / "im2gps3k-dev"


def _build_script():
    return load_script("scripts", "build_default_model")


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return Recipe.load(ROOT / "recipes" / "default.yaml")


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
    assert recorded == recipe.content, "recipes/default.yaml changed since the model was built: make default-model"
    assert recorded_digest == recipe.digest


def test_model_config_matches_the_recipe(model, recipe):
    """Each step's section, parsed as its command parses it, is what the model records."""
    cfg = model.config
    features = recipe.arguments("features", data={"csv": "x.csv"}, out="f")
    want = features["backbone"].resolve()
    assert (cfg.backbone.name, cfg.backbone.preprocess) == (want.name, want.preprocess)
    assert cfg.cells == recipe.arguments("cells", coords="c.csv", out="c.csv")["cells"]
    train = recipe.arguments("train", features="f", cells="c.csv", out="m")
    assert (cfg.train, cfg.heads, cfg.search) == (train["train"], train["heads"], train["search"])


@pytest.mark.shared_data
def test_shared_data_is_the_data_the_recipe_names(recipe):
    """The shipped model was built from exactly these files (sha256 in the recipe)."""
    assert _build_script().check_data(SHARED, recipe.content["data"]) == []


@pytest.mark.shared_data
@pytest.mark.slow
def test_cells_rebuilt_from_mp16_coordinates_give_the_shipped_cells(model, recipe):
    lat, lon, _ = read_coordinates(SHARED / recipe.content["data"]["files"]["cell_coords"])
    table = build_cells(lat, lon, recipe.arguments("cells", coords="c.csv", out="c.csv")["cells"])
    assert table.fingerprint == model.config.cells_fingerprint == model.cells.fingerprint


@pytest.mark.shared_data
@pytest.mark.slow
def test_gallery_embeddings_are_the_models_embeddings_of_the_dev_photos(geo):
    """Re-embedding a few dev photos from their pixels gives the shipped gallery rows (float16 storage)."""
    gallery = geo.gallery
    assert len(gallery) == sum(1 for _ in (DEV / "images").iterdir())
    rows = [0, len(gallery) // 2, len(gallery) - 1]
    paths = [DEV / "images" / gallery.names[r] for r in rows]
    ((batch, feats),) = list(geo.iter_features(paths, batch_size=len(paths)))  # the inference path
    assert not batch.bad
    with torch.inference_mode():
        _, emb = geo.model.heads(feats)
    shipped = np.asarray(gallery.embeddings[rows], np.float32)
    cos = (emb.numpy() * shipped).sum(1)
    assert np.all(cos > 0.999), cos


def _every_500th_dev_row() -> list[dict[str, str]]:
    with (DEV / "im2gps3k-dev.csv").open(newline="") as f:
        return list(csv.DictReader(f))[::500]


@pytest.mark.shared_data
def test_a_gallery_photo_retrieves_itself_unless_its_name_guards_against_it(geo):
    """Any photo of the embedded model's gallery (the development photos), located from its own pixels by
    retrieval over the whole gallery, finds itself first: its own row, similarity 1 (the gallery stores the
    model's embedding of these pixels), at the coordinates of the development CSV. Named as itself, the leakage
    guard hides it and the other k neighbours are returned.

    Selection rule, fixed in advance and blind to the outcome: every 500th row of ``im2gps3k-dev.csv``, from
    the first (rows 0, 500, 1000, 1500, 2000).
    """
    rows = _every_500th_dev_row()
    names = [r["image"] for r in rows]
    assert len(rows) == 5
    ((batch, feats),) = list(geo.iter_features([DEV / "images" / n for n in names], batch_size=len(names)))
    assert not batch.bad
    k = geo.search.k
    for r, p in zip(rows, geo.predict_features(feats, "retrieval"), strict=True):
        assert len(p.neighbors) == k, r["image"]
        first = p.neighbors[0]
        assert first.image == r["image"] and geo.gallery.names[first.row] == r["image"], (r["image"], first)
        assert first.similarity == pytest.approx(1.0, abs=1e-3)
        assert all(n.similarity < first.similarity - 1e-3 for n in p.neighbors[1:]), r["image"]
        assert (first.lat, first.lon) == pytest.approx((float(r["lat"]), float(r["lon"])), abs=1e-4)
    for r, p in zip(rows, geo.predict_features(feats, "retrieval", names=names), strict=True):
        assert len(p.neighbors) == k and r["image"] not in {n.image for n in p.neighbors}, r["image"]


@pytest.mark.slow
def test_pq_coded_copy_of_the_shipped_index_finds_the_exact_neighbours(geo, tmp_path):
    """The shipped gallery re-coded as 64-byte FAISS pq codes: within-cell searches (re-ranking 100 candidates
    exactly) mostly return the flat index's neighbours, and the example photo gets the same answer.

    The quantiser learns from the gallery's 2,245 vectors only (FAISS advises 9,984 for 256 centroids), so the
    recall is lower than at MP-16 scale (see benchmarks/gallery_search.py): small galleries are for flat codes."""
    from geoswc.core.config import GalleryCodes
    from geoswc.gallery.files import load_gallery, save_gallery

    flat = geo.gallery
    save_gallery(flat, tmp_path / "pq", GalleryCodes(kind="pq", pq_bytes=64, rerank=100))
    pq = load_gallery(tmp_path / "pq")
    assert pq.codes == "pq" and pq.lists.ivf.code_size == 64 and len(pq) == len(flat)
    rows = np.random.default_rng(0).choice(len(flat), 60, replace=False)
    same = 0
    for r in rows:
        q = np.asarray(flat.embeddings[r], np.float32)
        cell, ex = int(flat.cell[r]), flat.excluded_rows([flat.names[int(r)]])
        a, _ = flat.search(q, 10, cells=[cell], exclude=ex)
        b, _ = pq.search(q, 10, cells=[cell], exclude=ex)
        same += np.isin(b, a).sum() / max(1, a.size)
    assert same / len(rows) >= 0.85
    flat_answer = geo.locate(ROOT / "examples" / "kauai.png")
    pq_answer = Geolocator(geo.model, pq).locate(ROOT / "examples" / "kauai.png")
    assert haversine_km(flat_answer.lat, flat_answer.lon, pq_answer.lat, pq_answer.lon) < 1.0


@pytest.mark.shared_data
def test_shipped_calibrator_was_fitted_out_of_fold_for_this_model(model):
    """The calibrator beside the model is tied to its fingerprint, fitted on 5 author-disjoint folds of the
    development split (every row of its CSV), and its cross-fitted report is the one committed under
    benchmarks/results/calibration."""
    from geoswc.prediction.calibration import CALIBRATION_FILE, Calibrator

    with (DEV / "im2gps3k-dev.csv").open(newline="") as f:
        dev_photos = sum(1 for _ in csv.DictReader(f))
    cal = Calibrator.load(default_model_dir() / CALIBRATION_FILE)
    assert cal.model == model.fingerprint
    assert (
        cal.fitted["folds"] == 5
        and cal.fitted["n"] == dev_photos
        and set(cal.methods) == {"swc", "classification", "retrieval"}
    )
    report = json.loads((ROOT / "benchmarks" / "results" / "calibration" / "calibration.json").read_text())
    assert report["model"] == model.fingerprint
    assert report["calibration"] == cal.fitted["cross_fitted"]["calibration"]
    assert report["selective"] == cal.fitted["cross_fitted"]["selective"]
