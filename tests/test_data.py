import numpy as np
import pytest

from geoswc.core.errors import InputError
from geoswc.data.records import read_photo_csv, scan_exif_folder
from geoswc.data.splits import author_folds

from .conftest import gps_exif, jpeg_bytes


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes())
    return tmp_path


def test_csv_reports_and_skips_bad_rows(folder):
    csv = folder / "x.csv"
    csv.write_text(
        "image,lat,lon,author\n"
        "a.jpg,48.85,2.35,alice\n"
        "b.jpg,95,2.35,bob\n"  # lat out of range
        "b.jpg,10,-200,bob\n"  # lon out of range
        "b.jpg,nan,1,bob\n"  # not finite
        "b.jpg,,1,bob\n"  # missing
        "b.jpg,abc,1,bob\n"  # not a number
        "c.jpg,1,1,carol\n"  # image missing
        "a.jpg,1,1,alice\n"  # duplicate id
        "b.jpg,-33.86,151.2,\n"
    )
    recs, rep = read_photo_csv(csv, folder)
    assert [r.image for r in recs] == ["a.jpg", "b.jpg"]
    assert recs[0].author == "alice" and recs[1].author == ""
    assert rep.total == 9 and rep.kept == 2 and len(rep.skipped) == 7
    text = rep.summary(first=10)
    for needle in (
        "outside ±90",
        "outside ±180",
        "not finite",
        "missing lat",
        "not a number",
        "image file not found",
        "duplicate image id",
    ):
        assert needle in text


def test_csv_errors_name_the_fix(tmp_path):
    with pytest.raises(InputError, match="lacks column"):
        (tmp_path / "a.csv").write_text("file,latitude,lon\nx,1,2\n")
        read_photo_csv(tmp_path / "a.csv", tmp_path)
    (tmp_path / "b.csv").write_bytes("image,lat,lon\nstra\xdfe.jpg,1,2\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_photo_csv(tmp_path / "b.csv", tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_photo_csv(tmp_path / "nope.csv", tmp_path)
    with pytest.raises(InputError, match="directory"):
        read_photo_csv(tmp_path, tmp_path)


def test_csv_header_case_and_bom(folder):
    (folder / "c.csv").write_bytes("\ufeffImage,LAT,Lon\na.jpg,1.5,2.5\n".encode())
    recs, _ = read_photo_csv(folder / "c.csv", folder)
    assert (recs[0].lat, recs[0].lon) == (1.5, 2.5)


def test_exif_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "paris.jpg").write_bytes(jpeg_bytes(exif=gps_exif(48.8584, 2.2945)))
    (tmp_path / "sydney.jpg").write_bytes(jpeg_bytes(exif=gps_exif(-33.8568, 151.2153)))
    (tmp_path / "nogps.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    recs, rep = scan_exif_folder(tmp_path)
    got = {r.image: (round(r.lat, 4), round(r.lon, 4)) for r in recs}
    assert got == {"sub/paris.jpg": (48.8584, 2.2945), "sydney.jpg": (-33.8568, 151.2153)}
    assert {i for i, _ in rep.skipped} == {"nogps.jpg", "broken.jpg"}


def test_author_folds_are_disjoint_and_balanced():
    rng = np.random.default_rng(0)
    authors = [f"a{int(i)}" for i in rng.zipf(1.6, 2000) % 150] + [""] * 30
    fold = author_folds(authors, 5)
    for a in set(authors) - {""}:
        assert len({fold[i] for i, x in enumerate(authors) if x == a}) == 1
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= max(np.unique(authors, return_counts=True)[1][1:])
    with pytest.raises(InputError):
        author_folds(["a", "a", "b"], 5)
