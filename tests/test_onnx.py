"""The ONNX backbone runtime: exported features equal eager ones on a real photo, and a locate through it picks
the same cell. One export (about 10-20 s) is shared by the module."""

import json
import sys

import numpy as np
import pytest
import torch

from geoswc import Geolocator
from geoswc.core.errors import GeoswcError, InputError
from geoswc.data.records import loader
from geoswc.data.shards import photo_dataset
from geoswc.models.onnx_runtime import OnnxBackbone, cached_export, export_backbone

from .conftest import DEV_IMAGES, KAUAI, dev_rows


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache") / "onnx"  # the layout of $GEOSWC_CACHE_DIR/onnx


@pytest.fixture(scope="module")
def torch_geo():
    return Geolocator.load()


@pytest.fixture(scope="module")
def onnx_geo(torch_geo, cache):
    geo = Geolocator.load()
    geo.use_runtime("onnx", cache_dir=cache)
    return geo


def _images(geo: Geolocator, paths) -> torch.Tensor:
    ds = photo_dataset(list(paths), geo.model.config.backbone.preprocess)
    return torch.cat([b.images for b in loader(ds, 16) if b.images is not None])


@pytest.mark.shared_data
@pytest.mark.slow
def test_export_matches_eager_on_real_photos(torch_geo, onnx_geo, cache):
    assert onnx_geo.runtime == "onnx" and torch_geo.runtime == "torch"
    paths = [KAUAI] + [DEV_IMAGES / r["image"] for r in dev_rows(3, step=500)]
    x = _images(torch_geo, paths)
    assert x.shape == (4, 3, 224, 224)
    eager = torch_geo.backbone_features(x)
    fast = onnx_geo.backbone_features(x)
    assert fast.shape == eager.shape == (4, 1280) and fast.dtype == torch.float32
    err = (fast - eager).abs().max().item() / eager.abs().max().item()
    assert err < 1e-4, err
    assert torch.nn.functional.cosine_similarity(fast, eager).min().item() > 0.99999
    # any batch size (the batch axis is dynamic), single images included
    assert torch.allclose(onnx_geo.backbone_features(x[:1]), fast[:1], atol=1e-4)
    record = json.loads(next(cache.glob("backbone-*.json")).read_text())
    assert record["fingerprint"] == torch_geo.model.backbone_fingerprint and record["relative_error"] < 1e-3


@pytest.mark.shared_data
@pytest.mark.slow
def test_locate_through_onnx_gives_the_same_cell(torch_geo, onnx_geo):
    photos = [KAUAI] + [DEV_IMAGES / r["image"] for r in dev_rows(2, step=700)]
    a = list(torch_geo.locate_batch(photos, with_place=False))
    b = list(onnx_geo.locate_batch(photos, with_place=False))
    for p, q in zip(a, b, strict=True):
        assert p.cell == q.cell
        assert [n.image for n in p.neighbors] == [n.image for n in q.neighbors]
        assert (q.lat, q.lon) == pytest.approx((p.lat, p.lon), abs=1e-3)


@pytest.mark.slow
def test_export_cache_is_reused_and_checked(torch_geo, onnx_geo, cache):
    fp = torch_geo.model.backbone_fingerprint
    path = cached_export(cache, fp)
    assert path is not None and onnx_geo.runtime == "onnx"
    mtime = path.stat().st_mtime_ns
    assert export_backbone(torch_geo.model.backbone, fp, 224, cache) == path  # a cache hit: no export
    assert path.stat().st_mtime_ns == mtime
    damaged = cache / "damaged"
    damaged.mkdir()
    (damaged / path.name).write_bytes(path.read_bytes()[:1000])
    (damaged / path.with_suffix(".json").name).write_bytes(path.with_suffix(".json").read_bytes())
    assert cached_export(damaged, fp) is None  # a truncated graph is exported again, never run


@pytest.mark.slow
def test_cli_runtime_flag(torch_geo, onnx_geo, cache, monkeypatch, capsys):
    from geoswc.cli import main

    monkeypatch.setenv("GEOSWC_CACHE_DIR", str(cache.parent))  # reuse the module's export
    assert main(["locate", str(KAUAI), "--run.runtime", "onnx", "--format", "jsonl"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["cell"] == torch_geo.locate(KAUAI, with_place=False).cell


def test_clear_errors(torch_geo, monkeypatch):
    with pytest.raises(InputError, match="unknown runtime"):
        torch_geo.use_runtime("tensorrt")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(GeoswcError, match=r"pip install 'geoswc\[fast\]'"):
        OnnxBackbone(KAUAI, 1280)
    unopened = object.__new__(OnnxBackbone)
    with pytest.raises(InputError, match="B, 3, S, S"):
        unopened(torch.zeros(3, 224, 224))  # not a batch
    assert np.isfinite(torch_geo.locate(KAUAI, with_place=False).lat)  # torch runtime unaffected
