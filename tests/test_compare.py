"""``geoswc compare``: the prediction-file readers (GeoEstimation's summary block included), the alignment on
shared photos, the paired bootstrap (known cases) and the command on the published files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from geoswc.cli import main
from geoswc.core.errors import InputError
from geoswc.evaluation.compare import compare_systems, markdown, paired_bootstrap_ci, photo_id, read_system
from geoswc.evaluation.evaluate import PREDICTION_COLUMNS

from .conftest import SHARED

BASELINES = SHARED / "baselines" / "geoestimation-im2gps3k"
SIX = [
    "ISNs_M-fstar-S3-dev",
    "base_M-fstar-dev",
    "base_M-m-dev",
    "base_L-m-dev",
    "base-vgg_L-m-dev",
    "base-vgg-c_L-m-dev",
]
GEO_HEADER = "img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance"
SUMMARY = (
    "\nstreet acc (1km),city acc (25km),region acc (200km),country acc (750km),continent acc (2500km),"
    "mean deviation (km)\n0.5,0.5,0.5,1.0,1.0,300.0\n"
)


def _geo_file(path: Path, rows: list[tuple[str, float, float, float, float, float]], summary: str = SUMMARY) -> Path:
    path.write_text(GEO_HEADER + "\n" + "".join(f"{i},{a},{c},{b},{d},{e}\n" for i, a, b, c, d, e in rows) + summary)
    return path


def _evaluation(folder: Path, rows: list[tuple[str, float, float, float, float, float]]) -> Path:
    folder.mkdir()
    with open(folder / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(PREDICTION_COLUMNS)
        w.writerows([*r, 0, 0.5] for r in rows)
    return folder


ROWS = [
    ("a.jpg", 10.0, 20.0, 10.0, 20.0, 0.5),
    ("b.jpg", 10.0, 20.0, 10.1, 20.0, 11.1),
    ("c.jpg", 0.0, 0.0, 5.0, 0.0, 556.0),
    ("d.jpg", 0.0, 0.0, 0.0, 30.0, 3336.0),
]


def test_the_summary_block_of_a_published_file_is_read(tmp_path) -> None:
    s = read_system(_geo_file(tmp_path / "sys-a.csv", ROWS))
    assert s.name == "sys-a" and s.ids == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert s.error_km.tolist() == [0.5, 11.1, 556.0, 3336.0] and s.true_lat.tolist() == [10, 10, 0, 0]
    assert s.summary == {
        "street acc (1km)": 0.5,
        "city acc (25km)": 0.5,
        "region acc (200km)": 0.5,
        "country acc (750km)": 1.0,
        "continent acc (2500km)": 1.0,
        "mean deviation (km)": 300.0,
    }
    assert read_system(_geo_file(tmp_path / "plain.csv", ROWS, summary="")).summary is None
    for bad in ("\nonly one row\n", "\na,b\n1,x\n"):
        with pytest.raises(InputError, match="summary block"):
            read_system(_geo_file(tmp_path / "bad.csv", ROWS, summary=bad))


def test_evaluation_folders_and_ids_with_folders(tmp_path) -> None:
    ev = read_system(_evaluation(tmp_path / "my-run", [("x/y/" + r[0], *r[1:]) for r in ROWS]))
    assert ev.name == "my-run" and ev.ids[0] == "a.jpg" and ev.summary is None
    assert photo_id("45/77/3228511372.jpg") == photo_id("3228511372.jpg") == "3228511372.jpg"
    assert photo_id("a\\b.jpg") == "b.jpg"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x,y\n1,2\n", "not a per-photo prediction file"),
        (GEO_HEADER + "\na.jpg,1,2,3,4,5\na.jpg,1,2,3,4,5\n", "line 3: duplicate photo id"),
        (GEO_HEADER + "\na.jpg,1,2,3,4,5\nb.jpg,91,2,3,4,5\n", "line 3: gt_lat 91.0 is outside"),
        (GEO_HEADER + "\na.jpg,1,2,3,4,-5\n", "line 2: great_circle_distance '-5' is not a distance"),
        (GEO_HEADER + "\n", "holds no prediction"),
    ],
)
def test_bad_prediction_files_are_named_with_their_line(tmp_path, text: str, message: str) -> None:
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_system(tmp_path / "p.csv")
    with pytest.raises(InputError, match="no predictions.csv"):
        read_system(tmp_path)


def test_paired_bootstrap_known_cases() -> None:
    n = 400
    a = np.zeros((n, 2), bool)
    assert paired_bootstrap_ci(a, a).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # a system against itself
    assert paired_bootstrap_ci(a, ~a).tolist() == [[1.0, 1.0], [1.0, 1.0]]  # right wherever the other is wrong
    half = np.zeros((n, 1), bool)
    half[: n // 2] = True
    lo, hi = paired_bootstrap_ci(np.zeros((n, 1), bool), half, resamples=4000, seed=1)[0]
    # the difference is 0.5 with standard error sqrt(0.25 / n) = 0.025: the interval is 0.5 ± 1.96 * 0.025
    assert lo == pytest.approx(0.451, abs=0.008) and hi == pytest.approx(0.549, abs=0.008)
    # pairing: two systems that differ on few photos have a narrow interval, whatever their accuracies
    rng = np.random.default_rng(0)
    base = rng.random((n, 1)) < 0.5
    close = base.copy()
    close[:8] = ~close[:8]
    width = np.diff(paired_bootstrap_ci(base, close)[0])[0]
    assert width < 0.03
    assert paired_bootstrap_ci(base, close, seed=3).tolist() == paired_bootstrap_ci(base, close, seed=3).tolist()


def test_systems_are_compared_on_the_photos_they_share(tmp_path) -> None:
    first = read_system(_geo_file(tmp_path / "first.csv", ROWS))
    other_rows = [(r[0], *r[1:3], *r[1:3], 0.1) for r in ROWS[1:]] + [("e.jpg", 1.0, 1.0, 1.0, 1.0, 0.0)]
    second = read_system(_evaluation(tmp_path / "second", other_rows))
    result = compare_systems([first, second], resamples=200)
    assert result["common_photos"] == 3  # b, c, d
    r1, r2 = result["systems"]
    assert (r1["n"], r1["lacks"], r2["n"], r2["lacks"]) == (4, 1, 4, 1)
    assert r1["accuracy"] == {"1": 0.0, "25": 1 / 3, "200": 1 / 3, "750": 2 / 3, "2500": 2 / 3}
    assert r2["accuracy"]["1"] == 1.0 and r1["diff_ci"]["1"] == [0.0, 0.0]
    assert r1["median_km"] == 556.0 and set(r2["diff_ci"]) == {"1", "25", "200", "750", "2500"}
    text = markdown(result)
    assert "The systems' photo sets differ: first lacks 1; second lacks 1" in text
    assert "over the 3 shared photos only" in text and "is over its own 4 photos, not the shared ones" in text
    with pytest.raises(InputError, match="share no photo"):
        compare_systems([first, read_system(_evaluation(tmp_path / "third", [("z.jpg", 1, 1, 1, 1, 0)]))])


def test_cli_compare_writes_json_markdown_and_figure(tmp_path, capsys) -> None:
    a = _geo_file(tmp_path / "a.csv", ROWS)
    b = _evaluation(tmp_path / "b", ROWS)
    out = tmp_path / "cmp"
    assert main(["compare", str(b), str(a), "--out", str(out), "--resamples", "200"]) == 0
    stdout = capsys.readouterr().out
    assert "| b | 4 | 0 |" in stdout and "Every system predicted the same 4 photos" in stdout
    result = json.loads((out / "compare.json").read_text())
    assert result["common_photos"] == 4 and [s["name"] for s in result["systems"]] == ["b", "a"]
    assert set(result["systems"][1]) >= {"name", "source", "n", "accuracy", "median_km", "diff_ci"}
    assert result["systems"][1]["diff_ci"]["1"] == [0.0, 0.0]  # the same errors as the reference
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG" and "| a |" in (out / "compare.md").read_text()
    for args, flag in (
        (["compare", str(a), "--out", str(out)], "at least two"),
        (["compare", str(a), str(b), "--out", str(out), "--names", "[x]"], "--names"),
        (["compare", str(a), str(a), "--out", str(out)], "named alike"),
        (["compare", str(a), str(b), "--out", str(out), "--resamples", "5"], "--resamples"),
    ):
        assert main(args) == 2
        assert flag in capsys.readouterr().err


@pytest.mark.shared_data
def test_the_six_published_models_reproduce_their_summary_blocks(tmp_path, capsys) -> None:
    files = [str(BASELINES / f"{name}.csv") for name in SIX]
    out = tmp_path / "cmp"
    assert main(["compare", *files, "--out", str(out), "--resamples", "200"]) == 0
    stdout = capsys.readouterr().out
    assert "| ISNs_M-fstar-S3-dev | 2245 | 0 | 11.0 | 28.2 | 36.8 | 50.4 | 66.2 |" in stdout
    assert stdout.count("summary block") == 6 and stdout.count("is reproduced") == 6
    result = json.loads((out / "compare.json").read_text())
    assert result["common_photos"] == 2245 and [s["name"] for s in result["systems"]] == SIX


@pytest.mark.shared_data
@pytest.mark.slow
def test_the_readme_comparison_is_what_compare_makes_of_the_committed_predictions(tmp_path, capsys) -> None:
    """benchmarks/results/compare/ is reproduced from the committed out-of-fold predictions and the published
    files; docs/tables/compare.md (docs/evaluation.md's table) is rendered from its compare.json (test_docs.py)."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    committed = json.loads((results / "compare" / "compare.json").read_text())
    committed.pop("provenance", None)  # where and when the committed run was made
    assert (
        main(
            [
                "compare",
                str(results / "geoswc-swc-cv"),
                *(str(BASELINES / f"{n}.csv") for n in SIX),
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for system in (*committed["systems"], *again["systems"]):
        system.pop("source")  # where the files were read from
    assert again == committed and committed["common_photos"] == 2245
    assert (tmp_path / "cmp" / "compare.md").read_text() == (results / "compare" / "compare.md").read_text()
