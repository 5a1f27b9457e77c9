"""Photo lists in the layouts benchmarks are published in: the real files' headers and rows (../shared), OSV-5M's
layout (synthetic), the alias matching, ``--data.columns`` and the one-line error of an unknown layout."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from geoswc.cli import main
from geoswc.core.errors import InputError
from geoswc.data.layouts import ALIASES, parse_columns, resolve_layout
from geoswc.data.records import parse_row_label, read_coordinates, read_photo_csv, row_label
from geoswc.evaluation.benchmark_sets import BENCHMARKS

from .conftest import DEV_CSV, DEV_IMAGES, SHARED, dev_rows

IM2GPS3K = SHARED / "benchmarks" / "im2gps3k" / "im2gps3k_places365-dev.csv"
YFCC4K = SHARED / "benchmarks" / "yfcc" / "yfcc4k.csv"
YFCC26K = SHARED / "benchmarks" / "yfcc" / "yfcc25600_places365.csv"
TRUNCATED = "207072624_f2a0d76266_63_14542551@N00.jpg"
"""The one development photo whose JPEG data ends early: its bottom rows decode to libjpeg's mid-grey fill."""


def _csv_rows(path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.shared_data
def test_im2gps3k_as_published_reads_like_our_own_list() -> None:
    published, report = read_photo_csv(IM2GPS3K, DEV_IMAGES)
    ours, _ = read_photo_csv(DEV_CSV, DEV_IMAGES)
    rows = len(_csv_rows(IM2GPS3K))
    assert rows == len(_csv_rows(DEV_CSV)) > 0
    assert report.total == rows and len(published) == rows and not report.skipped
    assert [(r.image, r.lat, r.lon, r.author) for r in published] == [(r.image, r.lat, r.lon, r.author) for r in ours]
    assert published[0].author == "78841376@N00" and published[0].path == DEV_IMAGES / published[0].image


@pytest.mark.shared_data
def test_yfcc4k_takes_name_ownernsid_and_lon_before_lat(tmp_path) -> None:
    records, report = read_photo_csv(YFCC4K, tmp_path, check_images=False)
    assert len(records) == report.total == 4536
    first = records[0]
    assert (first.image, first.author, first.lat, first.lon) == (
        "10201275523.jpg",
        "55289779@N00",
        43.649708,
        -79.365637,
    )
    lat, lon, _ = read_coordinates(YFCC4K)  # `geoswc cells --coords` reads the same columns
    assert (lat[0], lon[0]) == (43.649708, -79.365637) and len(lat) == 4536
    # with an empty image folder every row is named as missing, with its line
    none, report = read_photo_csv(YFCC4K, tmp_path)
    assert not none and len(report.skipped) == 4536
    assert parse_row_label(report.skipped[0][0]) == ("10201275523.jpg", 2)
    assert {why for _, why in report.skipped} == {"image file not found"}


@pytest.mark.shared_data
def test_yfcc26k_relative_paths_and_upper_case_author(tmp_path) -> None:
    records, _ = read_photo_csv(YFCC26K, tmp_path, check_images=False)
    assert len(records) == 25600
    assert (records[0].image, records[0].author, records[0].lat, records[0].lon) == (
        "45/77/3228511372.jpg",
        "43008843@N00",
        46.778991,
        23.611207,
    )
    assert records[0].path == tmp_path / "45" / "77" / "3228511372.jpg"


def test_osv5m_ids_name_jpegs(tmp_path) -> None:
    (tmp_path / "123.jpg").write_bytes(b"x")
    (tmp_path / "osv.csv").write_text(
        "id,latitude,longitude,thumb_original_url,country\n"
        "123,48.137,11.575,https://example.org/1,DE\n"
        "456,-33.9,151.2,https://example.org/2,AU\n"
    )
    records, report = read_photo_csv(tmp_path / "osv.csv", tmp_path)
    assert [(r.image, r.lat, r.lon) for r in records] == [("123.jpg", 48.137, 11.575)]
    assert report.skipped == [("456.jpg (line 3)", "image file not found")]


def test_header_names_match_in_any_case() -> None:
    layout = resolve_layout(["Img_Id", "Author", "Latitude", "LONGITUDE"], "x.csv", ("image", "lat", "lon"))
    assert layout.index == {"image": 0, "author": 1, "lat": 2, "lon": 3} and not layout.bare_ids
    # the first known name present wins: image before name before id
    assert resolve_layout(["id", "name", "lat", "lon"], "x.csv", ("image",)).index["image"] == 1


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.lists(st.sampled_from(["s3_label", "x", "prob_urban", "url"]), max_size=4))
def test_any_order_and_case_of_known_names_resolves(rnd: random.Random, extra: list[str]) -> None:
    """Each role under any of its names, in any case, among other columns in any order, is found."""
    chosen = {role: rnd.choice(names) for role, names in ALIASES.items()}
    header = [*chosen.values(), *extra]
    rnd.shuffle(header)
    header = ["".join(c.upper() if rnd.random() < 0.5 else c for c in h) for h in header]
    layout = resolve_layout(header, "x.csv", ("image", "lat", "lon", "author"))
    for role, name in chosen.items():
        assert header[layout.index[role]].lower() == name


def test_columns_map_any_layout(tmp_path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "mine.csv").write_text("Photo,Y,X,who,lat\na.jpg,10.5,20.5,ann,99\n")
    records, _ = read_photo_csv(tmp_path / "mine.csv", tmp_path, columns="image=photo, lat=y,lon=X,author=Who")
    assert [(r.image, r.lat, r.lon, r.author) for r in records] == [("a.jpg", 10.5, 20.5, "ann")]
    assert parse_columns("lat=Y") == {"lat": "y"} and parse_columns(None) == {} and parse_columns(" ") == {}
    for bad in ("image", "where=x", "lat=", "lat=a,lat=b"):
        with pytest.raises(ValueError):
            parse_columns(bad)
    with pytest.raises(InputError, match="no column 'nope'.*--data.columns maps lat"):
        read_photo_csv(tmp_path / "mine.csv", tmp_path, columns="image=photo,lat=nope,lon=x")


def test_an_unknown_layout_is_one_line_showing_its_header_and_the_mapping(tmp_path) -> None:
    (tmp_path / "odd.csv").write_text("File,Breite,Laenge\na.jpg,1,2\n")
    with pytest.raises(InputError) as e:
        read_photo_csv(tmp_path / "odd.csv", tmp_path)
    text = str(e.value)
    assert "\n" not in text and "File,Breite,Laenge" in text and "lacks column(s) image, lat, lon" in text
    assert "--data.columns image=COLUMN,lat=COLUMN,lon=COLUMN" in text
    (tmp_path / "long.csv").write_text(",".join(f"column{i}" for i in range(5000)) + "\n")
    with pytest.raises(InputError) as e:
        read_photo_csv(tmp_path / "long.csv", tmp_path)
    assert len(str(e.value)) < 1000  # a huge header is shown cut


def test_row_labels_read_back() -> None:
    assert parse_row_label(row_label("a (line 3).jpg", 12)) == ("a (line 3).jpg", 12)
    assert parse_row_label("decoding failed") == ("decoding failed", None) and parse_row_label("line 7") == ("", 7)


@pytest.mark.shared_data
def test_cli_reads_a_published_layout_and_maps_columns(tmp_path, capsys) -> None:
    rows = dev_rows(3)
    (tmp_path / "list.csv").write_text(
        "Foto,Breite,Laenge\n" + "".join(f"{r['image']},{r['lat']},{r['lon']}\n" for r in rows)
    )
    args = ["locate", "--data.csv", str(tmp_path / "list.csv"), "--data.images", str(DEV_IMAGES), "--format", "csv"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Foto,Breite,Laenge" in err and "--data.columns" in err
    assert main([*args, "--data.columns", "image=foto,lat=breite,lon=laenge"]) == 0
    out = capsys.readouterr().out
    assert all(r["image"] in out for r in rows)
    assert main([*args, "--data.columns", "picture"]) == 2
    assert "--data.columns" in capsys.readouterr().err
    assert (
        main(
            [
                "cells",
                "--coords",
                str(YFCC4K),
                "--out",
                str(tmp_path / "c.csv"),
                "--cells.max_per_cell",
                "500",
                "--cells.min_per_cell",
                "10",
            ]
        )
        == 0
    )
    assert "from 4536 coordinates" in capsys.readouterr().out


@pytest.mark.shared_data
def test_evaluate_a_benchmark_without_its_photos_names_every_missing_one(tmp_path, capsys) -> None:
    empty = tmp_path / "photos"
    empty.mkdir()
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--benchmark",
                "yfcc4k",
                "--data.csv",
                str(YFCC4K),
                "--data.images",
                str(empty),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the reader's warning, one error line
    assert err.startswith("geoswc evaluate: error: ")
    assert "yfcc4k: 4536 photos expected as published, 0 evaluated, 4536 missing" in err
    assert str(out / "missing.csv") in err and not (out / "metrics.json").exists()
    with open(out / "missing.csv", encoding="utf-8") as f:
        missing = list(csv.DictReader(f))
    assert len(missing) == 4536 and missing[0] == {
        "image": "10201275523.jpg",
        "line": "2",
        "reason": "image file not found",
    }
    assert len({m["image"] for m in missing}) == 4536


@pytest.mark.shared_data
@pytest.mark.slow
def test_evaluate_a_published_subset_counts_the_benchmarks_photos(tmp_path, capsys) -> None:
    """Six rows of Im2GPS3k as published, one naming a photo that is not there: the benchmark's published size
    expected (2,997), the rows whose photos are there evaluated."""
    with open(IM2GPS3K, encoding="utf-8") as f:
        lines = f.read().splitlines()
    (tmp_path / "sub.csv").write_text("\n".join(lines[:7] + ["gone.jpg,someone,1.0,2.0,0,0,0,0,0,0"]) + "\n")
    sub = _csv_rows(tmp_path / "sub.csv")
    present = sum(1 for r in sub if (DEV_IMAGES / r["IMG_ID"]).is_file())
    assert (len(sub), present) == (7, 6)
    expected = BENCHMARKS["im2gps3k"].expected
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--benchmark",
                "im2gps3k",
                "--data.csv",
                str(tmp_path / "sub.csv"),
                "--data.images",
                str(DEV_IMAGES),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert f"{expected} photos expected as published, {present} evaluated, {expected - present} missing" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == present and metrics["missing"] == len(sub) - present
    assert metrics["benchmark"] == {
        "name": "im2gps3k",
        "expected": expected,
        "evaluated": present,
        "missing": expected - present,
        "rows_in_file": len(sub),
    }
    with open(out / "missing.csv", encoding="utf-8") as f:
        missing = list(csv.DictReader(f))
    assert missing[0] == {"image": "gone.jpg", "line": "8", "reason": "image file not found"}
    assert missing[1]["image"] == ""
    assert missing[1]["reason"].startswith(f"{expected - len(sub)} of the {expected} photos of im2gps3k")
    assert json.loads((out / "run.json").read_text())["benchmark"] == "im2gps3k"


@pytest.mark.shared_data
@pytest.mark.slow
def test_evaluate_im2gps3k_as_published_on_every_development_photo(tmp_path, capsys) -> None:
    """The issue's commands: Im2GPS3k's own metadata file, read as published (2,245 rows); then the evaluation
    beside the six published GeoEstimation models on the photos they share."""
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--benchmark",
                "im2gps3k",
                "--data.csv",
                str(IM2GPS3K),
                "--data.images",
                str(DEV_IMAGES),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    # All the file's rows (2,245) are read; every photo is there, and one (TRUNCATED) is refused as truncated
    # when decoded, so all but one (2,244) are evaluated and that one is named in missing.csv.
    rows = _csv_rows(IM2GPS3K)
    assert all((DEV_IMAGES / r["IMG_ID"]).is_file() for r in rows)
    assert sum(r["IMG_ID"] == TRUNCATED for r in rows) == 1
    tail = np.asarray(Image.open(DEV_IMAGES / TRUNCATED).convert("RGB"))[-8:]
    assert (tail == 128).all(), "the truncated photo's last rows are libjpeg's grey fill"
    evaluated, expected = len(rows) - 1, BENCHMARKS["im2gps3k"].expected
    assert metrics["n"] == evaluated and metrics["missing"] == 1
    assert metrics["benchmark"] == {
        "name": "im2gps3k",
        "expected": expected,
        "evaluated": evaluated,
        "missing": expected - evaluated,
        "rows_in_file": len(rows),
    }
    assert len(_csv_rows(out / "predictions.csv")) == evaluated
    missing = (out / "missing.csv").read_text()
    assert TRUNCATED in missing and f"{expected - len(rows)} of the {expected} photos" in missing
    baselines = sorted((SHARED / "baselines" / "geoestimation-im2gps3k").glob("*-dev.csv"))
    assert len(baselines) == 6
    capsys.readouterr()
    assert main(["compare", str(out), *map(str, baselines), "--out", str(tmp_path / "cmp")]) == 0
    stdout = capsys.readouterr().out
    # the published files hold all the rows' photos: the table covers the ones evaluated here and says so
    names = {r["IMG_ID"] for r in rows}
    isns = sum(r["img_id"] in names for r in _csv_rows(baselines[0].with_name("ISNs_M-fstar-S3-dev.csv")))
    assert isns == len(rows)
    assert f"| eval | {evaluated} | 1 |" in stdout and f"| ISNs_M-fstar-S3-dev | {isns} | 0 |" in stdout
    assert "The systems' photo sets differ: eval lacks 1" in stdout and f"{evaluated} shared photos only" in stdout
