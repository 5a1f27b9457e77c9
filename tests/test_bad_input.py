"""Bad input, everywhere: each kind is a named case, fed to the CLI, the Python API and the HTTP API.

What every case checks: a clear error that names the item (and says what to do), batch commands report the
bad items and finish the rest, the CLI exits 2 with one ``geoswc CMD: error: ...`` line and no traceback,
and nothing already written (a good model, index, cell table or evaluation) is lost when a command fails.

Per-format upload tests (odd modes, HEIC, mangled JPEGs) live in test_service.py; the HTTP cases here are
the cross-cutting ones (the same files as the CLI and API cases, client-named paths, a mixed batch).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from geoswc.cli import main
from geoswc.core.errors import ArtifactError, ImageError, InputError
from geoswc.data.records import load_records, read_photo_csv
from geoswc.prediction.geolocator import Geolocator, LocateFailure, Prediction

from .conftest import DEV_IMAGES, KAUAI, dev_rows, jpeg_bytes

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- helpers ----------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``geoswc ARGV`` in-process: (exit code, stdout, stderr). argparse errors count as exit code 2."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_error(rc: int, err: str, command: str, *needles: str) -> str:
    """Exit code 2, exactly one ``geoswc COMMAND: error:`` line naming the needles, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if f"geoswc {command}: error:" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (CRC fixed up) claims ``width x height``."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def tiff_missing_dimensions() -> bytes:
    """Found by fuzzing: one byte of a TIFF tag changed makes Pillow raise TypeError('Missing dimensions')."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    data[132] = 37
    return bytes(data)


def jpeg_with_garbage_exif() -> bytes:
    base = jpeg_bytes((64, 48))
    payload = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08" + np.random.default_rng(1).bytes(200)
    return base[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + base[2:]


def very_thin_png() -> bytes:
    """1 x 30000 pixels, a few hundred bytes: resized before cropping it took 6 GB and 30 s."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 30_000), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


GOOD_PHOTO = KAUAI
"""A real photo that ships with the project."""
REAL_JPEG = (lambda buf: (Image.open(KAUAI).convert("RGB").save(buf, "JPEG", quality=90), buf.getvalue())[1])(
    io.BytesIO()
)
"""The same photo as a JPEG, the raw material of the mangled files."""

# kind -> (file name, how to make it in a folder, expected ImageError kinds; None = it must be located)
Maker = Callable[[Path], None]


def _write(data: bytes) -> Maker:
    return lambda p: p.write_bytes(data)


def _sparse(size: int) -> Maker:
    def make(p: Path) -> None:
        with open(p, "wb") as f:
            f.write(REAL_JPEG[:1024])
            f.truncate(size)

    return make


def _unreadable(p: Path) -> None:
    p.write_bytes(REAL_JPEG)
    p.chmod(0)


IMAGE_KINDS: dict[str, tuple[str, Maker, set[str] | None]] = {
    "corrupt_jpeg": (
        "corrupt.jpg",
        _write(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(3000)),
        {"corrupt", "unsupported"},
    ),
    "truncated_jpeg": ("truncated.jpg", _write(REAL_JPEG[: len(REAL_JPEG) // 2]), {"corrupt"}),
    "zero_filled_tail_jpeg": (
        "zeroed.jpg",
        _write(REAL_JPEG[: len(REAL_JPEG) // 2] + bytes(len(REAL_JPEG) - len(REAL_JPEG) // 2)),
        {"corrupt"},
    ),
    "empty_file": ("empty.jpg", _write(b""), {"empty"}),
    "zero_pixel_png": ("zero.png", _write(png_claiming_size(0, 0)), {"corrupt", "unsupported"}),
    "gigantic_file": ("gigantic.jpg", _sparse(51 * 2**20), {"too_large"}),
    "decompression_bomb": ("bomb.png", _write(png_claiming_size(30_000, 30_000)), {"too_large"}),
    "text_as_jpg": ("notes.jpg", _write(b"just some text, not a picture\n" * 40), {"unsupported"}),
    "pdf_as_png": ("paper.png", _write(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"), {"unsupported"}),
    "html_as_webp": ("page.webp", _write(b"<!doctype html><title>x</title>"), {"unsupported"}),
    "tiff_missing_dimensions": ("fuzzed.tif", _write(tiff_missing_dimensions()), {"corrupt", "unsupported"}),
    "directory_as_jpg": ("folder.jpg", lambda p: p.mkdir(), {"unsupported"}),
    "dangling_symlink": ("dangling.jpg", lambda p: p.symlink_to(p.parent / "nowhere" / "x.jpg"), {"unreadable"}),
    "symlink_to_directory": ("linkdir.jpg", lambda p: p.symlink_to(p.parent), {"unsupported"}),
    "fifo_as_jpg": ("pipe.jpg", lambda p: os.mkfifo(p), {"unsupported"}),
    # root reads any file: then the honest outcome is a normal prediction (checked below, not skipped)
    "unreadable_chmod_000": ("locked.jpg", _unreadable, {"unreadable"}),
    "garbage_exif": ("garbage_exif.jpg", _write(jpeg_with_garbage_exif()), None),
    "very_thin_image": ("thin.png", _write(very_thin_png()), None),
}


def expected_kinds(kind: str, path: Path) -> set[str] | None:
    """The expected ImageError kinds of a case (None: located); chmod 000 does not stop root."""
    exp = IMAGE_KINDS[kind][2]
    if kind == "unreadable_chmod_000" and os.access(path, os.R_OK):
        assert IS_ROOT, "only root should be able to read a chmod 000 file"
        return None
    return exp


@pytest.fixture(autouse=True)
def csv_field_limit() -> Iterator[None]:
    """reverse_geocoder (imported with geoswc.geo.places) raises the csv module's field limit for the whole
    process; pin Python's default here so the huge-field cases behave the same in every test order."""
    old = csv.field_size_limit(131072)
    yield
    csv.field_size_limit(old)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("bad_images")
    paths = {}
    for kind, (name, make, _) in IMAGE_KINDS.items():
        make(d / name)
        paths[kind] = d / name
    yield paths
    paths["unreadable_chmod_000"].chmod(0o644)


@pytest.fixture(scope="module")
def geo(tiny_workspace: dict[str, Path]) -> Geolocator:
    return Geolocator.load(tiny_workspace["model"])


# -- images: Python API ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(IMAGE_KINDS))
def test_api_locate_bad_image(geo: Geolocator, bad_images: dict[str, Path], kind: str) -> None:
    path = bad_images[kind]
    exp = expected_kinds(kind, path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if exp is None:
        p = geo.locate(path, with_place=False)
        assert -90 <= p.lat <= 90 and -180 <= p.lon <= 180
        # bounded memory: the peak RSS (KiB) may not grow by a GiB for one photo
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**20
        return
    with pytest.raises(ImageError) as e:
        geo.locate(path, with_place=False)
    assert e.value.kind in exp, (e.value.kind, str(e.value))
    assert str(path) in str(e.value), "the message must name the file"
    if kind == "unreadable_chmod_000":
        assert "Permission denied" in str(e.value)


@pytest.mark.parametrize("kind", ["zero_pixels", "pixel_bomb", "none", "number"])
def test_api_locate_bad_in_memory_source(geo: Geolocator, kind: str) -> None:
    source: Any = {
        "zero_pixels": Image.new("RGB", (0, 0)),
        "pixel_bomb": Image.new("1", (20_000, 6_000)),
        "none": None,
        "number": 42,
    }[kind]
    with pytest.raises(ImageError, match="no pixels|above the limit|not a path"):
        geo.locate(source, with_place=False)


def test_api_batch_reports_every_bad_image_and_locates_the_rest(geo: Geolocator, bad_images: dict[str, Path]) -> None:
    kinds = list(bad_images)
    sources = [bad_images[k] for k in kinds] + [GOOD_PHOTO]
    results = list(geo.locate_batch(sources, with_place=False, batch_size=4))
    assert len(results) == len(sources)
    for kind, path, r in zip(kinds, sources, results, strict=False):
        if expected_kinds(kind, path) is None:
            assert isinstance(r, Prediction), (kind, r)
        else:
            assert isinstance(r, LocateFailure) and r.image == str(path) and r.kind in IMAGE_KINDS[kind][2], r
    assert isinstance(results[-1], Prediction)


# -- images: CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_batch(tiny_workspace: dict[str, Path], bad_images: dict[str, Path]) -> dict[str, Any]:
    """One ``geoswc locate --json`` over every bad file and a good photo (run once, checked per kind)."""
    files = [str(p) for k, p in bad_images.items() if k not in CLI_FOLDER_KINDS]
    argv = ["locate", *files, str(GOOD_PHOTO), "--model", str(tiny_workspace["model"]), "--format", "jsonl"]
    proc_out, proc_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(proc_out), contextlib.redirect_stderr(proc_err):
        rc = main(argv)
    lines = [json.loads(s) for s in proc_out.getvalue().splitlines()]
    return {"rc": rc, "by_image": {d["image"]: d for d in lines}, "err": proc_err.getvalue(), "n": len(lines)}


CLI_FOLDER_KINDS = ("directory_as_jpg", "symlink_to_directory")
"""The CLI takes folders (and links to them) as folders of photos: tested apart, below."""


@pytest.mark.parametrize("kind", [k for k in IMAGE_KINDS if k not in CLI_FOLDER_KINDS])
def test_cli_locate_batch_reports_bad_image(cli_batch: dict[str, Any], bad_images: dict[str, Path], kind: str) -> None:
    path = bad_images[kind]
    line = cli_batch["by_image"][str(path)]
    if expected_kinds(kind, path) is None:
        assert "lat" in line and "error" not in line
    else:
        assert line["kind"] in IMAGE_KINDS[kind][2] and str(path) in line["error"]


def test_cli_locate_batch_finishes_the_rest(cli_batch: dict[str, Any], bad_images: dict[str, Path]) -> None:
    assert cli_batch["n"] == len(bad_images) - len(CLI_FOLDER_KINDS) + 1
    assert cli_batch["rc"] == 1  # some photos failed; 0 only when all were located
    assert "lat" in cli_batch["by_image"][str(GOOD_PHOTO)]
    assert "Traceback" not in cli_batch["err"]


def test_cli_locate_text_mode_names_bad_files_on_stderr(
    tiny_workspace: dict[str, Path], bad_images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run_cli(
        [
            "locate",
            bad_images["truncated_jpeg"],
            bad_images["text_as_jpg"],
            GOOD_PHOTO,
            "--model",
            tiny_workspace["model"],
        ],
        capsys,
    )
    assert rc == 1 and "Traceback" not in err
    assert str(bad_images["truncated_jpeg"]) in err and "truncated" in err
    assert str(bad_images["text_as_jpg"]) in err and "not an image" in err
    assert "estimate" in out


def test_cli_locate_folder_without_photos(
    tiny_workspace: dict[str, Path], tmp_path: Path, bad_images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "readme.txt").write_text("no photos here")
    for folder in (tmp_path, bad_images["directory_as_jpg"]):
        rc, _, err = run_cli(["locate", folder, "--model", tiny_workspace["model"]], capsys)
        assert_cli_error(rc, err, "locate", "no photos found", str(folder))
    # a link to a folder is that folder: its photos are located, its bad files reported, nothing crashes
    rc, out, err = run_cli(
        ["locate", bad_images["symlink_to_directory"], "--model", tiny_workspace["model"], "--format", "jsonl"], capsys
    )
    assert rc == 1 and "Traceback" not in err
    assert any("lat" in json.loads(ln) for ln in out.splitlines())


# -- images: HTTP ----------------------------------------------------------------------------------------

HTTP_STATUS = {"empty": 422, "corrupt": 422, "unreadable": 422, "unsupported": 415, "too_large": 413}
HTTP_KINDS = [
    k
    for k in IMAGE_KINDS
    if k
    not in (
        "gigantic_file",
        "directory_as_jpg",
        "dangling_symlink",
        "symlink_to_directory",
        "fifo_as_jpg",
        "unreadable_chmod_000",
    )
]


@pytest.fixture(scope="module")
def client(tiny_workspace: dict[str, Path]) -> Any:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from geoswc.service.app import create_app
    from geoswc.service.settings import ServiceSettings

    geo = Geolocator.load(tiny_workspace["model"])
    with TestClient(create_app(geo, ServiceSettings(warmup=False))) as c:
        yield c


def post(client: Any, *files: tuple[str, bytes], **kw: Any) -> Any:
    return client.post("/api/locate", files=[("files", (n, d, "application/octet-stream")) for n, d in files], **kw)


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_http_bad_upload(client: Any, bad_images: dict[str, Path], kind: str) -> None:
    name = IMAGE_KINDS[kind][0]
    r = post(client, (name, bad_images[kind].read_bytes()))
    exp = IMAGE_KINDS[kind][2]
    if exp is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code in {HTTP_STATUS[k] for k in exp}, r.text
    body = r.json()
    assert body["kind"] in exp and body["image"] == name and name in body["error"]


def test_http_mixed_batch_reports_each_failure(client: Any, bad_images: dict[str, Path]) -> None:
    files = [(IMAGE_KINDS[k][0], bad_images[k].read_bytes()) for k in HTTP_KINDS] + [("good.jpg", REAL_JPEG)]
    r = post(client, *files[:16])  # the default limit is 16 files per request
    assert r.status_code == 200, r.text
    results = r.json()
    assert [x["image"] for x in results] == [n for n, _ in files[:16]]
    for (name, _), res, kind in zip(files, results, HTTP_KINDS + ["good"], strict=False):
        exp = IMAGE_KINDS[kind][2] if kind in IMAGE_KINDS else None
        if exp is None:
            assert "lat" in res, res
        else:
            assert res["kind"] in exp and name in res["error"] and res["status"] >= 400


@pytest.mark.parametrize("name", ["/etc/passwd", "../../../etc/hostname", "..\\..\\boot.ini", "a/../../x.jpg"])
def test_http_client_named_paths_are_never_read(client: Any, name: str) -> None:
    """An upload's file name is only a label: the server uses the uploaded bytes (here none) and strips folders."""
    r = post(client, (name, b""))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["kind"] == "empty" and "/" not in body["image"] and "\\" not in body["image"]
    r = client.post(
        "/api/locate", data={"path": "/etc/passwd", "image": str(GOOD_PHOTO)}, params={"path": str(GOOD_PHOTO)}
    )
    assert r.status_code in (415, 422) and "lat" not in r.text


# -- CSV: Python API --------------------------------------------------------------------------------------


def good_rows() -> list[dict[str, str]]:
    """Three real rows of the development CSV (their photos are in DEV_IMAGES)."""
    return dev_rows(3, step=211)


# kind -> (bad data row, text the report must show)
ROW_KINDS: dict[str, tuple[str, str]] = {
    "bad_number": ("{img},abc,2.35", "not a number"),
    "underscore_number": ("{img},4_5,2.35", "not a plain decimal"),
    "nan": ("{img},nan,2.35", "not finite"),
    "inf": ("{img},10,-inf", "not finite"),
    "lat_out_of_range": ("{img},95,2.35", "outside ±90"),
    "lon_out_of_range": ("{img},10,200", "outside ±180"),
    "missing_lat": ("{img},,2.35", "missing lat"),
    "short_row": ("{img}", "missing lat"),
    "duplicate_row": ("DUP", "duplicate image id"),
    "missing_image": ("nope/missing.jpg,10,20", "image file not found"),
    "image_is_directory": (".,10,20", "not a regular file"),
    "empty_image_name": (",10,20", "empty image name"),
}


def _row_csv(folder: Path, kind: str, rows: list[dict[str, str]]) -> Path:
    good = [f"{r['image']},{r['lat']},{r['lon']},{r['author']}" for r in rows]
    bad = good[0] if kind == "duplicate_row" else ROW_KINDS[kind][0].format(img=rows[1]["image"])
    path = folder / f"{kind}.csv"
    path.write_text("image,lat,lon,author\n" + good[0] + "\n" + bad + "\n" + "\n".join(good[2:]) + "\n")
    return path


@pytest.mark.shared_data
@pytest.mark.parametrize("kind", list(ROW_KINDS))
def test_csv_bad_row_is_reported_and_the_rest_kept(tmp_path: Path, kind: str) -> None:
    rows = good_rows()
    records, report = read_photo_csv(_row_csv(tmp_path, kind, rows), DEV_IMAGES)
    assert [r.image for r in records] == [rows[0]["image"], rows[2]["image"]]
    assert report.total == 3 and len(report.skipped) == 1
    item, why = report.skipped[0]
    assert ROW_KINDS[kind][1] in why, why
    assert "line 3" in item or rows[1]["image"] in item or item.startswith(("nope/", ".")), item


def _huge_field(p: Path) -> None:
    p.write_text("image,lat,lon\n" + "x" * 200_000 + ".jpg,1,2\n")


def _unreadable_csv(p: Path) -> None:
    p.write_text("image,lat,lon\n")
    p.chmod(0)


# kind -> (how to make it, text the error must show; None: it reads as empty)
FILE_KINDS: dict[str, tuple[Maker, str | None]] = {
    "missing_columns": (lambda p: p.write_text("image,y,x\na.jpg,1,2\n"), "lacks column(s) lat, lon"),
    "wrong_delimiter": (lambda p: p.write_text("image;lat;lon\na.jpg;1;2\n"), "lacks column(s)"),
    "non_utf8": (lambda p: p.write_bytes("image,lat,lon\ncafé.jpg,1,2\n".encode("latin-1")), "not UTF-8"),
    "binary_garbage": (lambda p: p.write_bytes(REAL_JPEG[:4000]), "not UTF-8"),
    "empty_file": (lambda p: p.write_bytes(b""), "lacks column(s)"),
    "huge_field": (_huge_field, "malformed"),
    "is_directory": (lambda p: p.mkdir(), "it is a directory"),
    "does_not_exist": (lambda p: None, "not found"),
    "unreadable_chmod_000": (_unreadable_csv, "Permission denied"),
    "header_only": (lambda p: p.write_text("image,lat,lon\n"), None),
}


def make_csv(folder: Path, kind: str) -> Path:
    p = folder / f"{kind}.csv"
    FILE_KINDS[kind][0](p)
    return p


def test_csv_huge_image_name_without_field_limit(tmp_path: Path) -> None:
    """With the field limit raised (as reverse_geocoder does), a 200 kB image name reaches the file system,
    which refuses it (ENAMETOOLONG): a reported row, not an OSError."""
    csv.field_size_limit(2**31 - 1)
    p = make_csv(tmp_path, "huge_field")
    (tmp_path / "ok.jpg").write_bytes(REAL_JPEG)
    with open(p, "a") as f:
        f.write("ok.jpg,3,4\n")
    records, report = read_photo_csv(p, tmp_path)
    assert [r.image for r in records] == ["ok.jpg"]
    assert len(report.skipped) == 1 and "unusable image path" in report.skipped[0][1]
    assert len(report.summary()) < 1000, "a huge name is shortened in the report"


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_csv_bad_file_is_refused_clearly(tmp_path: Path, kind: str) -> None:
    p = make_csv(tmp_path, kind)
    needle = FILE_KINDS[kind][1]
    if kind == "unreadable_chmod_000" and os.access(p, os.R_OK):
        needle = None  # root reads it: a header-only CSV, honestly
    if needle is None:
        records, report = load_records(p, tmp_path)
        assert records == [] and report.total == 0
        return
    with pytest.raises(InputError) as e:
        load_records(p, tmp_path)
    assert str(p) in str(e.value) and needle in str(e.value), str(e.value)


def test_load_records_needs_a_source() -> None:
    with pytest.raises(InputError, match="CSV.*GPS EXIF"):
        load_records(None, None)
    with pytest.raises(InputError, match="image folder not found"):
        load_records(None, "/nonexistent/photos")


# -- CSV: CLI ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_cli_evaluate_bad_csv(
    tiny_workspace: dict[str, Path], tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    p = make_csv(tmp_path, kind)
    rc, _, err = run_cli(
        [
            "evaluate",
            "--data.csv",
            p,
            "--data.images",
            DEV_IMAGES,
            "--out",
            tmp_path / "eval",
            "--model",
            tiny_workspace["model"],
        ],
        capsys,
    )
    line = assert_cli_error(rc, err, "evaluate", str(p))
    assert FILE_KINDS[kind][1] is None or FILE_KINDS[kind][1] in line or (kind == "unreadable_chmod_000" and IS_ROOT), (
        line
    )
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_cli_cells_bad_coords(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    p = make_csv(tmp_path, kind)
    rc, _, err = run_cli(["cells", "--coords", p, "--out", tmp_path / "cells.csv"], capsys)
    assert_cli_error(rc, err, "cells", str(p))
    assert not (tmp_path / "cells.csv").exists()


def test_cli_evaluate_reports_every_bad_row_and_finishes(
    tiny_workspace: dict[str, Path], tmp_path: Path, bad_images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """One benchmark CSV holding every bad row kind and a corrupt photo: the good photos are still scored."""
    shutil.copy(bad_images["truncated_jpeg"], tmp_path / "truncated.jpg")
    rows_in = good_rows()
    for r in rows_in:
        (tmp_path / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEV_IMAGES / r["image"], tmp_path / r["image"])
    good = [f"{r['image']},{r['lat']},{r['lon']},{r['author']}" for r in rows_in]
    bad = [ROW_KINDS[k][0].format(img=rows_in[1]["image"]) for k in ROW_KINDS if k != "duplicate_row"]
    rows = good + bad + [good[0], "truncated.jpg,10,20,"]
    (tmp_path / "bench.csv").write_text("image,lat,lon,author\n" + "\n".join(rows) + "\n")
    rc, out, err = run_cli(
        [
            "evaluate",
            "--data.csv",
            tmp_path / "bench.csv",
            "--data.images",
            tmp_path,
            "--out",
            tmp_path / "eval",
            "--model",
            tiny_workspace["model"],
            "--methods",
            "[swc, classification]",
        ],
        capsys,
    )
    assert rc == 0 and "Traceback" not in err, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == len(rows_in) and metrics["missing"] == len(bad) + 2
    skipped = json.loads((tmp_path / "eval" / "run.json").read_text())["skipped"]
    reasons = " | ".join(f"{s['item']}: {s['reason']}" for s in skipped)
    for kind, (_, needle) in ROW_KINDS.items():
        assert needle in reasons, (kind, reasons)
    assert "truncated.jpg" in reasons and "truncated" in reasons


def test_cli_index_reports_bad_rows_and_photos_and_finishes(
    tiny_workspace: dict[str, Path], tmp_path: Path, bad_images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(bad_images["text_as_jpg"], tmp_path / "notes.jpg")
    shutil.copy(GOOD_PHOTO, tmp_path / "good.jpg")
    (tmp_path / "g.csv").write_text(
        "image,lat,lon\ngood.jpg,48.85,2.35\nnotes.jpg,1,2\nmissing.jpg,3,4\ngood.jpg,5,6\nx.jpg,100,0\n"
    )
    model = tmp_path / "model"
    shutil.copytree(tiny_workspace["model"], model, ignore=shutil.ignore_patterns("checkpoint*", "index"))
    rc, out, err = run_cli(
        ["index", "--model", model, "--data.csv", tmp_path / "g.csv", "--data.images", tmp_path], capsys
    )
    assert rc == 0 and "Traceback" not in err, err
    assert "gallery of 1 photo" in out
    log = err
    for needle in (
        "notes.jpg",
        "not an image",
        "missing.jpg",
        "image file not found",
        "duplicate image id",
        "outside ±90",
    ):
        assert needle in log, needle
    assert Geolocator.load(model).gallery is not None


# -- bad flags and bad artefact paths ---------------------------------------------------------------------

FLAG_KINDS: dict[str, tuple[list[str], str]] = {
    "cells_min_per_cell_0": (
        ["cells", "--coords", "{coords}", "--out", "{tmp}/c.csv", "--cells.min_per_cell", "0"],
        "--cells.min_per_cell",
    ),
    "cells_max_below_min": (
        [
            "cells",
            "--coords",
            "{coords}",
            "--out",
            "{tmp}/c.csv",
            "--cells.max_per_cell",
            "3",
            "--cells.min_per_cell",
            "5",
        ],
        "--cells.max_per_cell",
    ),
    "cells_max_level_99": (
        ["cells", "--coords", "{coords}", "--out", "{tmp}/c.csv", "--cells.max_level", "99"],
        "--cells.max_level",
    ),
    "locate_k_0": (["locate", "{photo}", "--model", "{model}", "--search.k", "0"], "--search.k"),
    "locate_eps_negative": (["locate", "{photo}", "--model", "{model}", "--search.eps_km", "-1"], "--search.eps_km"),
    "locate_batch_size_0": (["locate", "{photo}", "--model", "{model}", "--run.batch_size", "0"], "--run.batch_size"),
    "locate_workers_negative": (["locate", "{photo}", "--model", "{model}", "--run.workers", "-2"], "--run.workers"),
    "locate_k_not_a_number": (["locate", "{photo}", "--model", "{model}", "--search.k", "ten"], "--search"),
    "locate_workers_absurd": (["locate", "{photo}", "--model", "{model}", "--run.workers", "100000"], "--run.workers"),
    "locate_unknown_format": (["locate", "{photo}", "--model", "{model}", "--format", "xml"], "--format"),
    "train_batch_size_0": (
        ["train", "--features", "{features}", "--cells", "{cells}", "--out", "{tmp}/m", "--train.batch_size", "0"],
        "--train.batch_size",
    ),
    "train_lr_nan": (
        ["train", "--features", "{features}", "--cells", "{cells}", "--out", "{tmp}/m", "--train.lr", ".nan"],
        "--train.lr",
    ),
    "train_epochs_negative": (
        ["train", "--features", "{features}", "--cells", "{cells}", "--out", "{tmp}/m", "--train.epochs", "-1"],
        "--train.epochs",
    ),
    "train_dropout_1_5": (
        ["train", "--features", "{features}", "--cells", "{cells}", "--out", "{tmp}/m", "--heads.mvmf_dropout", "1.5"],
        "--heads.mvmf_dropout",
    ),
    "train_temperature_0": (
        ["train", "--features", "{features}", "--cells", "{cells}", "--out", "{tmp}/m", "--train.temperature", "0"],
        "--train.temperature",
    ),
    "features_views_0": (
        ["features", "--data.csv", "{csv}", "--data.images", "{images}", "--out", "{tmp}/f", "--views", "0"],
        "--views",
    ),
}

PATH_KINDS: dict[str, tuple[list[str], str]] = {
    "locate_model_missing": (["locate", "{photo}", "--model", "{tmp}/nope"], "no geoswc model"),
    "locate_model_is_a_file": (["locate", "{photo}", "--model", "{coords}"], "no geoswc model"),
    "locate_index_missing": (["locate", "{photo}", "--model", "{model}", "--index", "{tmp}/nope"], "not found"),
    "locate_index_is_the_model": (["locate", "{photo}", "--model", "{model}", "--index", "{model}"], "index"),
    "train_features_missing": (
        ["train", "--features", "{tmp}/nope", "--cells", "{cells}", "--out", "{tmp}/m"],
        "feature cache not found",
    ),
    "train_cells_missing": (
        ["train", "--features", "{features}", "--cells", "{tmp}/nope.csv", "--out", "{tmp}/m"],
        "cell table not found",
    ),
    "train_cells_is_a_coords_csv": (
        ["train", "--features", "{features}", "--cells", "{coords}", "--out", "{tmp}/m"],
        "must start with the header",
    ),
    "train_out_is_a_file": (
        ["train", "--features", "{features}", "--cells", "{cells}", "--out", "{coords}"],
        "is a file, not a folder",
    ),
    "index_features_missing": (["index", "--model", "{model}", "--features", "{tmp}/nope"], "not found"),
    "index_out_is_a_file": (
        ["index", "--model", "{model}", "--features", "{features}", "--out", "{coords}"],
        "is a file, not a folder",
    ),
    "index_without_photos": (["index", "--model", "{model}", "--out", "{tmp}/i"], "--features"),
    "evaluate_out_is_a_file": (
        ["evaluate", "--data.csv", "{csv}", "--data.images", "{images}", "--out", "{coords}", "--model", "{model}"],
        "is a file, not a folder",
    ),
    "evaluate_images_missing": (
        ["evaluate", "--data.csv", "{csv}", "--data.images", "{tmp}/nope", "--out", "{tmp}/e", "--model", "{model}"],
        "image folder not found",
    ),
    "cells_out_is_a_directory": (
        ["cells", "--coords", "{coords}", "--out", "{tmp}", "--cells.min_per_cell", "1"],
        "is a directory",
    ),
    "cells_coords_have_no_usable_row": (
        ["cells", "--coords", "{nan_coords}", "--out", "{tmp}/c.csv"],
        "no usable coordinates",
    ),
}


def _fill(argv: list[str], ws: dict[str, Path], tmp: Path) -> list[str]:
    (tmp / "coords.csv").write_text("lat,lon\n48.85,2.35\n48.86,2.34\n40.7,-74.0\n")
    (tmp / "nan_coords.csv").write_text("lat,lon\nnan,1\n95,2\nabc,3\n")
    subs = {
        "tmp": tmp,
        "coords": tmp / "coords.csv",
        "nan_coords": tmp / "nan_coords.csv",
        "model": ws["model"],
        "features": ws["features"],
        "cells": ws["cells"],
        "csv": ws["csv"],
        "images": DEV_IMAGES,
        "photo": GOOD_PHOTO,
    }
    return [a.format(**{k: str(v) for k, v in subs.items()}) for a in argv]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FLAG_KINDS))
def test_cli_bad_flag(
    tiny_workspace: dict[str, Path], tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, flag = FLAG_KINDS[kind]
    rc, _, err = run_cli(_fill(argv, tiny_workspace, tmp_path), capsys)
    assert_cli_error(rc, err, argv[0], flag)
    assert not (tmp_path / "m").exists() and not (tmp_path / "c.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PATH_KINDS))
def test_cli_bad_artifact_path(
    tiny_workspace: dict[str, Path], tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, needle = PATH_KINDS[kind]
    rc, _, err = run_cli(_fill(argv, tiny_workspace, tmp_path), capsys)
    assert_cli_error(rc, err, argv[0], needle)


def test_api_bad_artifact_paths(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no geoswc model"):
        Geolocator.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not JSON"):
        Geolocator.load(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a JSON object"):
        Geolocator.load(tmp_path)


# -- nothing already written is lost ---------------------------------------------------------------------


def test_failed_train_leaves_a_good_model_untouched(
    tiny_workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    shutil.copytree(tiny_workspace["model"], out)
    before = snapshot(out)
    (tmp_path / "coords.csv").write_text("lat,lon\n1,2\n")
    base = ["train", "--features", tiny_workspace["features"], "--out", out]
    for argv in (
        base + ["--cells", tmp_path / "coords.csv"],  # not a cell table
        base + ["--cells", tiny_workspace["cells"], "--train.lr", "-1"],  # bad flag
        base + ["--cells", tiny_workspace["cells"], "--train.epochs", "2"],
    ):  # another run's checkpoint
        rc, _, err = run_cli(argv, capsys)
        assert_cli_error(rc, err, "train")
        assert snapshot(out) == before
    Geolocator.load(out)


def test_failed_index_leaves_a_good_index_untouched(
    tiny_workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_workspace["model"], model, ignore=shutil.ignore_patterns("checkpoint*"))
    before = snapshot(model)
    (tmp_path / "bad.csv").write_text("image,lat,lon\nmissing.jpg,1,2\n")
    for extra in (
        ["--features", tmp_path / "nope"],
        ["--data.csv", tmp_path / "bad.csv", "--data.images", DEV_IMAGES],
        ["--data.csv", tmp_path / "bad.csv", "--data.images", tmp_path / "nope"],
    ):
        rc, _, err = run_cli(["index", "--model", model, *extra], capsys)
        assert_cli_error(rc, err, "index")
        assert snapshot(model) == before
    assert len(Geolocator.load(model).gallery) == 60


def test_failed_evaluate_keeps_previous_results(
    tiny_workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    for name in ("metrics.json", "predictions.csv", "run.json", "accuracy.png"):
        (out / name).write_text(f"previous {name}\n")
    before = snapshot(out)
    for kind in ("non_utf8", "missing_columns", "header_only"):
        rc, _, err = run_cli(
            [
                "evaluate",
                "--data.csv",
                make_csv(tmp_path, kind),
                "--data.images",
                DEV_IMAGES,
                "--out",
                out,
                "--model",
                tiny_workspace["model"],
            ],
            capsys,
        )
        assert_cli_error(rc, err, "evaluate")
        assert snapshot(out) == before


def test_failed_cells_keeps_the_existing_table(
    tiny_workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cells.csv"
    shutil.copy(tiny_workspace["cells"], out)
    before = out.read_bytes()
    for kind in ("non_utf8", "huge_field", "header_only", "missing_columns"):
        rc, _, err = run_cli(["cells", "--coords", make_csv(tmp_path, kind), "--out", out], capsys)
        assert_cli_error(rc, err, "cells")
        assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp file may be left behind"


# -- the real command in a subprocess: exit code 2, one line on stderr, no traceback ----------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    ["cells_huge_field", "locate_model_missing", "train_out_is_a_file", "evaluate_non_utf8", "locate_batch_size_0"],
)
def test_subprocess_exit_code_and_one_line(tiny_workspace: dict[str, Path], tmp_path: Path, kind: str) -> None:
    ws = tiny_workspace
    argv = {
        "cells_huge_field": [
            "cells",
            "--coords",
            str(make_csv(tmp_path, "huge_field")),
            "--out",
            str(tmp_path / "c.csv"),
        ],
        "locate_model_missing": ["locate", str(GOOD_PHOTO), "--model", str(tmp_path / "nope")],
        "train_out_is_a_file": [
            "train",
            "--features",
            str(ws["features"]),
            "--cells",
            str(ws["cells"]),
            "--out",
            str(ws["csv"]),
        ],
        "evaluate_non_utf8": [
            "evaluate",
            "--data.csv",
            str(make_csv(tmp_path, "non_utf8")),
            "--data.images",
            str(DEV_IMAGES),
            "--out",
            str(tmp_path / "e"),
            "--model",
            str(ws["model"]),
        ],
        "locate_batch_size_0": ["locate", str(KAUAI), "--run.batch_size", "0"],
    }[kind]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "geoswc", *argv], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    errors = [ln for ln in proc.stderr.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and errors[0].startswith(f"geoswc {argv[0]}: error:"), proc.stderr
    assert proc.stderr.strip().splitlines() == errors  # no usage text: the one line is all


# -- a burst beyond the server's limits: 503 + Retry-After, not an unbounded queue ------------------------


@pytest.mark.slow
def test_real_server_refuses_a_burst_with_503_and_retry_after(tiny_workspace: dict[str, Path], tmp_path: Path) -> None:
    """The light version of benchmarks/load_test.py: `geoswc serve` in a subprocess, a gate of 1 running +
    1 waiting, 8 simultaneous requests: 6 are refused at once with 503 and Retry-After, then it serves on."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    assert spec is not None and spec.loader is not None
    lt = sys.modules["load_test"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(lt)
    photos = [(f"p{i}.jpg", (DEV_IMAGES / r["image"]).read_bytes()) for i, r in enumerate(dev_rows(8, step=97))]
    with lt.serve(
        ["--service.max_concurrent", "1", "--service.max_queue", "1", "--service.queue_timeout_s", "60"],
        tmp_path / "serve.log",
        str(tiny_workspace["model"]),
        timeout_s=120,
    ) as server:
        result = lt.burst(server.port, photos, 8, 2)
    assert result["burst_status_counts"] == {"200": 2, "503": 6}, result
    assert result["retry_after_missing"] == 0 and all(r >= 1 for r in result["retry_after"])
    assert result["refusal_max_ms"] < 5000, "refusals must not wait in a queue"
    assert result["status_after_burst"] == 200
