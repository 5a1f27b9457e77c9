"""Saved models, indexes, feature caches and cell tables: round trips, and refusals of damaged or foreign files."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from geoswc.core.config import CellConfig
from geoswc.core.errors import ArtifactError, ModelMismatchError
from geoswc.gallery.files import load_gallery
from geoswc.geo.cells import CellTable, build_cells
from geoswc.models.geomodel import GeoModel
from geoswc.prediction.geolocator import Geolocator
from geoswc.training.features import FeatureSet

from .conftest import MP16


@pytest.mark.slow
@pytest.mark.shared_data
def test_cells_build_save_load_round_trip(tmp_path):
    a = np.loadtxt(MP16, delimiter=",", skiprows=1)
    table = build_cells(a[:, 0], a[:, 1], CellConfig(max_per_cell=2000, min_per_cell=100))
    assert 50 < len(table) < 400
    assert table.count.max() <= 2000 and table.count.min() >= 100
    table.save(tmp_path / "c.csv")
    again = CellTable.load(tmp_path / "c.csv")
    assert again.fingerprint == table.fingerprint
    assert again.config == CellConfig(max_per_cell=2000, min_per_cell=100)  # from the .json sidecar
    # every point is assigned to the cell that contains it; its centroid is near
    idx = again.assign(a[:500, 0], a[:500, 1])
    kept = idx >= 0
    assert kept.mean() > 0.9
    counts = np.bincount(again.assign(a[:, 0], a[:, 1])[again.assign(a[:, 0], a[:, 1]) >= 0], minlength=len(again))
    assert (counts == again.count).all()


@pytest.mark.shared_data
def test_cell_sidecar_of_another_table_is_ignored(tmp_path):
    a = np.loadtxt(MP16, delimiter=",", skiprows=1)[:5000]
    build_cells(a[:, 0], a[:, 1], CellConfig(max_per_cell=500, min_per_cell=10)).save(tmp_path / "c.csv")
    other = build_cells(a[:, 0], a[:, 1], CellConfig(max_per_cell=1000, min_per_cell=10))
    (tmp_path / "c.csv").write_text(other.to_csv())  # the CSV replaced, the sidecar left behind
    assert CellTable.load(tmp_path / "c.csv").config is None


def test_model_records_the_cell_thresholds(tiny_workspace):
    """The tiny workspace's cells were built with 5000/200: the model config says so."""
    m = GeoModel.load(tiny_workspace["model"])
    assert m.config.cells == CellConfig(max_per_cell=5000, min_per_cell=200)
    assert m.cells.config == m.config.cells


def test_model_round_trip(tiny_workspace, tmp_path):
    m = GeoModel.load(tiny_workspace["model"])
    out = tmp_path / "copy"
    fp = m.save(out)
    assert fp == m.fingerprint
    m2 = GeoModel.load(out)
    assert m2.fingerprint == fp
    x = torch.randn(2, 1280)
    assert torch.allclose(m.heads(x)[0], m2.heads(x)[0])


def test_model_saved_before_a_config_field_existed_still_loads(tiny_workspace, tmp_path):
    """A model written by an older version lacks config fields added since (here ``search_km``, which
    came after the first release): it loads, with the field at its default, under the fingerprint it was
    saved with, so the indexes that record that fingerprint keep working. Tampering is still caught."""
    from geoswc.core.config import canonical_json, digest

    d = tmp_path / "old"
    shutil.copytree(tiny_workspace["model"], d, ignore=shutil.ignore_patterns("checkpoint*"))
    meta = json.loads((d / "config.json").read_text())
    del meta["config"]["search"]["search_km"]
    assert meta["config"]["backbone"] and "search_km" not in canonical_json(meta["config"])
    # What the older version wrote: the same digest recipe over the config it knew.
    heads = GeoModel.load(tiny_workspace["model"], with_backbone=False).head_tensors()
    from geoswc.core.tensor_files import state_digest

    meta["fingerprint"] = digest(canonical_json(meta["config"]), meta["backbone_fingerprint"], state_digest(heads))
    (d / "config.json").write_text(json.dumps(meta))

    m = GeoModel.load(d)
    assert m.fingerprint == meta["fingerprint"] != GeoModel.load(tiny_workspace["model"]).fingerprint
    assert m.config.search.search_km == 0.0
    assert m.gallery_identity.model_fingerprint == meta["fingerprint"]  # what a gallery it embeds records
    meta["config"]["search"]["k"] = 7  # an edit by hand is still refused
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="fingerprint"):
        GeoModel.load(d)


@pytest.mark.parametrize(
    "target,damage",
    [
        ("heads.safetensors", "flip"),
        ("heads.safetensors", "truncate"),
        ("cells.csv", "flip"),
        ("config.json", "edit"),
        ("config.json", "truncate"),
        ("heads.safetensors", "delete"),
    ],
)
def test_damaged_model_is_refused(tiny_workspace, tmp_path, target, damage):
    d = tmp_path / "m"
    shutil.copytree(tiny_workspace["model"], d, ignore=shutil.ignore_patterns("checkpoint*"))
    p = d / target
    if damage == "flip":
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x01
        p.write_bytes(bytes(b))
    elif damage == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "delete":
        p.unlink()
    else:
        cfg = json.loads(p.read_text())
        cfg["config"]["search"]["k"] = 99
        p.write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError):
        GeoModel.load(d)


def test_damaged_index_is_refused(tiny_workspace, tmp_path):
    d = tmp_path / "idx"
    shutil.copytree(tiny_workspace["model"] / "index", d)
    Geolocator.load(tiny_workspace["model"], d)  # intact: fine
    (d / "items.csv").write_text("image,author\nx,y\n")
    with pytest.raises(ArtifactError, match="damaged"):
        load_gallery(d)


def test_geolocator_refuses_foreign_gallery(tiny_workspace):
    """The one compatibility check: a gallery of another model, or grouped by other cells, is refused."""
    geo = Geolocator.load(tiny_workspace["model"])
    ident = geo.gallery.identity
    for other in (
        dataclasses.replace(ident, model_fingerprint="somebodyelse0000"),
        dataclasses.replace(ident, cells_fingerprint="othercells000000"),
    ):
        with pytest.raises(ModelMismatchError, match="rebuild it with `geoswc index`"):
            Geolocator(geo.model, dataclasses.replace(geo.gallery, identity=other))


def test_feature_cache_round_trip_and_damage(tiny_workspace, tmp_path):
    fs = FeatureSet.load(tiny_workspace["features"])
    assert fs.features.shape[1] == 2 and len(fs) == len(fs.names)
    d = tmp_path / "f"
    fs.save(d)
    again = FeatureSet.load(d)
    assert torch.equal(again.features, fs.features) and again.names == fs.names
    # loaded caches stay float16 on disk, memory-mapped copy-on-write: writing to them leaves the file alone
    assert again.features.dtype == torch.float16
    before = (d / "features.safetensors").read_bytes()
    again.features[0, 0, 0] = 123.0
    del again
    assert (d / "features.safetensors").read_bytes() == before
    assert torch.equal(FeatureSet.load(d).features, fs.features)
    (d / "items.csv").write_text("image,author,lat,lon\n")
    with pytest.raises(ArtifactError):
        FeatureSet.load(d)


def test_not_a_model(tmp_path):
    with pytest.raises(ArtifactError, match="config.json"):
        Geolocator.load(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="not a geoswc model"):
        GeoModel.load(tmp_path)
