"""Gallery thumbnails (``geoswc index --thumbnails``): how they are made (bounded, upright, no metadata), stored
(rows in the gallery's order, absent rows), verified (a damaged thumbnail is an integrity error, never served),
refused settings, the embedded default without any, and the service's ``GET /api/thumbnails/{row}``."""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from geoswc.core.config import GalleryCodes
from geoswc.core.errors import ArtifactError, ImageError, InputError, SettingError
from geoswc.gallery import thumbnails as th
from geoswc.gallery.files import GalleryWriter, load_gallery, save_gallery
from geoswc.gallery.search import Gallery, GalleryIdentity
from geoswc.prediction.geolocator import Geolocator, default_model_dir

from .conftest import DEV_CSV, DEV_IMAGES, KAUAI, dev_rows, write_csv

D, C = 8, 4
IDENTITY = GalleryIdentity("model0000", "cells0000", C)
SMALL = th.ThumbnailSettings(64)


def _jpeg_info(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _tile(r: int, g: int) -> bytes:
    """A thumbnail whose colour names the photo it stands for: red ``r``, green ``g``."""
    return th.make_thumbnail(Image.new("RGB", (90, 60), (r, g, 50)), SMALL)


def _write(folder: Path, chunks: int = 3, n: int = 7, thumbs: bool = True, seed: int = 0) -> None:
    """A gallery of ``chunks * n`` photos named ``p{chunk}_{i}`` whose thumbnail colour is ``(40 i, 80 chunk)``;
    photo ``i == 2`` of each chunk has none."""
    rng = np.random.default_rng(seed)
    with GalleryWriter(folder, D, IDENTITY, thumbnails=SMALL if thumbs else None) as w:
        for c in range(chunks):
            emb = rng.standard_normal((n, D))
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            tiles = [None if i == 2 else _tile(40 * i, 80 * c) for i in range(n)] if thumbs else None
            w.add(
                emb,
                rng.uniform(-50, 50, n),
                rng.uniform(-50, 50, n),
                rng.integers(-1, C, n),
                [f"p{c}_{i}" for i in range(n)],
                [""] * n,
                tiles,
            )
        w.finish()


# -- making one ------------------------------------------------------------------------------------------


def test_thumbnail_is_small_upright_baseline_and_carries_no_metadata() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90° clockwise to view"
    exif[0x010F] = "SecretCameraMaker"
    sideways = Image.open(KAUAI).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", quality=95, exif=exif.tobytes(), progressive=True, icc_profile=b"\0" * 128)
    data = th.make_thumbnail(buf.getvalue(), th.ThumbnailSettings(128))
    img = _jpeg_info(data)
    w, h = Image.open(KAUAI).size
    assert img.format == "JPEG" and max(img.size) == 128
    assert (img.size[0] > img.size[1]) == (w > h), "EXIF orientation applied: the thumbnail is upright"
    assert not img.info.get("progressive") and not img.info.get("progression")
    assert "exif" not in img.info and "icc_profile" not in img.info
    assert b"Exif" not in data and b"SecretCameraMaker" not in data
    assert len(data) <= th.MAX_BYTES


@settings(max_examples=15, deadline=None)
@given(
    side=st.integers(th.MIN_SIDE, th.MAX_SIDE),
    w=st.integers(1, 1500),
    h=st.integers(1, 1500),
    seed=st.integers(0, 2**16),
)
def test_thumbnail_bounds_hold_for_any_photo(side: int, w: int, h: int, seed: int) -> None:
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # the worst case for JPEG
    data = th.make_thumbnail(Image.fromarray(noise), th.ThumbnailSettings(side))
    img = _jpeg_info(data)
    assert len(data) <= th.MAX_BYTES and max(img.size) <= side and img.mode == "RGB"


def test_photos_that_cannot_be_thumbnailed_are_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("bad.jpg", "empty.jpg", "missing.jpg"):
        with pytest.raises(ImageError):
            th.make_thumbnail(tmp_path / name, SMALL)


@pytest.mark.parametrize("side", [-1, 1, th.MIN_SIDE - 1, th.MAX_SIDE + 1, 10**9])
def test_bad_sizes_are_refused(side: int) -> None:
    with pytest.raises(SettingError, match="thumbnails must be 0"):
        th.check_side(side)
    assert th.check_side(0) == 0 and th.check_side(128) == 128


def test_cli_refuses_bad_thumbnail_settings_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from geoswc.cli import main

    model = str(default_model_dir())
    cases = [
        (["--data.images", str(tmp_path), "--thumbnails", "5"], "32..512"),
        (["--data.images", str(tmp_path), "--thumbnails", "abc"], "thumbnails"),
        (["--data.shards", str(tmp_path / "s-{000000..000001}.tar"), "--thumbnails", "64"], "shards"),
        (["--features", str(tmp_path / "features"), "--thumbnails", "64"], "--data.images"),
    ]
    for args, says in cases:
        assert main(["index", "--model", model, "--out", str(tmp_path / "idx"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "--thumbnails" in err and says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "idx").exists()


def test_photo_paths_keep_to_the_image_folder(tmp_path: Path) -> None:
    from geoswc.data.records import path_under

    assert path_under(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
    for name in ("../x.jpg", "a/../../x.jpg", "/etc/passwd"):
        assert path_under(tmp_path, name) is None, name
    settings = th.ThumbnailSettings(64)  # the folder itself, or nothing, is no photo: no thumbnail, no crash
    assert th.thumbnails_of([path_under(tmp_path, "."), path_under(tmp_path, "")], [".", ""], settings) == [None, None]


def test_thumbnails_of_reports_each_bad_photo_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copy(KAUAI, tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="geoswc.gallery.thumbnails"):
        out = th.thumbnails_of([tmp_path / "good.png", tmp_path / "bad.jpg", None], ["good", "bad", "outside"], SMALL)
    assert out[0] is not None and out[1] is None and out[2] is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "bad" in warned[0] and "outside" in warned[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_thumbnail_stream_keeps_the_order_and_reports_bad_photos_in_this_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    """``thumbnail_stream`` (index --features --thumbnails): one thumbnail or None per name, in order, made by
    ``workers`` processes; the warnings are logged here, one per bad photo."""
    for i in range(5):
        Image.new("RGB", (120 + 10 * i, 90), (40 * i, 200 - 30 * i, 90)).save(tmp_path / f"p{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    names = ["p0.png", "bad.jpg", "p1.png", "../p2.png", "p2.png", "gone.png", "p3.png", "p4.png"]
    with caplog.at_level(logging.WARNING, logger="geoswc.gallery.thumbnails"):
        out = list(th.thumbnail_stream(tmp_path, names, SMALL, workers))
    warned = [r.getMessage() for r in caplog.records]
    assert [x is None for x in out] == [False, True, False, True, False, True, False, False]
    assert len(warned) == 3 and all(
        w.startswith(f"no thumbnail for {n}:")
        for w, n in zip(warned, ["bad.jpg", "../p2.png", "gone.png"], strict=True)
    ), warned
    assert out == th.thumbnails_of([tmp_path / n if ".." not in n else None for n in names], names, SMALL)


# -- storing and reading ------------------------------------------------------------------------------------


def test_round_trip_follows_the_cell_sort_and_marks_absent_rows(tmp_path: Path) -> None:
    _write(tmp_path / "idx")
    g = load_gallery(tmp_path / "idx")
    assert g.thumbnails is not None and len(g.thumbnails) == len(g) == 21 and g.thumbnails.count == 18
    assert (np.diff(g.cell) >= 0).all()
    for row in range(len(g)):
        c, i = (int(x) for x in g.names[row][1:].split("_"))
        data = g.thumbnail(row)
        assert g.has_thumbnail(row) == (i != 2)
        if i == 2:
            assert data is None
        else:
            assert data == _tile(40 * i, 80 * c), f"row {row} ({g.names[row]}) got another photo's thumbnail"
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())["thumbnails"]
    assert (
        meta["max_side"] == 64
        and meta["count"] == 18
        and meta["bin_bytes"] == (tmp_path / "idx" / th.BIN_FILE).stat().st_size
    )
    for bad in (-1, len(g), 10**12):
        with pytest.raises(InputError, match="out of range"):
            g.thumbnail(bad)
    save_gallery(g, tmp_path / "copy")  # a copy keeps them, row for row
    h = load_gallery(tmp_path / "copy")
    assert [h.thumbnail(r) for r in range(len(h))] == [g.thumbnail(r) for r in range(len(g))]


def test_index_without_thumbnails_is_unchanged(tmp_path: Path) -> None:
    _write(tmp_path / "plain", thumbs=False)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["index.json", "index.safetensors", "items.csv"]
    assert "thumbnails" not in json.loads((tmp_path / "plain" / "index.json").read_text())
    g = load_gallery(tmp_path / "plain")
    assert g.thumbnails is None and g.thumbnail(0) is None and not g.has_thumbnail(0)
    _write(tmp_path / "re", thumbs=True)
    _write(tmp_path / "re", thumbs=False)  # rebuilt without: the earlier thumbnails go
    assert not (tmp_path / "re" / th.BIN_FILE).exists() and not (tmp_path / "re" / th.TABLE_FILE).exists()
    assert load_gallery(tmp_path / "re").thumbnails is None


def test_embedded_default_ships_no_thumbnails() -> None:
    folder = default_model_dir() / "index"
    assert not (folder / th.BIN_FILE).exists() and not (folder / th.TABLE_FILE).exists()
    g = load_gallery(folder)
    assert g.thumbnails is None and g.thumbnail(0) is None


def test_writer_wants_a_thumbnail_per_photo_exactly_when_it_stores_them(tmp_path: Path) -> None:
    one = np.ones((1, D)) / np.sqrt(D)
    with GalleryWriter(tmp_path / "a", D, IDENTITY, thumbnails=SMALL) as w, pytest.raises(InputError):
        w.add(one, [0.0], [0.0], [0], ["x"], [""])
    with GalleryWriter(tmp_path / "b", D, IDENTITY) as w, pytest.raises(InputError):
        w.add(one, [0.0], [0.0], [0], ["x"], [""], [None])
    with GalleryWriter(tmp_path / "c", D, IDENTITY, thumbnails=SMALL) as w, pytest.raises(InputError):
        w.add(one, [0.0], [0.0], [0], ["x"], [""], [b"\xff" * (SMALL.max_bytes + 1)])


def test_tampered_thumbnail_is_an_integrity_error_and_the_others_still_read(tmp_path: Path) -> None:
    _write(tmp_path / "idx")
    g = load_gallery(tmp_path / "idx")
    row = next(r for r in range(len(g)) if g.has_thumbnail(r))
    start, _ = g.thumbnails.span(row)  # type: ignore[union-attr]
    path = tmp_path / "idx" / th.BIN_FILE
    data = bytearray(path.read_bytes())
    data[start + 40] ^= 0x01  # same size: only the row's digest can tell
    path.write_bytes(bytes(data))
    g = load_gallery(tmp_path / "idx")  # the .bin is not hashed whole at load
    with pytest.raises(ArtifactError, match=f"row {row} .*fails its digest"):
        g.thumbnail(row)
    others = [r for r in range(len(g)) if g.has_thumbnail(r) and r != row]
    assert all(g.thumbnail(r) is not None for r in others)


@pytest.mark.parametrize("how", ["truncate_bin", "flip_table", "drop_table", "drop_bin", "edit_record"])
def test_damaged_thumbnail_files_are_refused_at_load(tmp_path: Path, how: str) -> None:
    folder = tmp_path / "idx"
    _write(folder)
    if how == "truncate_bin":
        p = folder / th.BIN_FILE
        p.write_bytes(p.read_bytes()[:-1])
    elif how == "flip_table":
        p = folder / th.TABLE_FILE
        b = bytearray(p.read_bytes())
        b[-3] ^= 0x01
        p.write_bytes(bytes(b))
    elif how.startswith("drop"):
        (folder / (th.TABLE_FILE if how == "drop_table" else th.BIN_FILE)).unlink()
    else:
        meta = json.loads((folder / "index.json").read_text())
        meta["thumbnails"]["max_bytes"] = 10**9
        (folder / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError):
        load_gallery(folder)


# -- the service ----------------------------------------------------------------------------------------------


def copy_with_thumbnails(src: Path, dst: Path, every: int = 2) -> Gallery:
    """The embedded default's gallery with a synthetic thumbnail on every ``every``-th row (no photo of anyone's)."""
    g = load_gallery(src)
    tiles = [_tile(30 * k, 255 - 30 * k) for k in range(8)]
    with GalleryWriter(dst, g.dim, g.identity, GalleryCodes(), SMALL) as w:
        for s in range(0, len(g), 1024):
            e = min(len(g), s + 1024)
            w.add(
                g.rows_view(s, e),
                g.lat[s:e],
                g.lon[s:e],
                g.cell[s:e],
                list(g.names[s:e]),
                list(g.authors[s:e]),
                [tiles[r % 8] if r % every == 0 else None for r in range(s, e)],
            )
        w.finish()
    return load_gallery(dst)


@pytest.fixture(scope="module")
def thumbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Geolocator, Path]]:
    folder = tmp_path_factory.mktemp("thumbed") / "index"
    copy_with_thumbnails(default_model_dir() / "index", folder)
    yield Geolocator.load(index_dir=folder), folder


def _client(geo: Geolocator, **kw):
    from fastapi.testclient import TestClient

    from geoswc.service.app import create_app
    from geoswc.service.settings import ServiceSettings

    return TestClient(create_app(geo, ServiceSettings(warmup=False, **kw)))


def test_service_serves_the_neighbours_thumbnails_by_row(thumbed: tuple[Geolocator, Path]) -> None:
    geo, _ = thumbed
    c = _client(geo)
    r = c.post("/api/locate", files={"files": ("kauai.png", KAUAI.read_bytes())})
    assert r.status_code == 200, r.text
    (p,) = r.json()
    neighbours = p["neighbors"]
    assert neighbours and all(n["thumbnail"] == (n["row"] % 2 == 0) for n in neighbours)
    assert all(geo.gallery.names[n["row"]] == n["image"] for n in neighbours)
    with_thumb = [n for n in neighbours if n["thumbnail"]]
    without = [n for n in neighbours if not n["thumbnail"]] or [{"row": 1}]
    assert with_thumb, "some neighbour sits on an even row"
    for n in with_thumb:
        t = c.get(f"/api/thumbnails/{n['row']}")
        assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
        assert t.content == geo.thumbnail(n["row"]) and _jpeg_info(t.content).format == "JPEG"
        assert "max-age" in t.headers["cache-control"] and t.headers["etag"]
        again = c.get(f"/api/thumbnails/{n['row']}", headers={"If-None-Match": t.headers["etag"]})
        assert again.status_code == 304 and not again.content
    assert c.get(f"/api/thumbnails/{without[0]['row']}").json()["kind"] == "not_found"
    for row, status in (
        (len(geo.gallery), 404),
        (10**15, 404),
        (-1, 422),
        ("abc", 422),
        ("1.5", 422),
        ("..%2F..%2Fetc%2Fpasswd", 422),
        ("0%2F..%2Findex.json", 404),
    ):
        got = c.get(f"/api/thumbnails/{row}")
        assert got.status_code in (status, 404), (row, got.status_code)
        assert not got.headers["content-type"].startswith("image/"), row
    assert c.get("/api/thumbnails/../../index.json").status_code == 404
    spec = c.get("/openapi.json").json()
    op = spec["paths"]["/api/thumbnails/{row}"]["get"]
    assert "image/jpeg" in op["responses"]["200"]["content"] and {"401", "404", "500"} <= set(op["responses"])


def test_service_thumbnails_need_the_token_and_exist_only_with_an_index_that_has_them(
    thumbed: tuple[Geolocator, Path],
) -> None:
    geo, _ = thumbed
    c = _client(geo, token="s3cret")
    assert c.get("/api/thumbnails/0").status_code == 401
    ok = c.get("/api/thumbnails/0", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.content == geo.thumbnail(0)
    plain = _client(Geolocator.load())
    r = plain.get("/api/thumbnails/0")
    assert r.status_code == 404 and "no thumbnails" in r.json()["error"]


def test_service_never_serves_a_damaged_thumbnail(thumbed: tuple[Geolocator, Path], tmp_path: Path) -> None:
    _, src = thumbed
    folder = Path(shutil.copytree(src, tmp_path / "index"))
    geo = Geolocator.load(index_dir=folder)
    start, stop = geo.gallery.thumbnails.span(2)  # type: ignore[union-attr]
    path = folder / th.BIN_FILE
    data = bytearray(path.read_bytes())
    data[(start + stop) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    r = _client(geo).get("/api/thumbnails/2")
    assert r.status_code == 500 and r.json()["kind"] == "damaged" and not r.headers["content-type"].startswith("image")
    assert _client(geo).get("/api/thumbnails/4").status_code == 200, "the other thumbnails are still served"


# -- end to end on real photos ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.shared_data
def test_index_with_thumbnails_from_photos_and_from_features(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``geoswc index --thumbnails`` from a CSV of real photos, and from a feature cache with the photos' folder
    where one photo is gone (that row has none, one warning, the index builds); ``locate --format jsonl`` names
    each neighbour's row and whether it has a thumbnail."""
    from geoswc.cli import main

    assert DEV_CSV.is_file()
    rows = dev_rows(12, step=53)
    csv_path = write_csv(tmp_path / "g.csv", rows)
    model = str(default_model_dir())
    assert (
        main(
            [
                "index",
                "--model",
                model,
                "--out",
                str(tmp_path / "a"),
                "--data.csv",
                str(csv_path),
                "--data.images",
                str(DEV_IMAGES),
                "--thumbnails",
                "96",
            ]
        )
        == 0
    )
    a = load_gallery(tmp_path / "a")
    assert a.thumbnails is not None and a.thumbnails.count == len(a) == 12
    for r in range(len(a)):
        img = _jpeg_info(a.thumbnail(r))  # type: ignore[arg-type]
        assert max(img.size) == 96
        with Image.open(DEV_IMAGES / a.names[r]) as orig:
            src = orig.size
        assert (
            abs(img.size[0] / img.size[1] - src[0] / src[1]) < 0.1
            or abs(img.size[0] / img.size[1] - src[1] / src[0]) < 0.1
        ), "the thumbnail of another photo"

    # from a feature cache, reading the photos by its image ids; the first photo is gone
    assert (
        main(
            [
                "features",
                "--model",
                model,
                "--data.csv",
                str(csv_path),
                "--data.images",
                str(DEV_IMAGES),
                "--out",
                str(tmp_path / "features"),
            ]
        )
        == 0
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in rows[1:]:
        (photos / row["image"]).symlink_to(DEV_IMAGES / row["image"])
    capsys.readouterr()
    assert (
        main(
            [
                "index",
                "--model",
                model,
                "--out",
                str(tmp_path / "b"),
                "--features",
                str(tmp_path / "features"),
                "--data.images",
                str(photos),
                "--thumbnails",
                "64",
            ]
        )
        == 0
    )
    b = load_gallery(tmp_path / "b")
    gone = list(b.names).index(rows[0]["image"])
    assert len(b) == 12 and b.thumbnails is not None and b.thumbnails.count == 11 and not b.has_thumbnail(gone)
    warned = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warned) == 1 and f"no thumbnail for {rows[0]['image']}" in warned[0], warned
    assert (
        main(
            [
                "index",
                "--model",
                model,
                "--out",
                str(tmp_path / "c"),
                "--features",
                str(tmp_path / "features"),
                "--data.images",
                str(photos),
                "--thumbnails",
                "64",
                "--run.workers",
                "2",
            ]
        )
        == 0
    )
    c = load_gallery(tmp_path / "c")  # thumbnails made by two processes: the same, row for row
    assert [c.thumbnail(r) for r in range(len(c))] == [b.thumbnail(r) for r in range(len(b))]
    warned = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warned) == 1 and f"no thumbnail for {rows[0]['image']}" in warned[0], warned

    photo = str(DEV_IMAGES / rows[3]["image"])
    assert main(["locate", "--index", str(tmp_path / "a"), "--format", "jsonl", photo]) == 0
    p = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert p["neighbors"] and all(n["thumbnail"] and a.names[n["row"]] == n["image"] for n in p["neighbors"])
