"""The gallery index: memory-mapped round trips, streamed building, exact and coded (FAISS) search, and refusal
of damaged files."""

import hashlib
import json

import numpy as np
import pytest

from geoswc.core import atomic_files, json_records, tensor_files
from geoswc.core.config import GalleryCodes
from geoswc.core.errors import ArtifactError, InputError
from geoswc.gallery import files as gallery_files
from geoswc.gallery.files import GalleryWriter, load_gallery, save_gallery, temporary_gallery
from geoswc.gallery.search import Gallery, GalleryIdentity

N, D, C = 3000, 48, 12
IDENTITY = GalleryIdentity("model0000", "cells0000", C)


def _data(seed: int = 0, n: int = N):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((C, D))
    cell = rng.integers(-1, C, n)
    emb = centers[np.clip(cell, 0, None)] + 0.7 * rng.standard_normal((n, D))
    emb[5] = emb[6]  # exact duplicates: ties
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    names = [f"img{i}.jpg" for i in range(n)]
    names[7], names[8], names[9] = 'a,b "quoted".jpg', "line\nbreak.jpg", "ünïcode.jpg"
    authors = [f"auth{i % 97}" if i % 5 else "" for i in range(n)]
    authors[11] = "comma, author"
    return emb.astype(np.float32), rng.uniform(-60, 60, n), rng.uniform(-180, 180, n), cell, names, authors


def _gallery(seed: int = 0) -> Gallery:
    emb, lat, lon, cell, names, authors = _data(seed)
    return temporary_gallery([(emb, lat, lon, cell, names, authors)], D, IDENTITY)


def _brute(g: Gallery, q: np.ndarray, k: int, rows: np.ndarray, exclude=()) -> np.ndarray:
    rows = rows[~np.isin(rows, np.asarray(exclude, np.int64))]
    sims = g.embeddings[rows].astype(np.float32) @ q
    return rows[np.lexsort((rows, -sims))[:k]]


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_round_trip_is_memory_mapped_and_grouped_by_cell(tmp_path):
    g = _gallery()
    assert (np.diff(g.cell) >= 0).all() and g.embeddings.dtype == np.float16
    for c in range(C):
        a, b = g.cell_range(c)
        assert (g.cell[a:b] == c).all() and b - a == g.cell_sizes()[c]
    save_gallery(g, tmp_path / "idx")
    assert not list(tmp_path.glob("idx/.staging.*"))
    h = load_gallery(tmp_path / "idx")
    assert h.identity == IDENTITY
    assert isinstance(h.embeddings, np.memmap)
    assert (h.embeddings == g.embeddings).all() and (h.cell == g.cell).all()
    assert np.array_equal(h.lat, g.lat) and list(h.names) == list(g.names) and list(h.authors) == list(g.authors)
    assert h.names[-1] == g.names[-1] and h.names[1:3] == g.names[1:3]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["format"] == "geoswc-index/2" and meta["size"] == N and meta["dim"] == D
    from safetensors.numpy import load_file  # a standard safetensors file

    t = load_file(str(tmp_path / "idx" / "index.safetensors"))
    assert t["embeddings"].shape == (N, D) and (t["embeddings"] == g.embeddings).all()


def test_streamed_build_equals_one_shot_save(tmp_path):
    emb, lat, lon, cell, names, authors = _data()
    save_gallery(_gallery(), tmp_path / "one")
    with GalleryWriter(tmp_path / "stream", D, IDENTITY) as w:
        for s in range(0, N, 700):  # uneven chunks, each written sorted, then compacted
            w.add(
                emb[s : s + 700],
                lat[s : s + 700],
                lon[s : s + 700],
                cell[s : s + 700],
                names[s : s + 700],
                authors[s : s + 700],
            )
        w.finish()
    for f in ("index.safetensors", "items.csv"):
        assert _sha(tmp_path / "one" / f) == _sha(tmp_path / "stream" / f), f
    assert not list((tmp_path / "stream").glob(".staging.*"))


def test_search_is_exact(tmp_path):
    save_gallery(_gallery(), tmp_path / "idx")
    g = load_gallery(tmp_path / "idx")
    rng = np.random.default_rng(1)
    for t in range(40):
        q = rng.standard_normal(D).astype(np.float32)
        if t % 2:  # near a gallery photo: close scores at the top
            q = g.embeddings[rng.integers(N)].astype(np.float32) + 0.02 * q
        q /= np.linalg.norm(q)
        c = int(rng.integers(C))
        rows = g.cell_rows(c)
        ex = g.excluded_rows([g.names[int(rows[0])]], [g.authors[int(rows[1])]])
        idx, sim = g.search(q, 10, cells=[c], exclude=ex)
        assert (idx == _brute(g, q, 10, rows, ex)).all()
        assert np.allclose(sim, g.embeddings[idx].astype(np.float32) @ q, atol=1e-6)
        assert (g.search(q, 10)[0] == _brute(g, q, 10, np.arange(N))).all()
        cells = [c, (c + 3) % C]
        union = np.concatenate([g.cell_rows(x) for x in cells])
        assert (g.search(q, 10, cells=cells)[0] == _brute(g, q, 10, union)).all()
    assert g.search(q, 10, cells=[])[0].size == 0
    assert g.search(q, 10, cells=[C, -1, 10**9])[0].size == 0  # unknown cells hold nothing
    assert g.search(q, 10, cells=[0], exclude=g.cell_rows(0))[0].size == 0
    outside = np.flatnonzero(g.cell < 0)  # photos in no cell: found by whole-gallery searches only
    found = g.search(g.embeddings[outside[0]].astype(np.float32), 1)[0]
    assert outside.size and found[0] in outside


def test_excluded_rows_by_name_and_author(tmp_path):
    save_gallery(_gallery(), tmp_path / "idx")
    g = load_gallery(tmp_path / "idx")
    names = list(g.names)
    for special in ('a,b "quoted".jpg', "line\nbreak.jpg", "ünïcode.jpg"):
        assert special in names
        assert list(g.excluded_rows([special])) == [names.index(special)]
    by_author = g.excluded_rows(authors=["comma, author", "auth3"])
    expect = [i for i, a in enumerate(g.authors) if a in ("comma, author", "auth3")]
    assert list(by_author) == expect and len(expect) > 10
    assert g.excluded_rows(["nope.jpg"], ["", "nobody"]).size == 0


def test_truncated_or_tampered_index_is_refused(tmp_path):
    save_gallery(_gallery(), tmp_path / "idx")
    p = tmp_path / "idx" / "index.safetensors"
    good = p.read_bytes()
    p.write_bytes(good[: len(good) - 100])
    with pytest.raises(ArtifactError, match="truncated"):
        load_gallery(tmp_path / "idx")
    data_start = 8 + int.from_bytes(good[:8], "little")
    for pos in (20, data_start + 16, len(good) - 10):  # in the header, the positions, the embeddings
        bad = bytearray(good)
        bad[pos] ^= 0xFF
        p.write_bytes(bytes(bad))
        with pytest.raises(ArtifactError, match="damaged"):
            load_gallery(tmp_path / "idx")
    p.write_bytes(good)
    load_gallery(tmp_path / "idx")
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["max_norm"] = 0.5  # any field of index.json, even one no other check reads
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="damaged"):
        load_gallery(tmp_path / "idx")


def test_flat_index_verifies_every_block_at_load(tmp_path, monkeypatch):
    """FAISS copies a flat index's embeddings into its lists: a damaged row anywhere is refused at load."""
    monkeypatch.setattr(gallery_files, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(gallery_files, "EAGER_VERIFY_BYTES", 0)
    save_gallery(_gallery(), tmp_path / "idx")
    p = tmp_path / "idx" / "index.safetensors"
    bad = bytearray(p.read_bytes())
    bad[len(bad) - 3] ^= 0xFF  # the last row
    p.write_bytes(bytes(bad))
    with pytest.raises(ArtifactError, match="damaged"):
        load_gallery(tmp_path / "idx")


PQ = GalleryCodes(kind="pq", pq_bytes=12, rerank=40)


@pytest.mark.slow
@pytest.mark.parametrize(
    "codes",
    [GalleryCodes(kind="sq8", rerank=40), PQ, GalleryCodes(kind="opq", pq_bytes=12, rerank=40)],
    ids=lambda c: c.kind,
)
def test_coded_index_round_trip_recall_and_exclusion(tmp_path, codes):
    """A coded index holds ``code_size`` bytes a row in FAISS, re-ranks exactly, and honours the leakage guard."""
    g = _gallery()
    save_gallery(g, tmp_path / "idx", codes)
    h = load_gallery(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert h.codes == codes.kind and meta["codes"]["kind"] == codes.kind and h.rerank == 40
    assert h.lists.ivf.ntotal == N and h.lists.ivf.code_size == (D if codes.kind == "sq8" else 12)
    rng = np.random.default_rng(2)
    hits = total = 0
    for _ in range(30):
        i = int(rng.integers(N))
        q = h.embeddings[i].astype(np.float32) + 0.3 * rng.standard_normal(D).astype(np.float32)
        q /= np.linalg.norm(q)
        c = max(int(h.cell[i]), 0)
        ex = h.excluded_rows([h.names[i]], [h.authors[int(h.cell_rows(c)[3])]])
        idx, sim = h.search(q, 10, cells=[c], exclude=ex)
        assert not np.isin(idx, ex).any() and (h.cell[idx] == c).all()
        assert np.allclose(sim, h.embeddings[idx].astype(np.float32) @ q, atol=1e-6)  # exact scores, re-ranked
        assert (np.diff(sim) <= 0).all()
        truth = _brute(h, q, 10, h.cell_rows(c), ex)
        hits += np.isin(idx, truth).sum()
        total += truth.size
    assert hits / total >= 0.9  # ~250 rows a cell, 40 re-ranked


def test_coded_index_build_is_deterministic_and_streams(tmp_path):
    emb, lat, lon, cell, names, authors = _data()
    save_gallery(_gallery(), tmp_path / "one", PQ)
    with GalleryWriter(tmp_path / "stream", D, IDENTITY, PQ) as w:
        for s in range(0, N, 700):
            w.add(
                emb[s : s + 700],
                lat[s : s + 700],
                lon[s : s + 700],
                cell[s : s + 700],
                names[s : s + 700],
                authors[s : s + 700],
            )
        w.finish()
    for f in ("index.safetensors", "items.csv", "codes.safetensors"):
        assert _sha(tmp_path / "one" / f) == _sha(tmp_path / "stream" / f), f
    save_gallery(_gallery(), tmp_path / "one")  # rebuilt flat: the codes file goes
    assert not (tmp_path / "one" / "codes.safetensors").exists()
    assert load_gallery(tmp_path / "one").codes == "flat"


def test_tampered_codes_are_refused_before_faiss_reads_them(tmp_path):
    save_gallery(_gallery(), tmp_path / "idx", PQ)
    p = tmp_path / "idx" / "codes.safetensors"
    good = p.read_bytes()
    for bad in (good[:-8], good[:100] + bytes([good[100] ^ 1]) + good[101:], b"\xff" * len(good)):
        p.write_bytes(bad)
        with pytest.raises(ArtifactError, match="damaged or was changed"):
            load_gallery(tmp_path / "idx")
    p.unlink()
    with pytest.raises(ArtifactError, match="lacks codes.safetensors"):
        load_gallery(tmp_path / "idx")
    p.write_bytes(good)
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["codes"]["rerank"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="damaged"):  # the seal covers the codes' settings
        load_gallery(tmp_path / "idx")


def test_coded_index_verifies_rows_it_rescores(tmp_path, monkeypatch):
    """Large coded indexes check only metadata and codes at load; each re-scored row is checked on first read."""
    monkeypatch.setattr(gallery_files, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(gallery_files, "EAGER_VERIFY_BYTES", 0)
    g = _gallery()
    save_gallery(g, tmp_path / "idx", PQ)
    p = tmp_path / "idx" / "index.safetensors"
    last = C - 1
    a, _ = g.cell_range(last)
    bad = bytearray(p.read_bytes())
    bad[len(bad) - (N - a) * D * 2 + 1] ^= 0xFF  # the first row of the last cell
    p.write_bytes(bytes(bad))
    h = load_gallery(tmp_path / "idx")  # metadata and codes intact: opens
    q = np.ones(D, np.float32) / np.sqrt(D)
    h.search(q, 5, cells=[0])  # an intact cell far from the damage
    with pytest.raises(ArtifactError, match="damaged"):
        h.search(q, 300, cells=[last])
    with pytest.raises(ArtifactError, match="damaged"):
        load_gallery(tmp_path / "idx", verify=True)


def test_unchecked_rows_are_prefetched_once_a_run(tmp_path, monkeypatch):
    """A coded index asks the kernel for the file spans of the rows it re-scores for the first time: one span for
    a cell's rows, a span a run of nearby rows when they are spread over the file (never everything between)."""
    monkeypatch.setattr(gallery_files, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(gallery_files, "EAGER_VERIFY_BYTES", 0)
    g = _gallery()
    save_gallery(g, tmp_path / "idx", PQ)
    calls: list[list[tuple[int, int]]] = []
    real = tensor_files.prefetch
    monkeypatch.setattr(tensor_files, "prefetch", lambda path, spans: (calls.append(list(spans)), real(path, spans)))
    h = load_gallery(tmp_path / "idx")
    path = tmp_path / "idx" / "index.safetensors"
    row0 = path.stat().st_size - N * D * 2  # the embeddings are the file's last tensor
    q = np.ones(D, np.float32) / np.sqrt(D)
    h.search(q, 5, cells=[1])
    lo, hi = g.cell_range(1)
    assert len(calls) == 1 and len(calls[0]) == 1
    ((a, b),) = calls[0]
    assert row0 + lo * D * 2 <= a < b <= row0 + hi * D * 2 and (b - a) % (D * 2) == 0  # within the cell's rows
    h.search(q, 5, cells=[1])  # every re-scored row already checked: no request
    assert len(calls) == 1

    monkeypatch.setattr(gallery_files, "PREFETCH_GAP_BYTES", 4 * D * 2)  # rows up to 4 apart: one run
    rows = np.array([10, 11, 14, 100, 700, 702, 2000], np.int64)  # spread: runs, never the whole stretch
    h.checker.gather(rows)
    assert calls[-1] == [(row0 + 10 * D * 2, row0 + 15 * D * 2), (row0 + 700 * D * 2, row0 + 703 * D * 2)]
    h.checker.gather(rows)
    assert len(calls) == 2
    real(path, [(10, 10), (5, 1)])  # empty spans: nothing, no error
    real(tmp_path / "idx" / "gone.safetensors", [(0, 4096)])  # a hint: a missing file is not its error


def test_index_without_codes_entry_is_flat(tmp_path):
    """Indexes written before codes existed (no ``codes`` in index.json) load as exact flat indexes."""
    save_gallery(_gallery(), tmp_path / "idx")
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    del meta["codes"], meta[json_records.SEAL_KEY]
    atomic_files.write_json(meta_path, json_records.seal(meta))
    h = load_gallery(tmp_path / "idx")
    assert h.codes == "flat"
    q = h.embeddings[10].astype(np.float32)
    assert (h.search(q, 5)[0] == _brute(h, q, 5, np.arange(N))).all()


def test_codes_that_cannot_be_built_are_refused(tmp_path):
    with pytest.raises(InputError, match="--codes.pq_bytes must divide the embedding width 48"):
        GalleryWriter(tmp_path / "a", D, IDENTITY, GalleryCodes(kind="pq", pq_bytes=10))
    emb, lat, lon, cell, names, authors = _data(n=100)
    with GalleryWriter(tmp_path / "b", D, IDENTITY, PQ) as w:
        w.add(emb, lat, lon, cell, names, authors)
        with pytest.raises(InputError, match="at least 256 photos"):
            w.finish()
    assert not (tmp_path / "b" / "index.json").exists()
