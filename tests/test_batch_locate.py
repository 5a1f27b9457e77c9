"""Batch locating with the shipped default model: a CSV, a folder or shards in; JSONL, CSV or GeoJSON out;
bad items reported and the rest finished."""

import csv
import io
import json
import shutil
import tarfile

import pytest

from geoswc.cli import main
from geoswc.data.records import read_photo_csv
from geoswc.data.shards import write_shards

from .conftest import DEV_IMAGES, KAUAI, dev_rows, write_csv


@pytest.fixture(scope="module")
def rows():
    return dev_rows(3, step=211)


@pytest.mark.shared_data
def test_csv_to_jsonl_and_csv_to_stdout(rows, tmp_path, capsys):
    # an image-only list (positions unknown), with a row whose file does not exist: it fails the run (exit 1)
    # like a photo that cannot be decoded, and the others are located
    listing = tmp_path / "photos.csv"
    listing.write_text("image\n" + "".join(r["image"] + "\n" for r in rows) + "nowhere.jpg\n")
    out = tmp_path / "pred.jsonl"
    assert (
        main(
            [
                "locate",
                "--data.csv",
                str(listing),
                "--data.images",
                str(DEV_IMAGES),
                "--output",
                str(out),
                "--run.workers",
                "1",
                "--run.batch_size",
                "2",
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert f"3 photos located, 1 failed -> {out} (jsonl)" in captured.out and "nowhere.jpg" in captured.err
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["image"] for p in preds] == [r["image"] for r in rows]
    for p in preds:
        assert -90 <= p["lat"] <= 90 and -180 <= p["lon"] <= 180 and p["top_cells"] and p["place"]["country"]
    # the same photos as CSV on stdout (a CSV with positions works too)
    assert (
        main(
            [
                "locate",
                "--data.csv",
                str(write_csv(tmp_path / "dev.csv", rows)),
                "--data.images",
                str(DEV_IMAGES),
                "--format",
                "csv",
            ]
        )
        == 0
    )
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [t["image"] for t in table] == [r["image"] for r in rows]
    assert all(t["cell"] and float(t["confidence"]) >= 0 and not t["error"] for t in table)
    assert [float(t["lat"]) for t in table] == [round(p["lat"], 6) for p in preds]


def test_folder_to_csv_reports_the_bad_photo_and_finishes(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(KAUAI, folder / "kauai.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "pred.csv"
    assert main(["locate", str(folder), "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert "1 photo located, 1 failed" in captured.out and "error:" in captured.err and "broken.jpg" in captured.err
    table = {r["image"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    bad = table["broken.jpg"]
    assert "broken.jpg" in bad["error"] and bad["kind"] and not bad["lat"]
    assert table["kauai.png"]["country"] and -90 <= float(table["kauai.png"]["lat"]) <= 90


@pytest.mark.shared_data
def test_shards_to_geojson_with_a_corrupt_member(rows, tmp_path, capsys):
    records, _ = read_photo_csv(write_csv(tmp_path / "dev.csv", rows), DEV_IMAGES)
    write_shards(records, tmp_path / "s", samples_per_shard=2, progress=False)
    with tarfile.open(tmp_path / "s" / "shard-000009.tar", "w") as tf:  # a sample whose image is garbage
        for name, data in (("x.jpg", b"garbage"), ("x.json", b'{"lat": 1, "lon": 2, "image": "x.jpg"}')):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    out = tmp_path / "pred.geojson"
    rc = main(
        ["locate", "--data.shards", str(tmp_path / "s" / "shard-*.tar"), "--output", str(out), "--run.workers", "2"]
    )
    assert rc == 1
    assert "3 photos located, 1 failed" in capsys.readouterr().out
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 4
    located = {f["properties"]["image"]: f for f in fc["features"] if f["geometry"] is not None}
    assert set(located) == {r["image"] for r in rows}
    for f in located.values():
        lon, lat = f["geometry"]["coordinates"]
        assert f["geometry"]["type"] == "Point" and -180 <= lon <= 180 and -90 <= lat <= 90
        assert f["properties"]["cell"] and "confidence" in f["properties"]
    (bad,) = [f for f in fc["features"] if f["geometry"] is None]
    assert bad["properties"]["image"] == "x.jpg" and bad["properties"]["error"]


def test_bad_invocations_are_refused(tmp_path, capsys):
    assert main(["locate"]) == 2
    assert "give photo files or folders" in capsys.readouterr().err
    assert main(["locate", str(KAUAI), "--data.shards", str(tmp_path)]) == 2
    assert "--data.shards: shards goes alone: give one of files, csv or shards" in capsys.readouterr().err
    assert main(["locate", str(KAUAI), "--output", str(tmp_path / "x.xyz")]) == 2
    assert "give the format" in capsys.readouterr().err
    assert not (tmp_path / "x.xyz").exists()
