"""Photo lists (``--data.files LIST``), column maps (``--data.columns``), what a command says when a CSV's photos
are not where it looked, the cell-threshold hint of ``geoswc cells``, and the wording of a few refusals."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoswc.cli import main
from geoswc.core.config import CellConfig
from geoswc.core.errors import SettingError
from geoswc.data.layouts import ROLES, parse_columns, resolve_layout
from geoswc.data.sources import Photos, list_names
from geoswc.geo.cells import FEW_CELLS, coarse_partition, fitting_thresholds
from geoswc.prediction.calibration import CALIBRATION_FILE, Calibrator
from geoswc.prediction.geolocator import default_model_dir

from .conftest import jpeg_bytes


def one_error_line(err: str, command: str) -> str:
    """The CLI's one error line of ``command`` (asserting there is exactly one)."""
    lines = [line for line in err.splitlines() if line.startswith(f"geoswc {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def photo_folder(folder: Path, n: int, color: tuple[int, int, int] = (120, 160, 200)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"p{i}.jpg" for i in range(n)]
    for p in paths:
        p.write_bytes(jpeg_bytes(color=color))
    return paths


# -- 1. photo lists: blank lines, comments, folders ------------------------------------------------------------


name_text = st.text(st.sampled_from("abcXYZ019_-. "), min_size=1, max_size=12).map(lambda s: f"p{s.strip()}.jpg")
filler = st.sampled_from(["", "   ", "\t", "# a comment", "   #indented comment", "#", "# photos/x.jpg"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(filler, max_size=3), name_text), min_size=1, max_size=20), st.lists(filler))
def test_a_list_names_exactly_its_photos_never_the_current_folder(entries, tail) -> None:
    """Whatever blank and comment lines surround the names, the list is the names, in order: never ``.``."""
    lines = [line for fillers, name in entries for line in (*fillers, f"  {name} ")] + tail
    for ending in ("\n", "\r\n"):
        text = ending.join(lines) + ending
        got = list_names(io.StringIO(text, newline=None), "list.txt")
        assert got == [Path(name) for _, name in entries]
        assert Path(".") not in got


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n\n  # comments\n"])
def test_a_list_naming_no_photo_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="names no photo"):
        list_names(io.StringIO(text), "list.txt")


def test_photos_read_a_list_file_relative_to_the_current_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    photo_folder(tmp_path / "photos", 2)
    (tmp_path / "list.txt").write_text("photos/p0.jpg\n\n# the second\r\nphotos/p1.jpg\n")
    data = Photos(files=Path("list.txt"))
    assert data.files == [Path("photos/p0.jpg"), Path("photos/p1.jpg")]
    # one photo or one folder is itself, a list of names as given; stdin is '-'
    assert Photos(files=Path("photos/p0.jpg")).files == [Path("photos/p0.jpg")]
    assert Photos(files=Path("photos")).files == [Path("photos")]
    assert Photos(files=["photos", "photos/p1.jpg"]).files == [Path("photos"), Path("photos/p1.jpg")]
    monkeypatch.setattr("sys.stdin", io.StringIO("photos/p1.jpg\n\n"))
    assert Photos(files=Path("-")).files == [Path("photos/p1.jpg")]


def test_list_file_refusals_are_settings_of_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    photo_folder(tmp_path / "photos", 1)
    (tmp_path / "dirs.txt").write_text("photos/p0.jpg\n\nphotos\n")
    (tmp_path / "binary.lst").write_bytes(b"\xff\xfe\x00photo")
    cases = {"dirs.txt": "line 3 names a folder", "binary.lst": "not a photo list", "missing.txt": "not found"}
    for name, needle in cases.items():
        with pytest.raises(SettingError) as e:
            Photos(files=Path(name))
        assert e.value.field == "files" and e.value.owner is Photos and needle in str(e.value), str(e.value)
    with pytest.raises(SettingError, match="empty photo name"):
        Photos(files=["photos/p0.jpg", ""])


def test_cli_refuses_a_list_line_naming_a_folder_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    photo_folder(tmp_path / "photos", 1)
    (tmp_path / "list.txt").write_text("photos/p0.jpg\n\n# the folder:\nphotos\n")
    assert main(["locate", "--data.files", "list.txt"]) == 2
    line = one_error_line(capsys.readouterr().err, "locate")
    assert "--data.files" in line and "list.txt line 4" in line and "(photos)" in line, line


def test_cli_refuses_a_list_of_only_blank_and_comment_lines(tmp_path, monkeypatch, capsys) -> None:
    """Before: the blank line became '.', and every photo under the current folder was located."""
    monkeypatch.chdir(tmp_path)
    photo_folder(tmp_path / "elsewhere", 2)
    (tmp_path / "list.txt").write_text("\n# nothing yet\n\n")
    assert main(["locate", "--data.files", "list.txt"]) == 2
    line = one_error_line(capsys.readouterr().err, "locate")
    assert "--data.files" in line and "names no photo" in line, line


@pytest.mark.slow
def test_cli_locates_the_listed_photos_only(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    photo_folder(tmp_path / "photos", 2)
    photo_folder(tmp_path / "others", 3, color=(20, 200, 40))  # a blank line used to add these
    (tmp_path / "list.txt").write_text("photos/p0.jpg\n\n# the second one\nphotos/p1.jpg\n\n")
    out = tmp_path / "pred.jsonl"
    assert main(["locate", "--data.files", "list.txt", "--output", str(out)]) == 0
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == ["photos/p0.jpg", "photos/p1.jpg"]
    assert f"2 photos located -> {out} (jsonl)" in capsys.readouterr().out


# -- 2. a long list parses as fast as the same names given as arguments ----------------------------------------


@pytest.mark.slow
def test_a_list_of_1500_names_parses_about_as_fast_as_arguments(tmp_path, monkeypatch, capsys) -> None:
    """Before: 26 s against 3 s (jsonargparse read the list and re-copied it once per name: quadratic)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    names = [f"photos/p{i:04d}.jpg" for i in range(1500)]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    nowhere = ["--model", str(tmp_path / "no-model")]  # parsed, then refused at once: no photo is read

    def seconds(args: list[str]) -> float:
        start = time.perf_counter()
        assert main(["locate", *args, *nowhere]) == 2
        assert "no-model" in one_error_line(capsys.readouterr().err, "locate")
        return time.perf_counter() - start

    as_arguments = seconds(names)
    as_list = seconds(["--data.files", "list.txt"])
    assert as_list < 2 * as_arguments + 2.0, (as_list, as_arguments)


# -- 3. --data.columns: one column, one role -------------------------------------------------------------------


column_name = st.text(st.sampled_from("abcxyz_0"), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ROLES), min_size=2, max_size=4, unique=True), column_name, st.data())
def test_one_column_for_two_roles_is_refused(roles, shared, data) -> None:
    pair = data.draw(st.lists(st.sampled_from(roles), min_size=2, max_size=2, unique=True))
    columns = {r: shared if r in pair else f"{shared}{i}x" for i, r in enumerate(roles)}  # one collision only
    with pytest.raises(ValueError) as e:
        parse_columns(",".join(f"{r}={c}" for r, c in columns.items()))
    message = str(e.value)
    assert repr(shared) in message and all(r in message for r in pair) and "\n" not in message, message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ROLES), min_size=1, max_size=4, unique=True), st.data())
def test_distinct_columns_map_as_given(roles, data) -> None:
    columns = data.draw(st.lists(column_name, min_size=len(roles), max_size=len(roles), unique=True))
    text = ", ".join(f"{r.upper()} = {c.upper()}" for r, c in zip(roles, columns, strict=True))
    assert parse_columns(text) == dict(zip(roles, columns, strict=True))


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("where=x,lat=a,lon=b", ["unknown role 'where'", "image, lat, lon, author"]),
        ("image=,lat=a,lon=b", ["'image='", "names no column for image"]),
        ("image=a,lat=b,lat=c", ["lat is mapped twice"]),
        ("image", ["is not ROLE=COLUMN"]),
    ],
)
def test_bad_column_maps_say_what_is_wrong(text: str, needles: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        parse_columns(text)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_cli_refuses_a_column_for_two_roles(tmp_path, capsys) -> None:
    coords = tmp_path / "coords.csv"
    coords.write_text("x,y\n" + "".join(f"{i % 80},{i % 170}\n" for i in range(100)))
    out = tmp_path / "cells.csv"
    assert main(["cells", "--coords", str(coords), "--out", str(out), "--columns", "lat=y,lon=y"]) == 2
    line = one_error_line(capsys.readouterr().err, "cells")
    assert "'y'" in line and "lat" in line and "lon" in line and not out.exists(), line
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "odd.csv").write_text("img,y\na.jpg,1\n")
    args = ["locate", "--data.csv", str(tmp_path / "odd.csv"), "--data.columns", "image=img,lat=y,lon=y"]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err, "locate")
    assert line.startswith("geoswc locate: error: --data.columns: column 'y'") and "lat and lon" in line, line


def test_a_mapped_column_is_not_another_roles_by_its_name() -> None:
    """``image=lat`` maps the column named lat to the image: the latitude is not read from it too."""
    layout = resolve_layout(["lat", "breite", "lon"], "x.csv", ("image",), parse_columns("image=lat"))
    assert layout.index["image"] == 0 and layout.index["lat"] == -1 and layout.index["lon"] == 2


# -- 4. calibrate reads the CSV with --data.columns ------------------------------------------------------------


def odd_set(folder: Path, n: int = 8) -> Path:
    """``n`` photos in ``folder/img`` and a CSV naming them under columns no layout knows."""
    photo_folder(folder / "img", n)
    rows = "".join(f"p{i}.jpg,{10 + 5 * i},{20 + 7 * i}\n" for i in range(n))
    (folder / "odd.csv").write_text("PHOTO,BREITE,LAENGE\n" + rows)
    return folder / "odd.csv"


@pytest.mark.slow
def test_calibrate_reads_the_csv_with_its_columns(tmp_path, capsys) -> None:
    model = Path(shutil.copytree(default_model_dir(), tmp_path / "model"))
    (model / CALIBRATION_FILE).unlink(missing_ok=True)
    csv = odd_set(tmp_path)
    args = ["calibrate", "--model", str(model), "--data.csv", str(csv), "--data.images", str(tmp_path / "img")]
    assert main([*args, "--data.columns", "image=PHOTO,lat=BREITE,lon=LAENGE"]) == 0, capsys.readouterr().err
    fitted = Calibrator.load(model / CALIBRATION_FILE).fitted
    assert fitted["how"] == "labelled set odd.csv" and fitted["n"] == 8


# -- 5. a CSV whose photos are not in the folder looked in -----------------------------------------------------


@pytest.mark.parametrize("images_given", [True, False])
def test_features_names_the_folder_searched(tmp_path, capsys, images_given: bool) -> None:
    csv = odd_set(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    args = ["features", "--data.csv", str(csv), "--out", str(tmp_path / "feats")]
    args += ["--data.columns", "image=PHOTO,lat=BREITE,lon=LAENGE"]
    if images_given:
        args += ["--data.images", str(wrong)]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err, "features")
    searched = wrong if images_given else tmp_path  # without --data.images, beside the CSV
    assert f" in {searched.resolve()}:" in line and "8 of its 8 rows" in line, line
    assert ("check --data.images" if images_given else "give --data.images") in line, line


def test_a_csv_of_bad_rows_still_says_what_is_wrong(tmp_path, capsys) -> None:
    photo_folder(tmp_path / "img", 1)
    (tmp_path / "bad.csv").write_text("image,lat,lon\np0.jpg,100,0\n")
    args = ["features", "--data.csv", str(tmp_path / "bad.csv"), "--data.images", str(tmp_path / "img")]
    assert main([*args, "--out", str(tmp_path / "feats")]) == 2
    line = one_error_line(capsys.readouterr().err, "features")
    assert "holds no usable photo" in line and "lat 100.0 is outside" in line, line


# -- 6. the cell thresholds hint --------------------------------------------------------------------------------


def coords_csv(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
    path.write_text("lat,lon\n" + "".join(f"{a:.5f},{b:.5f}\n" for a, b in zip(lat, lon, strict=True)))
    return path


def test_cells_warns_when_the_thresholds_are_too_coarse(tmp_path, capsys) -> None:
    coords = coords_csv(tmp_path / "coords.csv", 603)
    args = ["cells", "--coords", str(coords), "--out", str(tmp_path / "cells.csv")]
    assert main([*args, "--cells.max_per_cell", "1000", "--cells.min_per_cell", "50"]) == 0
    err = capsys.readouterr().err
    hint = [line for line in err.splitlines() if line.startswith("WARNING") and "too coarse" in line]
    assert len(hint) == 1, err
    assert "--cells.max_per_cell 12 --cells.min_per_cell 1" in hint[0] and "N/50" in hint[0], hint[0]
    # the thresholds it suggests give a partition it does not warn about
    assert main([*args, "--cells.max_per_cell", "12", "--cells.min_per_cell", "1"]) == 0
    captured = capsys.readouterr()
    assert "too coarse" not in captured.err and "cells from 603 coordinates" in captured.out


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10**9), st.integers(1, 10**6), st.integers(0, 5000), st.integers(1, 10**6))
def test_the_hint_follows_its_rule(points: int, top: int, cells: int, low_seed: int) -> None:
    config = CellConfig(max_per_cell=top, min_per_cell=min(top, low_seed))
    hint = coarse_partition(cells, points, config)
    assert bool(hint) == (cells < FEW_CELLS or top * 10 > points)
    fit_top, fit_low = fitting_thresholds(points)
    CellConfig(max_per_cell=fit_top, min_per_cell=fit_low)  # always a valid setting
    assert abs(fit_top - max(1, points / 50)) <= 0.5 and (fit_low == 1 or abs(fit_low - fit_top / 20) <= 0.5)
    if f"--cells.max_per_cell {fit_top} --cells.min_per_cell {fit_low} " in hint:  # a suggestion: a change, finer
        assert fit_top <= top and (fit_top, fit_low) != (top, config.min_per_cell)
    elif hint:
        assert "give more coordinates" in hint and (fit_top > top or (fit_top, fit_low) == (top, config.min_per_cell))
    assert "\n" not in hint


# -- 7. wording ---------------------------------------------------------------------------------------------------


def test_compare_names_a_missing_path_and_what_it_expects(tmp_path, capsys) -> None:
    (tmp_path / "run").mkdir()
    assert main(["compare", str(tmp_path / "runn"), str(tmp_path / "run"), "--out", str(tmp_path / "cmp")]) == 2
    line = one_error_line(capsys.readouterr().err, "compare")
    assert f"{tmp_path / 'runn'} not found" in line and "evaluation folder" in line and "CSV file" not in line, line


def test_calibrate_without_photos_says_give_one_of(tmp_path, capsys) -> None:
    assert main(["calibrate", "--model", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys.readouterr().err, "calibrate")
    assert "one of" in line and "not both" not in line and "--features" in line and "--data.csv" in line, line
    csv = odd_set(tmp_path)
    both = ["--features", str(tmp_path / "f"), "--data.csv", str(csv)]
    assert main(["calibrate", "--model", str(tmp_path / "m"), *both]) == 2
    assert "not both" in one_error_line(capsys.readouterr().err, "calibrate")


@pytest.mark.slow
def test_one_photo_located_is_singular(tmp_path, capsys) -> None:
    (photo,) = photo_folder(tmp_path / "photos", 1)
    out = tmp_path / "pred.jsonl"
    assert main(["locate", str(photo), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"1 photo located -> {out} (jsonl)" in text and "1 photos" not in text, text
