"""The Python API on the tiny model: every input kind, the methods, the leakage guard, the fallback."""

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from geoswc import Geolocator
from geoswc.core.errors import ImageError, InputError
from geoswc.core.sphere import haversine_km
from geoswc.data.images import ImageLimits
from geoswc.prediction.calibration import LocalizableRule
from geoswc.prediction.geolocator import LocateFailure
from geoswc.training.features import FeatureSet

from .conftest import DEV_IMAGES, KAUAI, gps_exif, jpeg_bytes


@pytest.fixture(scope="module")
def geo(tiny_workspace):
    return Geolocator.load(tiny_workspace["model"])


@pytest.mark.slow
def test_sources_agree(geo):
    data = KAUAI.read_bytes()
    a = geo.locate(KAUAI, with_place=False)
    b = geo.locate(data, with_place=False)
    c = geo.locate(io.BytesIO(data), with_place=False)
    d = geo.locate(Image.open(KAUAI).convert("RGB"), with_place=False)
    for p in (b, c, d):  # the same pixels, whatever the source: the same answer
        assert p.cell == a.cell and (p.lat, p.lon) == pytest.approx((a.lat, a.lon), abs=1e-6)
        assert p.confidence == pytest.approx(a.confidence, abs=1e-6)
    assert a.image == str(KAUAI) and b.image == "<image>"


@pytest.mark.slow
def test_prediction_contents(geo):
    p = geo.locate(KAUAI)
    assert -90 <= p.lat <= 90 and -180 <= p.lon <= 180
    assert 0 < p.confidence <= 1 and p.cell_probability <= 1
    probs = [c.probability for c in p.top_cells]
    assert probs == sorted(probs, reverse=True) and len(probs) == 5
    assert p.top_cells[0].token == p.cell  # select_km = 0: the most probable cell
    assert p.place is not None and p.place.country and p.place.distance_km >= 0
    # retrieval searches the whole gallery, so it always has neighbours to cluster
    r = geo.locate(KAUAI, method="retrieval")
    assert not r.fallback and len(r.neighbors) == geo.search.k
    sims = [n.similarity for n in r.neighbors]
    assert sims == sorted(sims, reverse=True)
    assert r.cluster >= 0 and r.agreeing == [n for n in r.neighbors if n.cluster == r.cluster]
    assert max(haversine_km(r.lat, r.lon, n.lat, n.lon) for n in r.agreeing) < 5 * geo.search.eps_km
    d = p.to_dict()
    assert set(d) >= {"lat", "lon", "confidence", "top_cells", "neighbors", "place", "exif", "cluster"}
    for q in (p, r):  # the fast conversion gives what dataclasses.asdict gives, and shares no list with q
        assert q.to_dict() == dataclasses.asdict(q)
    d["top_cells"][0]["polygon"].append((0.0, 0.0))
    assert p.top_cells[0].polygon != d["top_cells"][0]["polygon"]


def test_exif_gps_is_reported(geo):
    p = geo.locate(jpeg_bytes((300, 200), exif=gps_exif(21.9, -159.6)), with_place=False)
    assert p.exif is not None
    assert p.exif.lat == pytest.approx(21.9, abs=1e-5)
    assert p.exif.distance_km == pytest.approx(haversine_km(p.lat, p.lon, 21.9, -159.6))


def test_bad_input_raises_clear_error_and_batch_carries_on(geo, tmp_path):
    with pytest.raises(ImageError, match="empty"):
        geo.locate(b"")
    out = list(geo.locate_batch([b"not an image", KAUAI, b""], with_place=False))
    assert isinstance(out[0], LocateFailure) and out[0].kind == "unsupported"
    assert not isinstance(out[1], LocateFailure)
    assert isinstance(out[2], LocateFailure) and out[2].kind == "empty"


def test_methods_and_leakage_guard(geo, tiny_workspace):
    fs = FeatureSet.load(tiny_workspace["features"])
    feats = fs.features[:8, 0]
    # without the guard, a gallery photo finds itself: similarity ~1, zero error
    open_ = geo.predict_features(feats, "retrieval")
    assert all(p.neighbors[0].similarity > 0.99 for p in open_)
    assert np.allclose([p.neighbors[0].lat for p in open_], fs.lat[:8], atol=1e-6)
    guarded = geo.predict_features(feats, "retrieval", names=fs.names[:8])
    for p, name in zip(guarded, fs.names[:8], strict=True):
        assert name not in [n.image for n in p.neighbors]
    by_author = geo.predict_features(feats, "swc", names=fs.names[:8], exclude_authors=fs.authors[:8])
    items = dict(zip(geo.gallery.names, geo.gallery.authors, strict=True))
    for p, a in zip(by_author, fs.authors[:8], strict=True):
        assert all(items[n.image] != a for n in p.neighbors)
    cls = geo.predict_features(feats, "classification")
    assert all(not p.neighbors for p in cls)
    with pytest.raises(InputError, match="unknown method"):
        geo.predict_features(feats, "nearest")


def test_empty_cell_falls_back_to_centroid(geo, tiny_workspace):
    sizes = geo.gallery.cell_sizes()
    empty = int(np.nonzero(sizes == 0)[0][0])
    # steer the classifier to the empty cell: a feature vector that only its logit row likes
    w = geo.model.mvmf.fc.weight.detach()
    x = (w[empty] - w.mean(0)) * 1e4
    p = geo.predict_features(x[None], "swc")[0]
    assert p.cell == geo.model.cells.tokens[empty]
    assert p.fallback and not p.neighbors
    assert (p.lat, p.lon) == (geo.model.cells.lat[empty], geo.model.cells.lon[empty])


def test_no_gallery_only_classification(tiny_workspace):
    geo = Geolocator(Geolocator.load(tiny_workspace["model"], index_dir=None).model)
    with pytest.raises(InputError, match="needs a gallery"):
        geo.predict_features(torch.zeros(1, 1280), "swc")
    assert geo.predict_features(torch.zeros(1, 1280), "classification")[0].cell


def test_real_photo_batch(geo):
    photos = sorted(DEV_IMAGES.iterdir())[:5]
    out = list(geo.locate_batch(photos, batch_size=2, with_place=False))
    assert [p.image for p in out] == [str(p) for p in photos]


def test_without_a_backbone_only_features_can_be_located(tiny_workspace, tmp_path):
    from geoswc.core.errors import GeoswcError

    geo = Geolocator.load(tiny_workspace["model"], with_backbone=False)
    for call in (lambda: geo.locate(KAUAI), lambda: list(geo.locate_shards(tmp_path))):
        with pytest.raises(GeoswcError, match="without a backbone"):
            call()
    fs = FeatureSet.load(tiny_workspace["features"])
    assert len(geo.predict_features(fs.features[:2, 0].float(), "classification")) == 2


def test_settings_are_read_only_and_with_settings_makes_another(tiny_workspace):
    """Search, rule and limits are given when a locator is made; another locator shares the model and gallery."""
    geo = Geolocator.load(tiny_workspace["model"])
    for name in ("search", "rule", "limits", "gallery", "model", "calibrator"):
        with pytest.raises(AttributeError):
            setattr(geo, name, getattr(geo, name))
    search = dataclasses.replace(geo.search, k=geo.search.k + 1)
    limits = ImageLimits(max_bytes=1 << 20)
    other = geo.with_settings(search=search, limits=limits, rule=LocalizableRule(within_km=25.0))
    assert (other.search, other.limits, other.rule.within_km) == (search, limits, 25.0)
    assert geo.search.k == search.k - 1 and geo.limits != limits and geo.rule.within_km != 25.0
    assert other.model is geo.model and other.gallery is geo.gallery and other.calibrator is geo.calibrator
