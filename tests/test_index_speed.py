"""The fast index build computes exactly what FAISS and the per-row definitions give (correctness only: speed is
measured by benchmarks/gallery_search.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np
import pytest

from geoswc.core.config import GalleryCodes
from geoswc.core.item_lines import item_line
from geoswc.gallery import files
from geoswc.gallery.codes import Codebook, train_codebook
from geoswc.gallery.files import GalleryWriter, load_gallery, row_digests
from geoswc.gallery.search import GalleryIdentity, item_key


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def _faiss_pq(cb: Codebook) -> faiss.ProductQuantizer:
    pq = faiss.ProductQuantizer(cb.dim, cb.m, 8)
    faiss.copy_array_to_vector(np.ascontiguousarray(cb.params["pq_centroids"].ravel()), pq.centroids)
    return pq


@pytest.mark.parametrize(("dim", "m"), [(80, 8), (160, 10), (64, 4), (64, 16)])  # sub-vectors of 10, 16, 16, 4
def test_pq_codes_are_faiss_codes(dim: int, m: int) -> None:
    x = _unit(3000, dim, dim + m)
    cb = train_codebook("pq", x[:1000], m, 0)
    assert np.array_equal(cb.encode(x), _faiss_pq(cb).compute_codes(x))


def test_pq_codes_settle_ties_and_bad_rows_as_faiss_does() -> None:
    """Rows on the boundary between two centroids (exact ties), duplicates, centroids themselves, NaN and inf."""
    dim, m = 40, 4
    cb = train_codebook("pq", _unit(1000, dim, 1), m, 0)
    c = cb.params["pq_centroids"]  # (m, 256, 10)
    mid = np.concatenate([(c[j, 0] + c[j, 1]) / 2 for j in range(m)])  # halfway between centroids 0 and 1
    exact = np.concatenate([c[j, 5] for j in range(m)])
    x = np.stack([mid, mid, exact, -exact, np.full(dim, np.nan), np.full(dim, np.inf), np.zeros(dim)]).astype(
        np.float32
    )
    x = np.concatenate([x, _unit(500, dim, 2)])
    assert np.array_equal(cb.encode(x), _faiss_pq(cb).compute_codes(x))


def test_pq_codes_take_ties_from_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a margin so wide that every sub-vector counts as a near-tie, FAISS's own coder codes them all (the
    fallback path gives the same bytes)."""
    from geoswc.gallery import codes

    x = _unit(600, 80, 3)
    cb = train_codebook("pq", x, 8, 0)
    monkeypatch.setattr(codes, "ROUNDING_MARGIN", 1e30)
    assert np.array_equal(cb.encode(x), _faiss_pq(cb).compute_codes(x))


@pytest.mark.parametrize("kind", ["sq8", "opq"])
def test_other_codes_are_faiss_codes(kind: str) -> None:
    x = _unit(1500, 80, 4)
    cb = train_codebook(kind, x[:1000], 8, 0)
    if kind == "sq8":
        sq = faiss.ScalarQuantizer(80, faiss.ScalarQuantizer.QT_8bit)
        faiss.copy_array_to_vector(np.ascontiguousarray(cb.params["sq_trained"].ravel()), sq.trained)
        want = sq.compute_codes(x)
    else:
        want = _faiss_pq(cb).compute_codes(np.ascontiguousarray(x @ cb.params["opq_matrix"].T, np.float32))
    assert np.array_equal(cb.encode(x), want)


def test_row_digests_are_each_rows_blake2b() -> None:
    rows = _unit(257, 48, 5).astype(np.float16)
    assert row_digests(rows).dtype == np.uint64
    one = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in rows]
    assert row_digests(rows).tolist() == one
    assert row_digests(rows[:0]).shape == (0,)


def _build(folder: Path, kind: str, n: int = 900, dim: int = 40) -> dict[str, str]:
    """An index of ``n`` photos in 3 chunks (cells interleaved across chunks), with ids and authors that need CSV
    quoting or are empty; returns each file's sha256."""
    rng = np.random.default_rng(7)
    x = _unit(n, dim, 6)
    cell = rng.integers(-1, 50, n)
    names = [f"p{i}{',' if i % 7 == 0 else ''}{chr(34) if i % 11 == 0 else ''}é.jpg" for i in range(n)]
    authors = ["" if i % 5 == 0 else f"u{i % 13}" + ("\n" if i % 17 == 0 else "") for i in range(n)]
    codes = GalleryCodes(kind=kind, pq_bytes=4, train_rows=256)
    with GalleryWriter(folder, dim, GalleryIdentity("m" * 16, "c" * 16, 50), codes) as w:
        for s in range(0, n, 300):
            w.add(x[s : s + 300], rng.uniform(-80, 80, 300), rng.uniform(-180, 180, 300), cell[s : s + 300],
                  names[s : s + 300], authors[s : s + 300])  # fmt: skip
        w.finish()
    g = load_gallery(folder, verify=True)
    order = np.argsort(cell, kind="stable")
    assert list(g.names) == [names[i] for i in order] and list(g.authors) == [authors[i] for i in order]
    items = (folder / "items.csv").read_bytes()
    assert items == b"image,author\n" + b"".join(item_line((names[i], authors[i])) for i in order)
    assert sorted(g.name_lookup[0].tolist()) == sorted(item_key(t) for t in names)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["flat", "pq"])
def test_batches_do_not_change_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The files are the same whatever the batch size of the compaction (one batch, or batches of 7 rows that cut
    cells and staged runs anywhere)."""
    whole = _build(tmp_path / "whole", kind)
    monkeypatch.setattr(files, "BATCH_ROWS", 7)
    assert _build(tmp_path / "small", kind) == whole


def test_item_keys_are_item_key_of_each_text():
    from geoswc.gallery.search import item_key, item_keys

    texts = ["a.jpg", "", 'ünïcode,"quoted"\n', "x" * 300]
    assert item_keys(texts).tolist() == [item_key(t) for t in texts]
    assert item_keys(texts, empty_is_zero=True).tolist() == [item_key(t) if t else 0 for t in texts]
    assert item_keys([]).shape == (0,)


@pytest.mark.parametrize("count", [1, 2])
def test_pq_codes_split_over_threads_are_faiss_codes(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Blocks of rows coded by several compute threads give the same bytes as FAISS (and as one thread)."""
    from geoswc.core import threads
    from geoswc.gallery import codes

    monkeypatch.setitem(threads._state, "count", count)
    monkeypatch.setattr(codes, "TABLE_ROWS", 256)  # 12 blocks
    x = _unit(3000, 80, 6)
    cb = train_codebook("pq", x[:1000], 8, 0)
    assert np.array_equal(cb.encode(x), _faiss_pq(cb).compute_codes(x))
