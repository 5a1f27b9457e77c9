"""Feature caches streamed to disk: rows staged as they come, written in key order from one or several parts,
in memory that does not grow with the rows."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoswc.core import item_lines
from geoswc.core.config import BackboneConfig, to_dict
from geoswc.core.errors import ArtifactError
from geoswc.training.feature_files import CacheInfo, FeatureWriter, write_cache
from geoswc.training.features import FeatureSet

VIEWS, DIM = 2, 16


def _info() -> CacheInfo:
    return CacheInfo(to_dict(BackboneConfig(feature_dim=DIM)), "fp", VIEWS, DIM, 7)


def _rows(keys: np.ndarray) -> np.ndarray:
    """Rows that say which key they belong to: ``(k, V, D)``, row k holding k % 1000 + view / 4 (exact in float16)."""
    return (keys[:, None, None] % 1000 + np.arange(VIEWS)[None, :, None] / 4 + np.zeros(DIM)).astype(np.float16)


def _add(w: FeatureWriter, keys: np.ndarray) -> None:
    w.add(keys, _rows(keys), [f"p{k}.jpg" for k in keys], [f"a,{k % 3}" for k in keys], keys / 100.0, -keys / 50.0)


def test_rows_in_any_order_come_out_in_key_order(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.permutation(1000)
    with FeatureWriter(tmp_path, VIEWS, DIM) as w:
        for chunk in np.array_split(keys, 7):
            _add(w, chunk)
        assert w.finish(_info(), progress=False) == 1000
    fs = FeatureSet.load(tmp_path)
    expect = np.arange(1000)
    assert np.array_equal(fs.features.numpy(), _rows(expect))
    assert fs.names == [f"p{k}.jpg" for k in expect] and fs.authors == [f"a,{k % 3}" for k in expect]
    assert np.array_equal(fs.lat, expect / 100.0) and np.array_equal(fs.lon, -expect / 50.0)
    assert (fs.views, fs.seed, fs.backbone_fingerprint) == (VIEWS, 7, "fp")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "the staging folder is removed"


def test_parts_with_interleaved_keys_merge_like_one(tmp_path):
    """torchrun's ranks stage every world-th row; rank 0 writes the cache from the parts: the same bytes as one
    process writing all the rows."""
    parts = []
    for r in range(3):
        w = FeatureWriter(tmp_path / "parts" / str(r), VIEWS, DIM)
        _add(w, np.arange(r, 500, 3)[::-1].copy())  # each part in its own (reversed) order
        part = w.part()
        part.save_index()
        parts.append(type(part).load(part.folder))
    (tmp_path / "merged").mkdir()
    assert write_cache(tmp_path / "merged", parts, _info(), progress=False) == 500
    with FeatureWriter(tmp_path / "one", VIEWS, DIM) as w:
        _add(w, np.arange(500))
        w.finish(_info(), progress=False)
    for name in ("features.safetensors", "items.csv", "features.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_writing_holds_a_chunk_not_the_cache(tmp_path):
    """40k rows of 1 KiB (40 MiB): staging and writing trace well under the cache's size."""
    n, chunk = 40_000, 1000
    tracemalloc.start()
    try:
        with FeatureWriter(tmp_path, 2, 256) as w:
            for s in range(0, n, chunk):
                keys = np.arange(s, s + chunk)
                w.add(
                    keys,
                    np.ones((chunk, 2, 256), np.float16),
                    [f"{k}" for k in keys],
                    [""] * chunk,
                    np.zeros(chunk),
                    np.zeros(chunk),
                )
            w.finish(CacheInfo(to_dict(BackboneConfig(feature_dim=256)), "fp", 2, 256, 0), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "features.safetensors").stat().st_size > n * 1024
    assert peak < 12 * 2**20, f"{peak / 2**20:.1f} MiB traced"


def test_a_changed_byte_is_refused(tmp_path):
    with FeatureWriter(tmp_path, VIEWS, DIM) as w:
        _add(w, np.arange(10))
        w.finish(_info(), progress=False)
    data = bytearray((tmp_path / "features.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "features.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="damaged|changed"):
        FeatureSet.load(tmp_path)


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(texts, texts, st.floats(-90, 90), st.floats(-180, 180)), max_size=30),
    scan=st.integers(1, 64),
)
def test_a_loaded_photo_list_reads_back_any_names_and_authors(rows, scan, tmp_path_factory):
    """Names and authors with commas, quotes, newlines and any script come back exactly from the in-place
    reading of ``items.csv``, whatever the scan's block size (rows straddling blocks)."""
    folder = tmp_path_factory.mktemp("cache")
    n = len(rows)
    with FeatureWriter(folder, VIEWS, DIM) as w:
        w.add(
            np.arange(n),
            _rows(np.arange(n)),
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
        )
        w.finish(_info(), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(item_lines, "SCAN_BYTES", scan)
        fs = FeatureSet.load(folder)
    assert list(fs.names) == [r[0] for r in rows] and list(fs.authors) == [r[1] for r in rows]
    assert fs.lat.tolist() == [r[2] for r in rows] and fs.lon.tolist() == [r[3] for r in rows]


def test_the_photo_list_of_a_loaded_cache_takes_bytes_not_objects(tmp_path):
    """The names and authors of a loaded cache are read in place: one offset a photo, no string per photo."""
    keys = np.arange(20_000)
    with FeatureWriter(tmp_path, VIEWS, DIM) as w:
        _add(w, keys)
        w.finish(_info(), progress=False)
    tracemalloc.start()
    fs = FeatureSet.load(tmp_path)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert fs.names[12_345] == "p12345.jpg" and fs.authors[-1] == f"a,{19_999 % 3}"
    assert held < 40 * len(keys)  # offsets and positions: 24 bytes a photo (strings would take over 100)
