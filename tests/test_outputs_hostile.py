"""Hostile outputs: where a command's files may go, what they hold for the people who open them, and what a
crash leaves behind. Built on synthetic galleries and the embedded model, so it needs no ``../shared``.

1. no output lands inside or over a geoswc artifact folder; 2. an empty result still replaces an earlier output;
3. an interrupted index rebuild leaves the earlier index whole; 4. no CSV text cell starts a spreadsheet formula;
5. no Markdown table cell breaks its row; 6. ``compare`` scores the distances between a file's coordinates, not
the distances the file claims.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from geoswc import workflow
from geoswc.core import artifact_folders, atomic_files, tensor_files, text_cells
from geoswc.core.errors import InputError
from geoswc.core.sphere import haversine_km
from geoswc.evaluation.compare import System, compare_systems, markdown, photo_id, read_system
from geoswc.evaluation.evaluate import PREDICTION_COLUMNS, MethodResult, missing_csv
from geoswc.gallery import files as gallery_files
from geoswc.gallery.files import GalleryWriter, load_gallery
from geoswc.gallery.search import GalleryIdentity
from geoswc.prediction.geolocator import Geolocator, default_model_dir
from geoswc.prediction.output import Written, write_predictions
from geoswc.prediction.results import CSV_COLUMNS, LocateFailure, Prediction

from .conftest import KAUAI, jpeg_bytes
from .test_bad_input import run_cli
from .test_hostile import one_error_line

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMULA = ("=", "+", "-", "@", "\t", "\r")
"""OWASP's characters that make a spreadsheet cell a formula."""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the embedded model with its index."""
    folder = tmp_path_factory.mktemp("outputs") / "model"
    shutil.copytree(default_model_dir(), folder)
    return folder


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _prediction(image: str, lat: float = -33.5, lon: float = -70.25, localizable: bool | None = None) -> Prediction:
    return Prediction(image, lat, lon, 0.5, "swc", "89c25", 0.25, [], localizable=localizable)


# -- 1. no output lands inside or over an artifact folder ---------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "kind"),
    [
        ("{model}/config.json", "model"),  # over the model's own record
        ("{model}/config.jsonl", "model"),
        ("{model}/cells.csv", "model"),
        ("{model}/index/pred.jsonl", "gallery index"),
        ("{model}/runs/pred.csv", "model"),  # a new folder inside the model
    ],
)
def test_locate_never_writes_inside_a_model(
    where: str, kind: str, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(model)
    out = Path(where.format(model=model))
    rc, _, err = run_cli(["locate", KAUAI, "--model", model, "--output", out], capsys)
    one_error_line(rc, err, "locate", f"holds a geoswc {kind}", "outside that folder")
    assert _snapshot(model) == before and not (model / "runs").exists()


def test_locate_never_writes_through_a_link_into_a_model(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(model)
    link = tmp_path / "pred.jsonl"
    link.symlink_to(model / "config.json")
    rc, _, err = run_cli(["locate", KAUAI, "--model", model, "--output", link], capsys)
    one_error_line(rc, err, "locate", "holds a geoswc model")
    assert _snapshot(model) == before and link.is_symlink()


def test_the_writer_itself_refuses_an_artifact_folder(model: Path, tmp_path: Path) -> None:
    """The root: every output written through write_predictions is checked, whoever calls it."""
    before = _snapshot(model)
    for out in (model / "config.json", model / "index" / "index.json", model / "index"):
        with pytest.raises(InputError, match="holds a geoswc|is a directory"):
            write_predictions([_prediction("a.jpg")], out, "jsonl")
    assert _snapshot(model) == before
    ok = tmp_path / "pred.jsonl"
    assert write_predictions([_prediction("a.jpg")], ok, "jsonl") == Written(1, 0, 0)
    assert json.loads(ok.read_text())["image"] == "a.jpg"


FOLDER_CLASHES = {
    "evaluate_inside_a_model": (
        ["evaluate", "--data.csv", "{csv}", "--data.images", "{tmp}", "--model", "{model}", "--out", "{model}/eval"],
        "model",
    ),
    "evaluate_inside_an_index": (
        ["evaluate", "--data.csv", "{csv}", "--data.images", "{tmp}", "--out", "{model}/index/eval"],
        "gallery index",
    ),
    "compare_inside_a_model": (["compare", "{csv}", "{csv2}", "--out", "{model}/cmp"], "model"),
    "features_inside_a_model": (
        ["features", "--data.csv", "{csv}", "--data.images", "{tmp}", "--out", "{model}/features"],
        "model",
    ),
    "index_inside_another_model": (
        ["index", "--model", "{default}", "--features", "{tmp}/nope", "--out", "{model}/other-index"],
        "model",
    ),
}


@pytest.mark.parametrize("case", list(FOLDER_CLASHES))
def test_output_folders_never_go_inside_another_artifact(
    case: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, kind = FOLDER_CLASHES[case]
    (tmp_path / "a.csv").write_text("image,lat,lon\na.jpg,1,2\n")
    (tmp_path / "b.csv").write_text("image,lat,lon\na.jpg,1,2\n")
    subs = {"model": model, "tmp": tmp_path, "csv": tmp_path / "a.csv", "csv2": tmp_path / "b.csv"}
    subs["default"] = default_model_dir()
    before = _snapshot(model)
    rc, _, err = run_cli([a.format(**subs) for a in argv], capsys)
    one_error_line(rc, err, argv[0], "lies inside", f"holds a geoswc {kind}")
    assert _snapshot(model) == before


def test_claiming_an_output_folder_allows_only_the_models_own_index(model: Path, tmp_path: Path) -> None:
    assert artifact_folders.claim_output_folder(model / "index", "gallery index", inside=model) == model / "index"
    assert artifact_folders.claim_output_folder(model / "index-pq", "gallery index", inside=model) == model / "index-pq"
    with pytest.raises(InputError, match="lies inside"):
        artifact_folders.claim_output_folder(model / "index-pq", "gallery index", inside=default_model_dir())
    with pytest.raises(InputError, match="holds a geoswc gallery index"):
        artifact_folders.claim_output_folder(model / "index", "evaluation")
    assert artifact_folders.claim_output_folder(tmp_path / "new" / "eval", "evaluation") == tmp_path / "new" / "eval"
    assert artifact_folders.claim_output(tmp_path / "new" / "pred.csv") == tmp_path / "new" / "pred.csv"


# -- 2. an empty result still replaces an earlier output ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "empty"),
    [
        ("jsonl", ""),
        ("csv", ",".join(CSV_COLUMNS) + "\n"),
        ("geojson", '{"type": "FeatureCollection", "features": [\n\n]}\n'),
        ("text", ""),
    ],
)
def test_a_run_whose_every_prediction_is_left_out_replaces_the_earlier_output(
    fmt: str, empty: str, tmp_path: Path
) -> None:
    out = tmp_path / "old.out"
    out.write_text("earlier results\n")
    w = write_predictions([_prediction("a.jpg", localizable=False)], out, fmt, leave_out=True)  # type: ignore[arg-type]
    assert w == Written(0, 0, 1)
    assert out.read_text() == empty
    if fmt == "geojson":
        assert json.loads(out.read_text()) == {"type": "FeatureCollection", "features": []}
    # a run in which every photo failed has no answer: the earlier file stays
    out.write_text("earlier results\n")
    w = write_predictions([LocateFailure("b.jpg", "not an image")], out, fmt)  # type: ignore[arg-type]
    assert w == Written(0, 1, 0) and out.read_text() == "earlier results\n"


@pytest.mark.slow
def test_locate_abstaining_on_every_photo_empties_the_earlier_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, table = tmp_path / "old.jsonl", tmp_path / "old.csv"
    for out in (jsonl, table):
        out.write_text("earlier results\n")
        argv = ["locate", KAUAI, "--abstain.leave_out", "true", "--abstain.within_km", "1", "--abstain.p", "1.0"]
        rc, _, err = run_cli([*argv, "--output", out], capsys)
        assert rc == 0, err
    assert jsonl.read_text() == "" and table.read_text() == ",".join(CSV_COLUMNS) + "\n"


# -- 3. an interrupted index rebuild leaves the earlier index whole ------------------------------------------------

N, D, C = 600, 16, 6
IDENTITY = GalleryIdentity("model0000", "cells0000", C)


def _rows(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((N, D)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    names = [f"s{seed}-{i}.jpg" for i in range(N)]
    return emb, rng.uniform(-60, 60, N), rng.uniform(-180, 180, N), rng.integers(-1, C, N), names, ["a"] * N


def build(folder: Path, seed: int) -> None:
    """Write the gallery of ``seed`` into ``folder``, 100 photos a chunk."""
    emb, lat, lon, cell, names, authors = _rows(seed)
    with GalleryWriter(folder, D, IDENTITY) as w:
        for s in range(0, N, 100):
            e = s + 100
            w.add(emb[s:e], lat[s:e], lon[s:e], cell[s:e], names[s:e], authors[s:e])
        w.finish()


def answers(folder: Path) -> list[object]:
    """What an index answers: its photos in row order, and the top 5 of a few whole-gallery searches."""
    g = load_gallery(folder)
    rng = np.random.default_rng(99)
    out: list[object] = [list(g.names), g.lat.tolist()]
    for _ in range(4):
        rows, sims = g.search(rng.standard_normal(D).astype(np.float32), 5)
        out.append(([g.names[int(r)] for r in rows], np.round(sims, 5).tolist()))
    return out


class Killed(Exception):
    """Stands for the end of a process in the middle of a rebuild."""


def _kill_after(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Make the next rebuild stop at ``point``."""
    if point == "embeddings":  # in the middle of index.safetensors' rows: 11 header and small-tensor writes first
        write, calls = tensor_files.HashingWriter.write, {"n": 0}

        def failing(self: tensor_files.HashingWriter, data: object) -> None:
            calls["n"] += 1
            if calls["n"] == 13:
                raise Killed
            write(self, data)  # type: ignore[arg-type]

        monkeypatch.setattr(tensor_files.HashingWriter, "write", failing)
    elif point == "items":  # index.safetensors and items.csv written, index.json not yet
        items = GalleryWriter._write_items

        def then_fail(self: GalleryWriter, *byte_runs: object) -> str:
            items(self, *byte_runs)
            raise Killed

        monkeypatch.setattr(GalleryWriter, "_write_items", then_fail)
    elif point == "record":  # everything but index.json
        write_json = atomic_files.write_json

        def no_record(path: Path, data: object) -> None:
            if Path(path).name == "index.json":
                raise Killed
            write_json(path, data)

        monkeypatch.setattr(atomic_files, "write_json", no_record)
    else:  # the new index whole, not yet swapped in

        def no_swap(a: Path, b: Path) -> bool:
            raise Killed

        monkeypatch.setattr(artifact_folders, "exchange_paths", no_swap)


@pytest.mark.parametrize("point", ["embeddings", "items", "record", "swap"])
def test_an_interrupted_rebuild_leaves_the_earlier_index_whole(
    point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    idx = tmp_path / "idx"
    build(idx, seed=1)
    (idx / "notes.txt").write_text("mine")  # not the index's: kept by every rebuild
    before = answers(idx)
    with monkeypatch.context() as m:
        _kill_after(m, point)
        with pytest.raises(Killed):
            build(idx, seed=2)
    assert answers(idx) == before  # the earlier index loads, checksums and all, and answers as it did
    assert (idx / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".idx.*")) and not list(idx.glob(".staging.*"))
    build(idx, seed=2)  # a complete rebuild replaces it
    build(tmp_path / "fresh", seed=2)
    assert answers(idx) == answers(tmp_path / "fresh") != before
    assert (idx / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".idx.*"))
    assert sorted(p.name for p in idx.iterdir()) == ["index.json", "index.safetensors", "items.csv", "notes.txt"]


def test_a_rebuild_from_coded_to_flat_leaves_no_codes(tmp_path: Path) -> None:
    from geoswc.core.config import GalleryCodes

    emb, lat, lon, cell, names, authors = _rows(1)
    with GalleryWriter(tmp_path / "idx", D, IDENTITY, GalleryCodes(kind="sq8")) as w:
        w.add(emb, lat, lon, cell, names, authors)
        w.finish()
    assert (tmp_path / "idx" / gallery_files.CODES_FILE).is_file()
    build(tmp_path / "idx", seed=1)
    assert not (tmp_path / "idx" / gallery_files.CODES_FILE).exists() and load_gallery(tmp_path / "idx").codes == "flat"


KILL_SCRIPT = """
import os, signal, shutil, sys
from pathlib import Path
from geoswc.core import artifact_folders, atomic_files, tensor_files
from tests.test_outputs_hostile import build

point, idx = sys.argv[1], Path(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "mid_write":
    write, n = tensor_files.HashingWriter.write, [0]
    def failing(self, data):
        n[0] += 1
        if n[0] == 13:
            die()
        write(self, data)
    tensor_files.HashingWriter.write = failing
elif point == "between_renames":  # a system without an atomic exchange, killed between its two renames
    artifact_folders.exchange_paths = lambda a, b: False
    rename, n = os.rename, [0]
    def second_kills(a, b):
        n[0] += 1
        if n[0] == 2:
            die()
        rename(a, b)
    os.rename = second_kills
else:  # swapped in, the old one not yet removed
    rmtree = shutil.rmtree
    shutil.rmtree = lambda p, *a, **k: die() if str(p).endswith(".new") else rmtree(p, *a, **k)
build(idx, seed=2)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("point", "which"), [("mid_write", 1), ("between_renames", 1), ("after_swap", 2)])
def test_a_rebuild_killed_at_any_point_leaves_an_index_whole(point: str, which: int, tmp_path: Path) -> None:
    """SIGKILL: no cleanup runs. The folder then holds the earlier index or the new one, whole (put back by the
    next load when a system without an atomic exchange was killed between its renames); the next build cleans up."""
    idx = tmp_path / "idx"
    build(idx, seed=1)
    build(tmp_path / "two", seed=2)
    expected = {1: answers(idx), 2: answers(tmp_path / "two")}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, point, str(idx)], cwd=ROOT, env=ENV, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert list(tmp_path.glob(".idx.*")), "the killed build left its staging folder"
    assert answers(idx) == expected[which]
    build(idx, seed=2)
    assert answers(idx) == expected[2] and not list(tmp_path.glob(".idx.*"))


@pytest.mark.slow
def test_an_interrupted_index_command_keeps_the_models_index(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``geoswc index --out MODEL/index`` over the model's own index: killed after writing the new rows, the old
    index still loads and locates as before; a complete run replaces it."""
    m = tmp_path / "model"
    shutil.copytree(model, m)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(KAUAI.read_bytes())
    (photos / "b.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "g.csv").write_text("image,lat,lon\na.jpg,21.9,-159.5\nb.jpg,48.8,2.3\n")
    argv = ["features", "--model", m, "--data.csv", tmp_path / "g.csv", "--data.images", photos]
    assert run_cli([*argv, "--out", tmp_path / "f"], capsys)[0] == 0
    geo = Geolocator.load(m)
    before = (len(geo.gallery), geo.locate(KAUAI).lat, geo.locate(KAUAI).lon)  # type: ignore[arg-type]
    with monkeypatch.context() as mp:
        _kill_after(mp, "items")
        with pytest.raises(Killed):
            workflow.index(m, features=tmp_path / "f")
    geo = Geolocator.load(m)
    assert (len(geo.gallery), geo.locate(KAUAI).lat, geo.locate(KAUAI).lon) == before  # type: ignore[arg-type]
    assert run_cli(["index", "--model", m, "--features", tmp_path / "f"], capsys)[0] == 0
    assert len(load_gallery(m / "index")) == 2 and not list(m.glob(".index.*"))


# -- 4. no CSV text cell starts a spreadsheet formula ----------------------------------------------------------------


def _unquoted(cell: str) -> bool:
    return not cell.startswith(FORMULA)


@SETTINGS
@given(st.text(max_size=40))
def test_any_text_cell_is_escaped_and_comes_back(text: str) -> None:
    cell = text_cells.csv_text(text)
    assert text_cells.csv_plain(cell) == text
    assert _unquoted(cell)
    if text.startswith((*FORMULA, "'")):
        assert cell == "'" + text
    else:
        assert cell == text


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", '=HYPERLINK("http://x")', "'=1"])
def test_formula_cells_get_a_quote(text: str) -> None:
    assert text_cells.csv_text(text) == "'" + text and text_cells.csv_plain("'" + text) == text


names = st.lists(st.text(max_size=24), min_size=1, max_size=5)


@SETTINGS
@given(names, st.text(max_size=24))
def test_locate_csv_escapes_every_text_cell_and_no_number(tmp_path_factory, images: list[str], error: str) -> None:
    out = tmp_path_factory.mktemp("csv") / "pred.csv"
    results = [_prediction(n) for n in images] + [LocateFailure("=" + error, "-" + error, "@kind")]
    write_predictions(results, out, "csv")
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [text_cells.csv_text(n) for n in images] + ["'=" + error]
    assert [text_cells.csv_plain(r["image"]) for r in rows[:-1]] == images
    assert all(r["lat"] == "-33.5" and r["lon"] == "-70.25" for r in rows[:-1])  # numbers stay numbers
    assert rows[-1]["error"] == "'-" + error and rows[-1]["kind"] == "'@kind"
    text_columns = ("image", "method", "cell", "place", "country", "error", "kind")
    assert all(_unquoted(r[c]) for r in rows for c in text_columns)


def test_locate_csv_on_standard_output_is_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    write_predictions([_prediction("=cmd|' /C calc'!A0"), _prediction("-1.jpg")], None, "csv")
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["image"] for r in rows] == ["'=cmd|' /C calc'!A0", "'-1.jpg"] and rows[0]["lat"] == "-33.5"


def _method_result(images: list[str], rng: np.random.Generator | None = None) -> MethodResult:
    n = len(images)
    rng = rng or np.random.default_rng(0)
    lat, lon = -rng.uniform(1, 60, n), -rng.uniform(1, 170, n)  # negative: numbers that begin with '-'
    preds = [_prediction(name, float(a) - 0.5, float(b)) for name, a, b in zip(images, lat, lon, strict=True)]
    return MethodResult("swc", images, lat, lon, preds)


@SETTINGS
@given(names)
def test_predictions_csv_escapes_names_and_compare_reads_them_back(tmp_path_factory, images: list[str]) -> None:
    ids = [photo_id(n) for n in images]
    assume(all(ids) and len(set(ids)) == len(ids))
    folder = tmp_path_factory.mktemp("eval")
    (folder / "predictions.csv").write_text(_method_result(images).to_csv(), encoding="utf-8")
    with open(folder / "predictions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == PREDICTION_COLUMNS
    assert [r[0] for r in rows[1:]] == [text_cells.csv_text(n) for n in images]
    assert all(r[1].startswith("-") and float(r[1]) < 0 for r in rows[1:])  # numbers are never quoted
    assert all(_unquoted(c) for r in rows for c in r[:1] + r[6:7])
    assert read_system(folder).ids == ids


def test_missing_csv_escapes_its_text_cells() -> None:
    text = missing_csv([('=HYPERLINK("http://x") (line 3)', "-not an image"), ("@a.jpg", "+why")], "=gap")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [
        ["image", "line", "reason"],
        ['\'=HYPERLINK("http://x")', "3", "'-not an image"],
        ["'@a.jpg", "", "'+why"],
        ["", "", "'=gap"],
    ]


@pytest.mark.slow
def test_evaluate_escapes_its_csvs_and_compare_reads_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    images = ["=cmd.jpg", "+a.jpg", "-b.jpg", "@c.jpg", "'d.jpg"]
    for name in images:
        (photos / name).write_bytes(KAUAI.read_bytes())
    rows = [*(f"{n},21.9,-159.5" for n in images), "=missing.jpg,1,2"]
    (tmp_path / "bench.csv").write_text("image,lat,lon\n" + "\n".join(rows) + "\n")
    argv = ["evaluate", "--data.csv", tmp_path / "bench.csv", "--data.images", photos, "--out", tmp_path / "ev"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    with open(tmp_path / "ev" / "predictions.csv", encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["image"] for r in table] == ["'=cmd.jpg", "'+a.jpg", "'-b.jpg", "'@c.jpg", "''d.jpg"]
    assert all(float(r["true_lon"]) == -159.5 and r["true_lon"].startswith("-") for r in table)
    missing = list(csv.DictReader(io.StringIO((tmp_path / "ev" / "missing.csv").read_text())))
    assert [r["image"] for r in missing] == ["'=missing.jpg"]
    assert read_system(tmp_path / "ev").ids == images


# -- 5. no Markdown table cell breaks its row ----------------------------------------------------------------------

BREAKS = re.compile("\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def table_cells(line: str) -> list[str]:
    """The cells of a GitHub-Flavored Markdown table row: split on the pipes no backslash escapes, trimmed."""
    assert line.startswith("|") and line.endswith("|"), line
    cells, cur, i = [], "", 1
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            cur += line[i : i + 2]
            i += 2
            continue
        if line[i] == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += line[i]
        i += 1
    return cells


def shown(cell: str) -> str:
    """What a cell shows: backslash escapes, ``<br>`` and the entities ``markdown_cell`` writes, undone."""
    text = re.sub(r"\\(.)", r"\1", cell, flags=re.DOTALL).replace("<br>", "\n")
    named = {"amp": "&", "lt": "<", "gt": ">"}
    return re.sub(r"&(#\d+|amp|lt|gt);", lambda m: named.get(m[1]) or chr(int(m[1][1:])), text)


def _systems(system_names: list[str]) -> list[System]:
    rng = np.random.default_rng(0)
    ids = [f"{i}.jpg" for i in range(6)]
    out = []
    for k, name in enumerate(system_names):
        lat = np.zeros(6)
        out.append(System(name, f"s{k}", ids[: 6 - k], lat[: 6 - k], lat[: 6 - k], rng.uniform(0, 3000, 6 - k)))
    return out


@SETTINGS
@given(st.lists(st.text(max_size=16), min_size=2, max_size=3, unique=True))
def test_any_system_name_keeps_every_table_row_whole(system_names: list[str]) -> None:
    plain = [f"s{i}" for i in range(len(system_names))]
    ref = markdown(compare_systems(_systems(plain), resamples=100)).split("\n")
    systems = _systems(system_names)
    text = markdown(compare_systems(systems, resamples=100))
    lines = text.split("\n")
    assert text.splitlines() == lines and len(lines) == len(ref)  # no name adds a line
    tables = [(a, b) for a, b in zip(lines, ref, strict=True) if b.startswith("|")]
    assert len(tables) == 2 * len(plain) + 3
    for line, want in tables:
        assert len(table_cells(line)) == len(table_cells(want)), line
    rows = [table_cells(a)[0] for a, b in tables if re.match(r"\| s\d+ \|", b)]
    expected = [BREAKS.sub("\n", n) for n in system_names] + [BREAKS.sub("\n", n) for n in system_names[1:]]
    assert [shown(c) for c in rows] == expected


@pytest.mark.parametrize("name", ["a|b", "a\\|b", "two\nlines", "  padded  ", "back\\", "<b>&amp;</b>", "|", " "])
def test_markdown_cells_show_what_they_were_given(name: str) -> None:
    cell = text_cells.markdown_cell(name)
    assert "\n" not in cell and table_cells(f"| {cell} | x |") == [cell, "x"] and shown(cell) == name


def test_compare_names_with_pipes_keep_compare_md_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = "img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance\n"
    (tmp_path / "x.csv").write_text(header + "a.jpg,0,0,0,0,0\nb.jpg,0,1,0,0,111.19\n")
    (tmp_path / "y.csv").write_text(header + "a.jpg,0,0,0,3,333.58\nb.jpg,0,0,0,0,0\n")
    argv = ["compare", tmp_path / "x.csv", tmp_path / "y.csv", "--names", "[ref, a|b]", "--out", tmp_path / "cmp"]
    rc, _, err = run_cli([*argv, "--resamples", "100"], capsys)
    assert rc == 0, err
    rows = [ln for ln in (tmp_path / "cmp" / "compare.md").read_text().split("\n") if ln.startswith("|")]
    assert [len(table_cells(r)) for r in rows] == [11, 11, 11, 11, 8, 8, 8]
    assert [shown(table_cells(r)[0]) for r in rows] == ["system", "---", "ref", "a|b", "system", "---", "a|b"]


# -- 6. compare scores the distances between a file's coordinates ---------------------------------------------------


def _published(path: Path, rows: list[tuple[str, float, float, float, float, float]]) -> Path:
    head = "img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance\n"
    path.write_text(head + "".join(f"{i},{a},{c},{b},{d},{e}\n" for i, a, b, c, d, e in rows))
    return path


def test_a_file_claiming_small_errors_is_scored_on_its_coordinates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [(f"{i}.jpg", 10.0, 20.0, 10.0 + i, 20.0, 0.5) for i in range(1, 5)]  # 111 to 445 km away, claiming 0.5
    with caplog.at_level(logging.WARNING, "geoswc.evaluation.compare"):
        liar = read_system(_published(tmp_path / "liar.csv", rows))
    assert "great_circle_distance column disagrees" in caplog.text and "on 4 of 4 photos" in caplog.text
    assert "first: 1.jpg" in caplog.text
    computed = [float(haversine_km(10.0, 20.0, 10.0 + i, 20.0)) for i in range(1, 5)]
    assert liar.error_km.tolist() == pytest.approx(computed)
    honest = read_system(
        _published(tmp_path / "honest.csv", [(r[0], *r[1:5], round(e, 2)) for r, e in zip(rows, computed, strict=True)])
    )
    result = compare_systems([honest, liar], resamples=100)
    assert result["systems"][1]["accuracy"] == result["systems"][0]["accuracy"]
    assert result["systems"][1]["accuracy"]["1"] == 0.0  # not 100 % within 1 km


def test_a_geoswc_evaluation_is_checked_the_same_way(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "ev"
    folder.mkdir()
    result = _method_result(["a.jpg", "b.jpg", "c.jpg"])
    text = result.to_csv().splitlines()
    # claim 0 km for b.jpg: its coordinates are about 55 km apart
    cells = text[2].split(",")
    cells[5] = "0.000"
    text[2] = ",".join(cells)
    (folder / "predictions.csv").write_text("\n".join(text) + "\n")
    with caplog.at_level(logging.WARNING, "geoswc.evaluation.compare"):
        s = read_system(folder)
    assert "error_km column disagrees" in caplog.text and "on 1 of 3 photos (first: b.jpg" in caplog.text
    assert s.error_km.tolist() == pytest.approx(result.errors_km.tolist(), abs=1e-3)


def test_rounded_published_distances_are_kept_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [("a.jpg", 51.682462, -1.78633, 51.696235, -1.802698, 1.90), ("b.jpg", 0.0, 0.0, 0.0, 0.0, 0.5)]
    with caplog.at_level(logging.WARNING, "geoswc.evaluation.compare"):
        s = read_system(_published(tmp_path / "p.csv", rows))
    assert not caplog.records and s.error_km.tolist() == [1.90, 0.5]
